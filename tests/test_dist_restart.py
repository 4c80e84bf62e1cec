"""A worker killed under ``torchrun --max-restarts 1``: the job restarts, resumes from its last
checkpoint and ends with the same weights as a run that was never interrupted.

Before fastsiam's attempt-prefixed process-group store (fastsiam.dist._attempt_store), the
restarted workers met the killed attempt's addresses in torchrun's shared rendezvous store and
hung in ``init_process_group`` or failed with gloo's "connection refused"."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastsiam.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _train(tmp_path: Path, toy: Path, name: str, kill_after: str | None) -> tuple[Path, str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun comes with torch"
    wd = tmp_path / name
    entry = [str(REPO / "tests/kill_after_checkpoint.py")] if kill_after else ["-m", "fastsiam"]
    cmd = [
        torchrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", *entry, "train",
        "--config", str(REPO / "configs/simsiam_resnet18_toy-demo.yaml"), "--work-dir", str(wd),
        "--resume", "auto", "--deterministic", "--device", "cpu",
        "data.backend=pil", "aug.blur_sigma=[0.1, 2.0]", f"data.train_path={toy / 'train'}", f"data.val_path={toy / 'val'}",
        "data.batch_size=8", "data.workers=0", "data.image_size=32", "model.dim=64", "model.pred_dim=16",
        "train.log_every=1", "eval.knn_every=0", "train.epochs=4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if kill_after:
        env["FASTSIAM_KILL_AFTER"] = str(wd / kill_after)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return wd, log


@pytest.mark.slow
def test_a_killed_worker_is_survived_with_the_same_final_weights(toy_imagenet: Path, tmp_path: Path) -> None:
    killed, log = _train(tmp_path, toy_imagenet, "killed", kill_after="epoch_0002.pt")
    assert "exitcode  : -9" in log or "exitcode: -9" in log, log[-3000:]  # the kill did happen
    # ... before the run ended: the second attempt resumed from a checkpoint short of epoch 4
    assert re.search(r"resumed from \S+\.pt \(epoch [1-3], step", log), log[-3000:]
    whole, _ = _train(tmp_path, toy_imagenet, "whole", kill_after=None)
    a, b = load_checkpoint(killed / "epoch_0004.pt"), load_checkpoint(whole / "epoch_0004.pt")
    assert a["step"] == b["step"]
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
