"""linear, test and knn under torchrun (2 CPU processes, gloo) against one process: each image
counted once on an odd split, one result printed, the same classifier trained."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision import models

from fastsiam.run_log import read_metrics

REPO = Path(__file__).resolve().parent.parent
LINEAR_IN1K = REPO / "configs" / "resnet50_simsiam-100e-pre_8xb512-linear-coslr-90e_in1k.yaml"


def _run(args: list[str], cwd: Path, processes: int) -> subprocess.CompletedProcess[str]:
    if processes == 1:
        cmd = [sys.executable, "-m", "fastsiam", *args]
    else:
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(processes), "-m", "fastsiam", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def odd_toy(toy_imagenet: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The toy data less one train and one val image (47 and 15: both splits pad on 2 ranks),
    a random ResNet-18 to evaluate, and the overrides fitting the linear config to them."""
    root = tmp_path_factory.mktemp("odd_toy")
    for split in ("train", "val"):
        shutil.copytree(toy_imagenet / split, root / split)
        sorted((root / split).glob("*/*.JPEG"))[-1].unlink()
    torch.manual_seed(0)
    torch.save(models.resnet18().state_dict(), root / "resnet18.pth")
    overrides = [f"data.train_path={root / 'train'}", f"data.val_path={root / 'val'}", "data.backend=pil",
                 "data.options={augment: crop}", "data.workers=0", "data.image_size=32", "model.backbone=resnet18",
                 "model.num_classes=null", "train.epochs=2", "train.amp=none", "train.device=cpu",
                 "train.channels_last=false", "train.accumulate_steps=1", "eval.knn_k=5"]
    return root, overrides


def _figures(text: str, prefix: str) -> list[str]:
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, text  # printed once, by rank 0
    return re.findall(r"\d+\.\d+%|\(\d+ images\)", lines[0])


@pytest.mark.slow
def test_linear_test_and_knn_on_two_processes_equal_one(odd_toy: tuple[Path, list[str]]) -> None:
    root, overrides = odd_toy
    pretrained = ["--pretrained", str(root / "resnet18.pth")]
    runs = {}
    for n, batch in ((1, 16), (2, 8)):  # the same global batch of 16
        wd = root / f"linear_{n}"
        proc = _run(["linear", "--config", str(LINEAR_IN1K), *pretrained, *overrides, f"data.batch_size={batch}",
                     "--work-dir", str(wd)], root, n)
        assert "2 x 8 images/step" in proc.stderr if n == 2 else "1 x 16 images/step" in proc.stderr
        test = _run(["test", "--config", str(LINEAR_IN1K), *overrides, "model.num_classes=4",
                     f"data.batch_size={batch}", "--checkpoint", str(wd / "last.pt")], root, n)
        knn = _run(["knn", "--config", str(LINEAR_IN1K), *pretrained, *overrides, "data.batch_size=4"], root, n)
        losses = [r["loss"] for r in read_metrics(wd) if r.get("event") == "epoch"]
        assert len(losses) == 2 and losses[1] != losses[0]
        runs[n] = (torch.load(wd / "last.pt", weights_only=True), _figures(proc.stdout, "linear eval:"),
                   _figures(test.stdout, "test:"), _figures(knn.stdout, "kNN"))
    (one, lin1, test1, knn1), (two, lin2, test2, knn2) = runs[1], runs[2]
    assert one["model"]["fc.bias"].abs().max() > 1e-6  # it trained (the bias starts at 0)
    # the head of 2 x 8 equals that of 1 x 16 to float rounding (measured: 0 and 2e-10)
    for key in ("fc.weight", "fc.bias"):
        diff = (one["model"][key] - two["model"][key]).abs().max().item()
        assert diff <= 1e-5, (key, diff)
    assert test1 == test2 and test1[-1] == "(15 images)"  # every val image once, none twice
    assert lin1 == lin2 and knn1 == knn2, (lin1, lin2, knn1, knn2)


def test_sharded_knn_merges_to_the_single_process_vote() -> None:
    """The merge of per-shard neighbours, without processes: shards of a bank searched apart
    and merged give the whole bank's scores."""
    from fastsiam.knn import knn_neighbours, knn_predict, knn_vote

    g = torch.Generator().manual_seed(0)
    bank, labels, queries = torch.randn(41, 8, generator=g), torch.randint(0, 5, (41,), generator=g), torch.randn(7, 8, generator=g)
    whole = knn_predict(bank, labels, queries, num_classes=5, k=10, temperature=0.1)
    parts = [knn_neighbours(bank[r::3], labels[r::3], queries, k=10) for r in range(3)]
    sims = torch.cat([p[0] for p in parts], dim=1)
    labs = torch.cat([p[1] for p in parts], dim=1)
    top, pick = sims.topk(10, dim=1)
    torch.testing.assert_close(knn_vote(top, labs.gather(1, pick), 5, 0.1), whole)
