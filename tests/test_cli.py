"""Command-line entry points not covered elsewhere: export, predict on a pretraining model, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import models

from fastsiam.cli import main
from fastsiam.config import load_config
from fastsiam.model import SimSiam


def test_export_gives_a_torchvision_resnet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SimSiam("resnet18", dim=32, pred_dim=8)
    for m in model.modules():  # non-trivial BN statistics, so eval-mode features depend on them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    ckpt = tmp_path / "epoch_0001.pt"
    torch.save({"model": model.state_dict(), "config": load_config(None).to_dict(), "epoch": 1}, ckpt)
    out = tmp_path / "resnet18.pt"
    proc = fastsiam("export", str(ckpt), str(out))  # the real CLI
    assert proc.returncode == 0, proc.stderr
    assert "torchvision.models.resnet18()" in proc.stdout  # the constructor that loads it
    tv = models.resnet18(weights=None)
    missing, unexpected = tv.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    tv.eval()
    torch.testing.assert_close(tv(x), model.extract_feat(x), rtol=0, atol=0)


def test_export_refuses_unknown_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", str(bad), str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastsiam export: error: {bad}") and err.count("\n") == 1
    assert not (tmp_path / "o.pt").exists()


def test_predict_with_a_pretraining_model_prints_features(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model:\n  backbone: resnet18\n  dim: 32\n  pred_dim: 8\ndata:\n  image_size: 32\ntrain:\n  device: cpu\n")
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    assert main(["predict", str(cfg), str(img), "--device", "cpu"]) == 0
    assert "features of shape (512,)" in capsys.readouterr().out


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "fastsiam", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for cmd in ("train", "knn", "linear", "test", "info", "predict", "export", "plot"):
        assert cmd in out.stdout


# ------------------------------------------------------------------------------------------
# the CLI as a user meets it: real subprocesses

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "simsiam_resnet18_toy-demo.yaml"
LINEAR_IN1K = REPO / "configs" / "resnet50_simsiam-100e-pre_8xb512-linear-coslr-90e_in1k.yaml"


def fastsiam(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastsiam", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def one_line_error(proc: subprocess.CompletedProcess[str], command: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"fastsiam {command}: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_overrides_and_options_mix_in_any_order() -> None:
    proc = fastsiam("train", "--config", str(DEMO), "data.batch_size=8", "--device", "cpu", "train.epochs=3",
                    "--print-config")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["data"]["batch_size"], cfg["train"]["device"], cfg["train"]["epochs"]) == (8, "cpu", 3)
    bad = fastsiam("train", "--config", str(DEMO), "data.batch_size=8", "--bogus")
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
    # A command without --config takes no overrides.
    bad = fastsiam("plot", "work_dirs/x", "data.batch_size=8")
    assert bad.returncode == 2 and "unrecognized arguments: data.batch_size=8" in bad.stderr


def test_info_counts_flops_at_the_configs_image_size() -> None:
    proc = fastsiam("info", str(DEMO))
    assert proc.returncode == 0, proc.stderr
    assert "per 32 px image" in proc.stdout  # the demo trains on 32 px views
    ref = fastsiam("info", str(DEMO), "--image-size", "224")
    gflops = [float(p.stdout.split(" GFLOPs")[0].rsplit(" ", 1)[1]) for p in (proc, ref)]
    # A ResNet's convolutions scale with the pixel count: (32 / 224)^2 of the 224 px figure.
    assert gflops[0] == pytest.approx(gflops[1] * (32 / 224) ** 2, rel=0.05)


def test_a_config_built_on_the_demo_gets_its_own_work_dir(tmp_path: Path) -> None:
    child = tmp_path / "my_variant.yaml"
    child.write_text(f"_base_: {DEMO}\ntrain:\n  epochs: 2\n")
    cfg = yaml.safe_load(fastsiam("train", "--config", str(child), "--print-config").stdout)
    assert cfg["name"] == "my_variant" and cfg["output"]["work_dir"] is None  # -> work_dirs/my_variant
    assert yaml.safe_load(fastsiam("train", "--config", str(DEMO), "--print-config").stdout)["output"][
        "work_dir"] == "work_dirs/toy_demo"


def test_train_refuses_a_linear_config() -> None:
    assert "run it with fastsiam linear" in one_line_error(fastsiam("train", "--config", str(LINEAR_IN1K)), "train")


@pytest.fixture(scope="module")
def toy_linear(toy_imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A random torchvision ResNet-18 to evaluate, and the overrides that fit the ImageNet linear
    config to the toy data (4 classes) in a few seconds."""
    root = tmp_path_factory.mktemp("toy_linear")
    torch.manual_seed(0)
    torch.save(models.resnet18().state_dict(), root / "resnet18.pth")
    overrides = [f"data.train_path={toy_imagenet / 'train'}", f"data.val_path={toy_imagenet / 'val'}",
                 "data.backend=pil", "data.options={augment: crop}", "data.batch_size=16", "data.workers=0",
                 "data.image_size=32", "model.backbone=resnet18", "train.epochs=1", "train.amp=none",
                 "train.device=cpu", "train.channels_last=false", "train.accumulate_steps=1"]
    return root, overrides


def test_linear_takes_the_class_count_from_the_data_and_predict_names_the_class(
        toy_linear: tuple[Path, list[str]], toy_imagenet: Path) -> None:
    root, overrides = toy_linear
    args = ["linear", "--config", str(LINEAR_IN1K), "--pretrained", str(root / "resnet18.pth"), *overrides]
    # The ImageNet config's explicit 1000 classes on 4-class data: refused before training.
    err = one_line_error(fastsiam(*args, "--work-dir", str(root / "refused")), "linear")
    assert "has 4 classes but model.num_classes=1000" in err and not (root / "refused" / "last.pt").exists()
    proc = fastsiam(*args, "model.num_classes=null", "--work-dir", str(root / "run"))
    assert proc.returncode == 0, proc.stderr
    image = sorted((toy_imagenet / "val").glob("*/*.JPEG"))[0]
    classes = sorted(p.name for p in (toy_imagenet / "train").iterdir() if p.is_dir())
    # The run's own config.yaml: no "linear" in its name, the task comes from its content.
    for model in (root / "run" / "last.pt", root / "run" / "config.yaml"):
        out = fastsiam("predict", str(model), str(image), "--pretrained", str(root / "run" / "last.pt"))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split(": ", 1)[1].split(" (label")[0] in classes, out.stdout


def test_synthetic_backend_is_a_short_epoch_without_a_knn_monitor(tmp_path: Path) -> None:
    in1k = REPO / "configs" / "simsiam_resnet50_8xb32-coslr-100e_in1k.yaml"  # kNN every 10 epochs
    proc = fastsiam("train", "--config", str(in1k), "--backend", "synthetic", "--max-steps", "2",
                    "--work-dir", str(tmp_path / "run"), "--device", "cpu", "model.backbone=resnet18",
                    "data.image_size=32", "data.batch_size=8", "data.workers=0", "train.amp=none")
    assert proc.returncode == 0, proc.stderr
    assert "1280 steps/epoch" in proc.stderr  # 10,240 made-up samples / batch 8, not ImageNet's 1.28 M
    assert "no kNN monitor on the synthetic backend's random labels" in proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in records] == [None, "stopped"]  # one step record, no "knn" event


# The pil backend runs the official recipe, not the demo's scaled blur: the demo config with it
# sets the recipe's own values back.
PIL_RECIPE = ["aug.blur_sigma=[0.1, 2.0]"]


def test_pil_backend_refuses_aug_keys_its_recipe_ignores(toy_imagenet: Path, tmp_path: Path) -> None:
    args = _toy_train_args(toy_imagenet, tmp_path / "run")[:-len(PIL_RECIPE)]
    err = one_line_error(fastsiam(*args, "--max-steps", "1"), "train")
    assert "ignores aug.blur_sigma=[0.02, 0.38]; set data.options.augment=crop" in err
    proc = fastsiam(*args, "--max-steps", "1", "data.options={augment: crop}")  # crops in PIL, aug.* on the device
    assert proc.returncode == 0, proc.stderr


def _toy_train_args(toy: Path, work_dir: Path) -> list[str]:
    """A 3-step-epoch ResNet-18 pretraining on the toy data (48 images, batch 16)."""
    return ["train", "--config", str(DEMO), "--work-dir", str(work_dir), "--device", "cpu",
            f"data.train_path={toy / 'train'}",
            f"data.val_path={toy / 'val'}", "data.backend=pil", "data.batch_size=16", "data.workers=0",
            "data.image_size=32", "model.backbone=resnet18", "model.dim=64", "model.pred_dim=16",
            "train.amp=none", "train.log_every=2", "eval.knn_k=5", *PIL_RECIPE]


def test_a_log_gets_progress_lines_and_the_summary_the_final_weights(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    # kNN monitored every epoch (3 steps); --max-steps 4 stops one step into epoch 2
    proc = fastsiam(*_toy_train_args(toy_imagenet, wd), "eval.knn_every=1", "--max-steps", "4", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "training resnet18 on" not in proc.stderr  # -q: no INFO lines
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train: ")]
    # one line per log window (steps 2, 3: the epoch's end, 4) and the last one when the bar closes
    assert len(lines) == 4 and all(" img/s" in line for line in lines), proc.stderr
    assert lines[0].startswith("train: 32/64 img (50%)") and "ETA " in lines[0] and "loss=" in lines[0]
    knn = [r for r in (json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines())
           if r.get("event") == "knn"]
    assert [r["label"] for r in knn] == ["random init", "epoch 1", "final, step 4"]
    summary = proc.stdout
    assert f"kNN top-1 on val: {knn[-1]['knn_top1']:.2f}%" in summary and "throughput: " in summary
    rate = float(summary.split("throughput: ")[1].split(" images/s")[0].replace(",", ""))
    steps = [r for r in (json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    # the run's rate is its images over its step time: between the slowest and fastest window's
    assert min(r["images_per_s"] for r in steps) <= rate <= max(r["images_per_s"] for r in steps)


def test_linear_prints_its_batch_and_lr_and_resumes_exactly(toy_linear: tuple[Path, list[str]]) -> None:
    root, overrides = toy_linear
    args = ["linear", "--config", str(LINEAR_IN1K), "--pretrained", str(root / "resnet18.pth"), *overrides,
            "model.num_classes=null", "train.epochs=2"]
    straight = fastsiam(*args, "--work-dir", str(root / "straight"))
    assert straight.returncode == 0, straight.stderr
    # 3 batches of 16 per epoch, lr 0.1 x 16/256 (the recipe's 0.1 per 256 images)
    assert "1 x 16 images/step, lr 0.00625, 3 steps/epoch" in straight.stderr
    first = fastsiam(*args, "train.max_steps=3", "--work-dir", str(root / "resumed"))
    assert first.returncode == 0, first.stderr
    again = fastsiam(*args, "--work-dir", str(root / "resumed"))  # without --resume: refused, nothing lost
    assert "continue it with --resume auto" in one_line_error(again, "linear")
    resumed = fastsiam(*args, "--work-dir", str(root / "resumed"), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(root / "straight" / "last.pt", weights_only=True)
    b = torch.load(root / "resumed" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["top1"] == b["top1"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    changed = fastsiam(*args, "optim.lr=0.2", "--work-dir", str(root / "resumed"), "--resume")
    assert "changes the run's result (optim.lr 0.1 -> 0.2)" in one_line_error(changed, "linear")



def test_info_of_a_linear_config_whose_head_the_data_sizes() -> None:
    proc = fastsiam("info", str(REPO / "configs" / "simsiam_resnet18_toy-demo-linear.yaml"))
    assert proc.returncode == 0, proc.stderr
    tv = models.resnet18()
    backbone = sum(p.numel() for p in tv.parameters()) - sum(p.numel() for p in tv.fc.parameters())
    assert f"{backbone / 1e6:.2f} M params + {512 + 1} per class of the data" in proc.stdout
