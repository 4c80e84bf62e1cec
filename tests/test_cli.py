"""Command-line entry points not covered elsewhere: export, predict on a pretraining model, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

from fastsiam.cli import main
from fastsiam.config import load_config
from fastsiam.model import SimSiam


def test_export_gives_a_torchvision_resnet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
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
    assert main(["export", str(ckpt), str(out)]) == 0
    assert "torchvision ResNet state dict" in capsys.readouterr().out
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
