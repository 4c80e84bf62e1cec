"""kNN (fastsiam.knn) and the feature extraction it reads (fastsiam.features)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastsiam.data import EvalBatch, build_loader
from fastsiam.features import extract_features, normalize_view
from fastsiam.knn import knn_classify, knn_evaluate, knn_predict
from fastsiam.model import build_backbone

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _reference_knn_scores(bank, bank_labels, test, num_classes, k, t):
    """Direct per-sample loop of the InstDisc vote, in float64."""
    bank = bank.double() / bank.double().norm(dim=1, keepdim=True)
    out = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for i, q in enumerate(test.double()):
        sims = bank @ (q / q.norm())
        order = sorted(range(len(bank)), key=lambda j: -float(sims[j]))[:k]
        for j in order:
            out[i, int(bank_labels[j])] += float(torch.exp(sims[j] / t))
    return out


def test_knn_predict_matches_direct_vote():
    g = torch.Generator().manual_seed(0)
    bank, test = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    labels = torch.randint(0, 5, (50,), generator=g)
    got = knn_predict(bank, labels, test, num_classes=5, k=10, temperature=0.5, chunk_size=3)
    ref = _reference_knn_scores(bank, labels, test, 5, 10, 0.5)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_knn_classify_hand_computed():
    # Bank: two points of class 0 near +x, one of class 1 at +y. The query at 45 degrees
    # with k=3 sees cos = 0.707 to +x and +y points: class 0 collects two votes, wins top-1;
    # the second query sits on +y, so class 1's single vote exp(1/T) beats 2 exp(0).
    bank = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    bank_labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    scores = knn_predict(bank, bank_labels, test, num_classes=2, k=3, temperature=0.1)
    e = torch.exp(torch.tensor(2 ** -0.5 / 0.1))
    torch.testing.assert_close(scores[0], torch.stack([2 * e, e]))
    torch.testing.assert_close(scores[1], torch.stack([2 * torch.exp(torch.tensor(0.0)), torch.exp(torch.tensor(10.0))]))
    top1, top5 = knn_classify(bank, bank_labels, test, torch.tensor([0, 1]), num_classes=2, k=3, temperature=0.1)
    assert top1 == 100.0 and top5 == 100.0
    top1, _ = knn_classify(bank, bank_labels, test, torch.tensor([1, 1]), num_classes=2, k=3, temperature=0.1)
    assert top1 == 50.0


def test_knn_top5_counts_the_fifth_class():
    # 10 classes, the bank has one point per class at increasing angle from the query:
    # the true class ranks 5th -> top-1 miss, top-5 hit; ranked 6th -> both miss.
    angles = torch.linspace(0, 1.5, 10)
    bank = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.arange(10)
    q = torch.tensor([[1.0, 0.0]])
    assert knn_classify(bank, labels, q, torch.tensor([4]), 10, k=10) == (0.0, 100.0)
    assert knn_classify(bank, labels, q, torch.tensor([5]), 10, k=10) == (0.0, 0.0)


def test_normalize_view_matches_torchvision():
    from torchvision.transforms import functional as TF

    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = TF.normalize(img.float() / 255.0, MEAN, STD)
    torch.testing.assert_close(normalize_view(img, MEAN, STD), ref)
    floating = torch.randn(2, 3, 8, 8)
    assert torch.equal(normalize_view(floating, MEAN, STD), floating)


def _color_folder(root: Path, per_class: int, seed: int) -> Path:
    """An ImageFolder of 4 classes told apart by the colour of a block at a random place
    on a noisy dark background (red, green, blue, yellow)."""
    rng = np.random.default_rng(seed)
    palette = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)]
    for c, colour in enumerate(palette):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8)
            y, x = rng.integers(0, 20, size=2)
            img[y:y + 20, x:x + 20] = np.array(colour, dtype=np.uint8) * rng.integers(170, 256)
            Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_extract_features_equals_direct_forward(tmp_path):
    folder = _color_folder(tmp_path / "train", per_class=3, seed=0)
    loader = build_loader("pil", folder, batch_size=5, image_size=32, workers=0, split="val", drop_last=False)
    torch.manual_seed(0)
    net, width = build_backbone("resnet18")
    net.eval()
    feats, labels = extract_features(net, loader, "cpu", mean=MEAN, std=STD, show_progress=False)
    assert feats.shape == (12, width) and feats.dtype == torch.float32
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    views = torch.cat([b.view for b in loader])
    with torch.no_grad():
        ref = net((views.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)


def test_knn_evaluate_on_toy_folder_beats_chance(tmp_path):
    train = _color_folder(tmp_path / "train", per_class=8, seed=1)
    val = _color_folder(tmp_path / "val", per_class=4, seed=2)
    kw = {"batch_size": 8, "image_size": 32, "workers": 0, "split": "val", "drop_last": False}
    bank_loader, val_loader = build_loader("pil", train, **kw), build_loader("pil", val, **kw)
    # A random conv layer + global max-pool: colour detectors, blind to the block's place.
    # (A random-init ResNet's pooled features all point nearly the same way, so its kNN
    # accuracy on any data is close to chance; it is no test of the kNN machinery.)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
                              torch.nn.Flatten())
    net.train()
    res = knn_evaluate(net, bank_loader, val_loader, k=10, temperature=0.07, show_progress=False)
    assert res["top1"] >= 75.0, res  # chance is 25
    assert res["top5"] == 100.0
    assert net.training  # the caller's mode is restored


def test_knn_evaluate_accepts_model_with_extract_feat():
    class Model(torch.nn.Module):
        def extract_feat(self, x):
            return F.adaptive_avg_pool2d(x, 1).flatten(1)

        def forward(self, x):  # pragma: no cover - must not be used
            raise AssertionError("kNN must call extract_feat")

    def batches(colors):
        views = torch.stack([torch.full((3, 4, 4), 0, dtype=torch.uint8) for _ in colors])
        for i, c in enumerate(colors):
            views[i, c] = 200
        return [EvalBatch(views, torch.tensor(colors))]

    res = knn_evaluate(Model(), batches([0, 1, 2, 0, 1, 2]), batches([2, 1, 0]), k=2, show_progress=False)
    assert res == {"top1": 100.0, "top5": 100.0}


def test_knn_rejects_bad_inputs():
    with pytest.raises(ValueError, match="num_classes=2"):
        knn_predict(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.randn(1, 4), num_classes=2)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        knn_predict(torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.randn(1, 5), num_classes=2)


def test_run_knn_from_a_checkpoint(tmp_path):
    """``fastsiam knn`` end to end: bank from the train folder, val classified."""
    import torchvision

    from fastsiam.knn import run_knn

    train = _color_folder(tmp_path / "train", per_class=8, seed=1)
    val = _color_folder(tmp_path / "val", per_class=4, seed=2)
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    from fastsiam.config import load_config

    cfg = load_config(None, ["data.backend=pil", f"data.train_path={train}", f"data.val_path={val}",
                             "data.batch_size=8", "data.workers=0", "data.image_size=32", "model.backbone=resnet18",
                             "train.device=cpu", "train.amp=none", "eval.knn_k=10"])
    res = run_knn(cfg, tmp_path / "tv.pth", "cpu", show_progress=False)
    net.fc = torch.nn.Identity()
    bank_loader = build_loader("pil", train, batch_size=8, image_size=32, workers=0, split="val", drop_last=False)
    val_loader = build_loader("pil", val, batch_size=8, image_size=32, workers=0, split="val", drop_last=False)
    ref = knn_evaluate(net.eval(), bank_loader, val_loader, k=10, temperature=0.07, show_progress=False)
    assert res == ref
    assert res["top1"] >= 50.0  # chance is 25
