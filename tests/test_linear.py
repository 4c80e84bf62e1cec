"""Linear evaluation and test (fastsiam.linear): the protocol, accumulation, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_knn import _color_folder

from fastsiam.data import build_loader
from fastsiam.knn import knn_evaluate
from fastsiam.linear import run_linear, run_test


def _linear_cfg(train: Path, val: Path, **extra: str):
    overrides = {
        "data.backend": "pil", "data.train_path": str(train), "data.val_path": str(val),
        "data.batch_size": "16", "data.workers": "0", "data.image_size": "32", "data.scale": "[0.5, 1.0]",
        "data.options": "{augment: crop}", "model.backbone": "resnet18", "model.num_classes": "4",
        # The recipe's optimizer (LARS, cosine); a toy-sized run needs a bolder trust ratio.
        "optim.name": "lars", "optim.lr": "16", "optim.trust_coefficient": "0.5", "optim.weight_decay": "0",
        "optim.exclude_1d_from_wd": "true", "optim.fix_pred_lr": "false", "schedule.name": "cosine",
        "train.epochs": "5", "train.device": "cpu", "train.amp": "none", **extra,
    }
    from fastsiam.config import load_config

    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    """One linear evaluation on the colour-block folder from a random torchvision ResNet-18
    (random conv features separate colours; a random SimSiam backbone with zero-initialised
    residual branches would not, see above)."""
    import torchvision

    from fastsiam.linear import run_linear

    root = tmp_path_factory.mktemp("linear")
    train = _color_folder(root / "train", per_class=12, seed=1)
    val = _color_folder(root / "val", per_class=6, seed=2)
    torch.manual_seed(0)
    pretrained = root / "resnet18_random.pth"
    torch.save(torchvision.models.resnet18().state_dict(), pretrained)
    cfg = _linear_cfg(train, val)
    res = run_linear(cfg, pretrained, "cpu", work_dir=root / "work", show_progress=False)
    return cfg, pretrained, res


def test_linear_evaluation_beats_chance_and_records_the_run(linear_run):
    from fastsiam.config import load_config
    from fastsiam.run_log import read_metrics

    _, pretrained, res = linear_run
    assert res["top1"] >= 60.0, res  # chance is 25
    assert res["epoch"] == 5 and res["step"] == 5 * (48 // 16)
    records = [r for r in read_metrics(res["work_dir"]) if r.get("event") == "epoch"]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["top1"] == res["top1"]
    assert records[-1]["loss"] < records[0]["loss"]
    saved = load_config(res["work_dir"] / "config.yaml")
    assert saved.eval.pretrained == str(pretrained) and saved.optim.name == "lars"


def test_linear_training_keeps_the_backbone_frozen(linear_run):
    from fastsiam.weights import canonical_state_dict, read_weights

    _, pretrained, res = linear_run
    before = canonical_state_dict(read_weights(pretrained))
    after = read_weights(res["checkpoint"])
    assert after["format"] == "fastsiam-linear" and after["classes"] == ["class0", "class1", "class2", "class3"]
    for k, v in after["model"].items():
        if k.startswith("backbone."):
            assert torch.equal(v, before[k]), k  # weights and BatchNorm running statistics
    assert not torch.equal(after["model"]["fc.weight"], torch.zeros_like(after["model"]["fc.weight"]))


def test_test_reproduces_the_final_linear_top1(linear_run):

    cfg, _, res = linear_run
    out = run_test(cfg, res["checkpoint"], "cpu", show_progress=False)
    assert out == {"top1": res["top1"], "top5": res["top5"], "num_samples": 24}


def test_linear_refuses_an_existing_run_and_missing_weights(linear_run):
    from fastsiam.linear import run_linear

    cfg, pretrained, res = linear_run
    with pytest.raises(ValueError, match="already holds a linear run"):
        run_linear(cfg, pretrained, "cpu", work_dir=res["work_dir"], show_progress=False)
    with pytest.raises(ValueError, match="needs pretrained weights"):
        run_linear(cfg, None, "cpu", work_dir=res["work_dir"] / "other", show_progress=False)


def test_classifier_head_init_and_frozen_backbone_mode():
    from fastsiam.classifier import LinearClassifier

    torch.manual_seed(0)
    clf = LinearClassifier("resnet18", num_classes=1000)
    assert abs(clf.fc.weight.std().item() - 0.01) < 5e-4 and torch.equal(clf.fc.bias, torch.zeros(1000))
    clf.freeze_backbone()
    clf.train()
    assert clf.fc.training and not clf.backbone.training
    assert not any(m.training for m in clf.backbone.modules())


@pytest.mark.cuda
def test_linear_and_test_on_cuda_with_bf16(linear_run, tmp_path):
    """The GPU path: autocast backbone, LARS with device lr; test agrees with training."""
    import copy

    import torchvision

    from fastsiam.linear import run_linear

    cfg, pretrained, _ = linear_run
    cfg = copy.deepcopy(cfg)
    cfg.train.amp = "bf16"
    res = run_linear(cfg, pretrained, "cuda", work_dir=tmp_path / "work", show_progress=False)
    assert res["top1"] >= 50.0, res
    assert run_test(cfg, res["checkpoint"], "cuda", show_progress=False)["top1"] == res["top1"]
    net = torchvision.models.resnet18()
    net.load_state_dict(torch.load(pretrained, weights_only=True))
    net.fc = torch.nn.Identity()
    loaders = [build_loader("pil", getattr(cfg.data, f"{s}_path"), batch_size=8, image_size=32, workers=0,
                            split="val", drop_last=False, device=d) for s, d in (("train", "cpu"), ("val", "cpu"))]
    cpu = knn_evaluate(net.eval(), *loaders, k=10, show_progress=False)
    gpu = knn_evaluate(net.cuda().eval(), *loaders, k=10, device="cuda", show_progress=False)
    assert abs(cpu["top1"] - gpu["top1"]) <= 100 / 24 + 1e-6  # at most one image flips


class _Crops:
    """Fixed uint8 crops and labels cut into batches in order: a loader whose samples do not
    depend on the batch size (as a real loader's epoch order does not)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        from fastsiam.data import TwoViewBatch

        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            view = self.images[sl]
            yield TwoViewBatch.from_pair(view, view, self.labels[sl])


def test_four_micro_batches_of_1024_are_one_lars_step_of_4096(tmp_path):
    from fastsiam.classifier import LinearClassifier
    from fastsiam.config import load_config
    from fastsiam.linear import train_linear
    from fastsiam.run_log import RunLogger

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8192, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (8192,), generator=g)
    fcs = []
    for micro, k in ((4096, 1), (1024, 4)):
        cfg = load_config(None, ["optim.name=lars", "optim.weight_decay=1e-4", "train.epochs=1", "train.amp=none",
                                 "train.channels_last=false", f"data.batch_size={micro}",
                                 f"train.accumulate_steps={k}", "model.backbone=resnet18"])
        torch.manual_seed(1)
        model = LinearClassifier("resnet18", num_classes=10, small_input=True)
        res = train_linear(model, _Crops(images, labels, micro), None, cfg, device=torch.device("cpu"),
                           logger=RunLogger(tmp_path, enabled=False), checkpoint_path=tmp_path / f"{k}.pt",
                           show_progress=False)
        assert res["step"] == 2  # two optimizer steps of 4096 images either way, lr 0.1 x 16
        fcs.append((model.fc.weight.detach().clone(), model.fc.bias.detach().clone(), res["loss"]))
    (w1, b1, loss1), (w4, b4, loss4) = fcs
    torch.manual_seed(1)
    init = LinearClassifier("resnet18", num_classes=10, small_input=True).fc.weight
    # LARS moves the head by about lr x trust (0.001) x |w|: ~1e-4, far above the rounding below
    assert (w1 - init).abs().max() > 5e-5
    # equal to float rounding (measured: 2e-9 on weights of 0.04)
    torch.testing.assert_close(w4, w1, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b4, b1, rtol=1e-6, atol=1e-8)
    assert loss4 == pytest.approx(loss1, rel=1e-5)


def test_accumulation_is_refused_by_pretraining_and_by_a_short_epoch(linear_run, tmp_path):
    from fastsiam.config import load_config
    from fastsiam.trainer import Trainer, TrainingError

    with pytest.raises(TrainingError, match=r"train\.accumulate_steps=2: SimSiam pretraining"):
        Trainer(load_config(None, ["train.accumulate_steps=2", "train.device=cpu"]), work_dir=tmp_path / "t")
    cfg, pretrained, _ = linear_run
    short = _linear_cfg(cfg.data.train_path, cfg.data.val_path, **{"train.accumulate_steps": "4"})
    with pytest.raises(ValueError, match=r"3 batches of 16, fewer than train\.accumulate_steps=4"):
        run_linear(short, pretrained, "cpu", work_dir=tmp_path / "w", show_progress=False)


def test_a_non_finite_loss_stops_with_a_training_error(tmp_path):
    # TrainingError: the CLI's one-line kind, like the pretraining trainer's
    from fastsiam.classifier import LinearClassifier
    from fastsiam.config import load_config
    from fastsiam.linear import train_linear
    from fastsiam.run_log import RunLogger
    from fastsiam.trainer import TrainingError

    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model = LinearClassifier("resnet18", num_classes=4, small_input=True)
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    cfg = load_config(None, ["optim.name=lars", "train.epochs=1", "train.amp=none", "data.batch_size=16",
                             "model.backbone=resnet18", "train.channels_last=false"])
    with pytest.raises(TrainingError, match=r"non-finite loss in epoch 1; lower optim\.lr"):
        train_linear(model, _Crops(images, torch.zeros(32, dtype=torch.long), 16), None, cfg,
                     device=torch.device("cpu"), logger=RunLogger(tmp_path, enabled=False),
                     checkpoint_path=tmp_path / "last.pt", show_progress=False)
    assert not (tmp_path / "last.pt").exists()
