"""The Python API (fastsiam.api) and ``fastsiam info`` (fastsiam.flops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from fastsiam.api import SimSiamModel, get_model, inference_model, list_models
from fastsiam.classifier import LinearClassifier
from fastsiam.flops import count_flops, count_params, model_info
from fastsiam.weights import save_linear_checkpoint

CARD = {
    "simsiam_resnet50_8xb32-coslr-100e_in1k": (38.20, 4.11),
    "simsiam_resnet50_8xb32-coslr-200e_in1k": (38.20, 4.11),
    "resnet50_simsiam-100e-pre_8xb512-linear-coslr-90e_in1k": (25.56, 4.11),
    "resnet50_simsiam-200e-pre_8xb512-linear-coslr-90e_in1k": (25.56, 4.11),
}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_list_models_has_the_model_card():
    assert sorted(list_models()) == sorted(CARD)
    assert list_models("*linear*") == sorted(n for n in CARD if "linear" in n)


def test_count_flops_hand_computed():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
                              torch.nn.BatchNorm1d(4, affine=False))
    conv = 8 * 10 * 10 * 3 * 9   # output elements x input channels x kernel area
    bn = 2 * 8 * 10 * 10         # affine BN: 2 per element
    pool = 8 * 10 * 10           # 1 per input element
    fc = 4 * 8
    bn1d = 4                     # no affine: 1 per element
    assert count_flops(net, torch.zeros(1, 3, 10, 10)) == conv + bn + pool + fc + bn1d
    assert net.training  # mode restored
    assert count_params(net) == 3 * 8 * 9 + 8 + 2 * 8 + 8 * 4 + 4


@pytest.mark.parametrize("name", sorted(CARD))
def test_info_prints_the_model_card_figures(name, capsys):
    from fastsiam.cli import main

    info = model_info(name)
    params_m, gflops = CARD[name]
    assert round(info["params_m"], 2) == params_m and round(info["gflops"], 2) == gflops
    assert main(["info", name]) == 0
    out = capsys.readouterr().out
    assert f"{params_m:.2f} M params" in out and f"{gflops:.2f} GFLOPs" in out


def _write_cfg(tmp_path, name: str, task: str = "pretrain", num_classes: int = 3):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"task: {task}\nmodel: {{backbone: resnet18, num_classes: {num_classes}, dim: 32, pred_dim: 8}}\n"
                    "data: {image_size: 32}\n")
    return path


def test_get_model_by_name_and_errors():
    model = get_model("simsiam_resnet50_8xb32-coslr-100e_in1k")
    assert isinstance(model, SimSiamModel) and not model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.extract_feat(x))
        assert model(x).shape == (2, 2048)
    clf = get_model("resnet50_simsiam-200e-pre_8xb512-linear-coslr-90e_in1k")
    assert isinstance(clf, LinearClassifier) and clf.fc.out_features == 1000
    with pytest.raises(ValueError, match=r"downloads nothing.*download\.openmmlab\.com.*pretrained='path"):
        get_model("simsiam_resnet50_8xb32-coslr-100e_in1k", pretrained=True)
    with pytest.raises(ValueError, match="did you mean 'simsiam_resnet50_8xb32-coslr-100e_in1k'"):
        get_model("simsiam_resnet50_8xb32-coslr-100e_in1")


def test_get_model_loads_weights_and_lists_missing_keys(tmp_path):
    torch.manual_seed(0)
    src = LinearClassifier("resnet18", num_classes=3)
    for p in src.parameters():
        p.data.normal_(0, 0.05)
    ckpt = save_linear_checkpoint(tmp_path / "last.pt", src, config={}, classes=["ant", "bee", "cat"],
                                  top1=None, top5=None, epoch=1)
    cfg = _write_cfg(tmp_path, "resnet18_toy", "linear")
    clf = get_model(cfg, pretrained=ckpt)
    assert clf.classes == ["ant", "bee", "cat"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), src.eval()(x))
    # A linear checkpoint has no projector/predictor: a pretraining model refuses it, naming them.
    with pytest.raises(ValueError, match="has no projector weights"):
        get_model(_write_cfg(tmp_path, "simsiam_toy"), pretrained=ckpt)


def test_inference_model_matches_a_manual_forward(tmp_path):
    from fastsiam.config import load_config

    torch.manual_seed(1)
    src = LinearClassifier("resnet18", num_classes=3)
    for p in src.parameters():
        p.data.normal_(0, 0.05)
    cfg_path = _write_cfg(tmp_path, "resnet18_toy", "linear")
    ckpt = save_linear_checkpoint(tmp_path / "last.pt", src, config=load_config(cfg_path).to_dict(),
                                  classes=["ant", "bee", "cat"], top1=None, top5=None, epoch=1)
    rgb = np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")

    # The reference: PIL resize of the short side to 32/0.875 = 37, center crop 32, normalize.
    img = TF.pil_to_tensor(TF.center_crop(TF.resize(Image.fromarray(rgb), 37), 32))
    x = TF.normalize(img.float()[None] / 255.0, MEAN, STD)
    with torch.no_grad():
        ref = torch.softmax(src.eval()(x)[0], 0)

    by_name = inference_model(cfg_path, tmp_path / "img.png", pretrained=ckpt)
    by_ckpt = inference_model(ckpt, rgb)  # the checkpoint alone knows its model (fastsiam predict)
    for res in (by_name, by_ckpt):
        assert res["pred_label"] == int(ref.argmax())
        assert res["pred_class"] == ["ant", "bee", "cat"][res["pred_label"]]
        assert res["pred_score"] == pytest.approx(float(ref.max()), rel=1e-4)
        np.testing.assert_allclose(res["pred_scores"], ref.numpy(), rtol=1e-5, atol=1e-6)

    sim = get_model(_write_cfg(tmp_path, "simsiam_toy"))
    feats = inference_model(sim, Image.fromarray(rgb))["features"]
    with torch.no_grad():
        np.testing.assert_allclose(feats, sim.extract_feat(x)[0].numpy(), rtol=1e-4, atol=1e-5)


def test_inference_model_names_imagenet_classes_and_rejects_bad_images(tmp_path):
    model = get_model("resnet50_simsiam-100e-pre_8xb512-linear-coslr-90e_in1k")
    res = inference_model(model, np.zeros((40, 40, 3), dtype=np.uint8))
    from torchvision.models import ResNet50_Weights

    assert res["pred_class"] == ResNet50_Weights.IMAGENET1K_V1.meta["categories"][res["pred_label"]]
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        inference_model(model, np.zeros((40, 40), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        inference_model(model, tmp_path / "missing.jpg")
