"""Checkpoint import/export and safe loading (fastsiam.weights)."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torchvision
from torch import nn

from fastsiam.classifier import LinearClassifier
from fastsiam.model import SimSiam
from fastsiam.weights import (
    WeightsError,
    canonical_state_dict,
    detect_format,
    export_torchvision,
    load_parts,
    load_pretrained,
    read_weights,
    save_linear_checkpoint,
    torchvision_arch,
)

DIM, PRED = 64, 16


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics everywhere (zero-init residuals and unit
    running variances would hide a wrongly mapped key)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return module


@pytest.fixture(scope="module")
def tv_resnet() -> nn.Module:
    """A torchvision ResNet-18 with 10 classes: the reference model of every round trip."""
    return _randomize(torchvision.models.resnet18(num_classes=10), seed=0).eval()


@pytest.fixture(scope="module")
def heads() -> tuple[nn.Sequential, nn.Sequential]:
    """A random SimSiam projector and predictor (fastsiam layout) for ResNet-18 width 512."""
    sim = _randomize(SimSiam("resnet18", dim=DIM, pred_dim=PRED), seed=1)
    return sim.projector, sim.predictor


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def _pooled(tv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net = copy.deepcopy(tv)
    net.fc = nn.Identity()
    with torch.no_grad():
        return net.eval()(x)


def _simsiam_from(path) -> SimSiam:
    model = SimSiam("resnet18", dim=DIM, pred_dim=PRED)
    load_pretrained(model, path, parts=("backbone", "projector", "predictor"))
    return model.eval()


def test_torchvision_state_dict_round_trip(tmp_path, tv_resnet):
    path = tmp_path / "tv.pt"
    torch.save(tv_resnet.state_dict(), path)
    assert detect_format(read_weights(path)) == "torchvision"
    clf = LinearClassifier("resnet18", num_classes=10)
    load_pretrained(clf, path, parts=("backbone", "fc"))
    clf.eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(clf.extract_feat(x), _pooled(tv_resnet, x))
        torch.testing.assert_close(clf(x), tv_resnet(x))
    out, arch = export_torchvision(clf, tmp_path / "export.pt")
    assert arch == "resnet18"
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.load_state_dict(torch.load(out, weights_only=True))  # strict: every key, nothing else
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), tv_resnet(x))


def test_official_simsiam_import(tmp_path, tv_resnet, heads):
    projector, predictor = heads
    # The official projector: its last Linear keeps a (frozen, random) bias before the BN.
    official_proj = copy.deepcopy(projector)
    old = official_proj[6]
    official_proj[6] = nn.Linear(old.in_features, old.out_features, bias=True)
    official_proj[6].weight.data.copy_(old.weight.data)
    official_proj[6].bias.data.uniform_(-1, 1)
    sd = {f"module.encoder.{k}": v for k, v in tv_resnet.state_dict().items() if not k.startswith("fc.")}
    sd.update({f"module.encoder.fc.{k}": v for k, v in official_proj.state_dict().items()})
    sd.update({f"module.predictor.{k}": v for k, v in predictor.state_dict().items()})
    path = tmp_path / "checkpoint_0099.pth.tar"
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}}}, path)
    assert detect_format(read_weights(path)) == "official"

    model = _simsiam_from(path)
    x = _images(4)
    feats = _pooled(tv_resnet, x)
    with torch.no_grad():
        torch.testing.assert_close(model.extract_feat(x), feats)
        torch.testing.assert_close(model.projector(feats), official_proj.eval()(feats), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.predictor(feats[:, :DIM]), predictor.eval()(feats[:, :DIM]))
        # Batch statistics (training mode) cancel the bias as well.
        torch.testing.assert_close(model.projector.train()(feats), official_proj.train()(feats),
                                   rtol=1e-4, atol=1e-5)


def test_official_linear_classifier_import(tmp_path, tv_resnet):
    path = tmp_path / "model_best.pth.tar"
    sd = {f"module.{k}": v for k, v in tv_resnet.state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": sd, "best_acc1": torch.tensor(68.1)}, path)
    clf = LinearClassifier("resnet18", num_classes=10)
    load_pretrained(clf, path, parts=("backbone", "fc"))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(x), tv_resnet(x))


def _mmpretrain_neck(seq: nn.Sequential, prefix: str) -> dict[str, torch.Tensor]:
    """fastsiam Sequential -> mmpretrain NonLinearNeck names (fc<i>/bn<i> at index 3i/3i+1)."""
    out = {}
    for k, v in seq.state_dict().items():
        idx, param = k.split(".", 1)
        i, r = divmod(int(idx), 3)
        out[f"{prefix}{'fc' if r == 0 else 'bn'}{i}.{param}"] = v
    return out


def test_mmpretrain_pretrain_and_linear_import(tmp_path, tv_resnet, heads):
    projector, predictor = heads
    backbone = {f"backbone.{k}": v for k, v in tv_resnet.state_dict().items() if not k.startswith("fc.")}
    pre = dict(backbone)
    pre.update(_mmpretrain_neck(projector, "neck."))
    pre.update(_mmpretrain_neck(predictor, "head.predictor."))
    pre["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)
    path = tmp_path / "simsiam_mm.pth"
    torch.save({"meta": {"epoch": 100, "mmengine_version": "0.8.0"}, "state_dict": pre}, path)
    assert detect_format(read_weights(path)) == "mmpretrain"
    model = _simsiam_from(path)
    x = _images()
    feats = _pooled(tv_resnet, x)
    with torch.no_grad():
        torch.testing.assert_close(model.extract_feat(x), feats)
        torch.testing.assert_close(model.projector(feats), projector.eval()(feats))

    lin = dict(backbone)
    lin["head.fc.weight"] = tv_resnet.fc.weight.detach()
    lin["head.fc.bias"] = tv_resnet.fc.bias.detach()
    path = tmp_path / "linear_mm.pth"
    torch.save({"meta": {"dataset_meta": {"classes": [f"c{i}" for i in range(10)]}}, "state_dict": lin}, path)
    clf = LinearClassifier("resnet18", num_classes=10)
    obj = load_pretrained(clf, path, parts=("backbone", "fc"))
    from fastsiam.weights import classes_of

    assert classes_of(obj) == [f"c{i}" for i in range(10)]
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(x), tv_resnet(x))


def test_fastsiam_checkpoints_round_trip(tmp_path, tv_resnet):
    sim = _randomize(SimSiam("resnet18", dim=DIM, pred_dim=PRED), seed=3)
    path = tmp_path / "epoch_0100.pt"
    torch.save({"model": sim.state_dict(), "epoch": 100, "step": 5, "config": {"model": {"backbone": "resnet18"}},
                "fastsiam_version": "0.1.0"}, path)
    assert detect_format(read_weights(path)) == "fastsiam"
    loaded = _simsiam_from(path)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.projector(loaded.extract_feat(x)), sim.eval().projector(sim.extract_feat(x)))

    # Its backbone feeds a classifier; exported, it is a torchvision backbone with the same features.
    clf = LinearClassifier("resnet18", num_classes=10)
    load_pretrained(clf, path, parts=("backbone",))
    out, arch = export_torchvision(path, tmp_path / "backbone_tv.pt")
    assert arch == "resnet18"
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(_pooled(tv, x), clf.eval().extract_feat(x))

    # The linear format keeps classes and scores; it loads back exactly.
    _randomize(clf.fc, seed=4)
    lin = save_linear_checkpoint(tmp_path / "linear.pt", clf, config={"model": {}}, classes=list("abcdefghij"),
                                 top1=50.0, top5=90.0, epoch=90)
    obj = read_weights(lin)
    assert detect_format(obj) == "fastsiam-linear" and obj["classes"][0] == "a" and obj["top1"] == 50.0
    again = LinearClassifier("resnet18", num_classes=10)
    load_pretrained(again, lin, parts=("backbone", "fc"))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), clf(x))


def test_missing_unexpected_and_mismatched_keys_are_listed(tv_resnet):
    sd = {f"backbone.{k}": v for k, v in tv_resnet.state_dict().items() if not k.startswith("fc.")}
    model = LinearClassifier("resnet18", num_classes=10)
    broken = dict(sd)
    del broken["backbone.layer2.0.conv1.weight"]
    broken["backbone.layer2.0.conv9.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"missing keys: backbone\.layer2\.0\.conv1\.weight; "
                                           r"unexpected keys: backbone\.layer2\.0\.conv9\.weight"):
        load_parts(model, broken, ("backbone",), "ckpt.pt")
    with pytest.raises(WeightsError, match="has no fc weights"):
        load_parts(model, sd, ("backbone", "fc"), "ckpt.pt")
    with pytest.raises(WeightsError, match=r"shape mismatch.*conv1\.weight"):
        load_parts(LinearClassifier("resnet18", 10, small_input=True), sd, ("backbone",), "ckpt.pt")
    with pytest.raises(WeightsError, match=r"unexpected keys for a ResNet/SimSiam checkpoint: transformer\.w"):
        canonical_state_dict({"state_dict": {"transformer.w": torch.zeros(1)}}, "vit.pth")


class _RunsCode:
    """Unpickling this builds os.mkdir(marker): code execution hidden in a checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_code_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "meta": _RunsCode(str(marker))}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightsError, match=r"evil\.pth: refused: .*pickled Python object \(posix\.mkdir\)"):
        read_weights(path)
    with pytest.raises(WeightsError, match="refused"):
        load_pretrained(LinearClassifier("resnet18", 10), path, parts=("backbone",))
    assert not marker.exists()
    # The payload is live: an unrestricted load does run it (so the test above can fail).
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        read_weights(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match=r"junk\.pt: "):
        read_weights(junk)
    listy = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listy)
    with pytest.raises(WeightsError, match="expected a dict"):
        read_weights(listy)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"a": 1}, f, protocol=2)
    with pytest.raises(WeightsError, match=r"plain\.pkl: "):
        canonical_state_dict(read_weights(tmp_path / "plain.pkl"), "plain.pkl")


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_torchvision_arch_names_the_constructor_that_loads_the_layout(arch: str) -> None:
    sd = getattr(torchvision.models, arch)().state_dict()
    assert torchvision_arch(sd) == arch
    with pytest.raises(ValueError, match="not a torchvision ResNet layout"):
        torchvision_arch({k: v for k, v in sd.items() if not k.startswith("layer3.1.")})
