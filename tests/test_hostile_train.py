"""Hostile and unlucky cases for training runs: non-finite steps, two runs on one work dir,
debris of a killed run, a full disk and a read-only work dir (issue 14's trainer cases).

Each case failed before its fix: a skipped step kept the NaN BatchNorm statistics of its
forward and nothing capped the skips; a NaN epoch became best; two trainers shared a work dir;
``.partial`` files of a kill -9 stayed forever; ``torch.save`` on a full disk surfaced as a
RuntimeError traceback; a read-only work dir as an OSError traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hostile_helpers import small_disk
from test_step import make_batch, make_model, make_optimizer, normalize
from test_trainer import REPO, records, toy_overrides, train

from fastsiam.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastsiam.config import load_config
from fastsiam.step import build_step
from fastsiam.trainer import LOCK_FILE, TrainingError


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            state[f"momentum.{i}"] = buf.clone()
    return state


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_a_skipped_step_leaves_every_state_as_it_was(optimizer: str) -> None:
    model = make_model()
    opt = make_optimizer(model, lr=0.05, name=optimizer)
    poisoned = {"on": False}

    def augment(batch):
        v1, v2 = normalize(batch)
        return (v1 * math.nan, v2) if poisoned["on"] else (v1, v2)

    step = build_step(model, opt, augment, device="cpu", amp="none", skip_nonfinite=True)
    step(make_batch(seed=0))                    # a good step: momentum buffers exist now
    before = _state(model, opt)
    poisoned["on"] = True
    out = step(make_batch(seed=1))              # NaN forward: BN statistics, grads, loss
    assert not torch.isfinite(out.loss)
    after = _state(model, opt)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], changed               # weights, momentum, BN mean/var/count
    poisoned["on"] = False
    step(make_batch(seed=2))
    bn = model.backbone.bn1
    assert int(bn.num_batches_tracked) == int(before["model.backbone.bn1.num_batches_tracked"]) + 2
    assert not torch.equal(bn.running_mean, before["model.backbone.bn1.running_mean"])


def test_consecutive_skips_stop_the_run(toy_imagenet: Path, tmp_path: Path) -> None:
    """optim.lr=1e30: step 1's update blows the weights up, every later loss is NaN and
    skipped; after train.max_skipped_steps of them the run stops as ``stop`` does, and its
    debug checkpoint holds the (finite) BatchNorm statistics of before the skips."""
    wd = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"^3 non-finite losses in a row up to step 4 .*"
                                             r"max_skipped_steps=3\); wrote .*debug_nonfinite.pt"):
        train(toy_imagenet, wd, **{"optim.lr": 1e30, "train.log_every": 1, "train.epochs": 3,
                                   "train.on_nonfinite": "skip", "train.max_skipped_steps": 3})
    state = load_checkpoint(wd / "debug_nonfinite.pt")
    assert state["step"] == 4 and state["skipped_in_a_row"] == 3
    stats = [v for k, v in state["model"].items() if "running_" in k]
    assert stats and all(torch.isfinite(v).all() for v in stats)


def test_an_all_skipped_epoch_never_becomes_best(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    t = train(toy_imagenet, wd, **{"optim.lr": 1e30, "train.epochs": 2, "train.log_every": 1,
                                   "train.on_nonfinite": "skip", "train.max_skipped_steps": 100,
                                   "eval.knn_every": 1})
    assert t.result.finished
    knn = [r["knn_top1"] for r in records(wd) if r.get("event") == "knn" and r["epoch"] > 0]
    best = load_checkpoint(wd / "best.pt")
    # epoch 2 changed no weight (every step skipped): its equal kNN score keeps epoch 1 best
    assert knn[0] == knn[1] and best["epoch"] == 1 and best["best_metric"] == knn[0]
    assert load_checkpoint(wd / "epoch_0002.pt")["best_metric"] == best["best_metric"]


# ------------------------------------------------------------------------------ the work dir

_HOLD = """
import sys, time
from fastsiam.files import exclusive_lock
with exclusive_lock(sys.argv[1], "work dir"):
    print("locked", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def lock_held_elsewhere(work_dir: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the work dir's lock; SIGKILLed at the end (the kernel then
    drops its lock)."""
    work_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(work_dir / LOCK_FILE)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_second_trainer_on_the_work_dir_is_refused_until_the_first_dies(
        toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    with lock_held_elsewhere(wd) as holder:
        with pytest.raises(TrainingError, match=rf"^work dir {wd} is in use by another process "
                                                 rf"\(PID {holder.pid}, .*use another --work-dir$"):
            train(toy_imagenet, wd, **{"train.epochs": 1})
        assert not (wd / "metrics.jsonl").exists()  # the refused run wrote nothing
    assert train(toy_imagenet, wd, **{"train.epochs": 1}).result.finished


def test_a_killed_runs_partial_files_are_removed(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    wd.mkdir()
    debris = [wd / ".epoch_0001.pt.x1y2z3.partial", wd / ".config.yaml.abc.partial"]
    for p in debris:
        p.write_bytes(b"\0" * 1000)
    (wd / ".shards.partial").mkdir()  # to_dali's staging folder of a run in progress: kept
    train(toy_imagenet, wd, **{"train.epochs": 1})
    assert not any(p.exists() for p in debris)
    assert [p.name for p in wd.glob(".*.partial")] == [".shards.partial"]


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """A real full disk (a 1 MiB tmpfs): torch.save reports ENOSPC as a RuntimeError without
    the errno; the error says what happened, and the previous checkpoint is intact."""
    with small_disk(tmp_path / "disk", 1024) as disk:
        path = disk / "epoch_0001.pt"
        save_checkpoint({"step": 1, "w": torch.ones(16)}, path)
        with pytest.raises(CheckpointError, match=r"^.*epoch_0001.pt: no space left on the device "
                                                  r"while saving; the previous checkpoint is intact$"):
            save_checkpoint({"step": 2, "w": torch.zeros(1 << 20)}, path)  # 4 MiB
        assert [p.name for p in disk.iterdir()] == ["epoch_0001.pt"]
        assert torch.equal(load_checkpoint(path)["w"], torch.ones(16))


def test_a_read_only_work_dir_is_one_line(toy_imagenet: Path, tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 256) as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(TrainingError, match=rf"^work dir {disk / 'run'} is not writable: "
                                                 r"Read-only file system$"):
            train(toy_imagenet, disk / "run", **{"train.epochs": 1})


def test_the_cli_says_it_in_one_line(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    with lock_held_elsewhere(wd) as holder:
        config = tmp_path / "toy.yaml"
        config.write_text(load_config(None, toy_overrides(toy_imagenet, **{"train.epochs": 1})).to_yaml())
        cmd = [sys.executable, "-m", "fastsiam", "train", "--config", str(config), "--work-dir", str(wd)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == [f"fastsiam train: error: work dir {wd} is in use by another process "
                     f"(PID {holder.pid}, lock {wd / LOCK_FILE}); wait for it or use another --work-dir"]
    assert "Traceback" not in proc.stderr
