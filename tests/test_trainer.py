"""The trainer end to end on the toy ImageNet (CPU): learning, exact resume, faults, records.

Small settings throughout: ResNet-18 at 32 px, batch 16, the conftest's toy ImageNet (48 train
images, so 3 steps per epoch), no loader worker processes.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastsiam.checkpoint import load_checkpoint, save_checkpoint
from fastsiam.cli import main
from fastsiam.config import load_config
from fastsiam.trainer import Trainer, TrainingError

REPO = Path(__file__).resolve().parent.parent


def toy_overrides(toy: Path, **extra: object) -> list[str]:
    base = {
        "data.backend": "pil", "data.train_path": str(toy / "train"), "data.val_path": str(toy / "val"),
        "data.batch_size": 16, "data.workers": 0, "data.image_size": 32,
        "model.backbone": "resnet18", "model.dim": 64, "model.pred_dim": 16,
        "model.sync_bn": False, "optim.lr": 8.0, "train.epochs": 2, "train.amp": "none",
        "train.device": "cpu", "train.log_every": 2, "train.deterministic": True,
        "eval.knn_every": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train(toy: Path, work_dir: Path, resume: str | None = None, resume_changed: bool = False,
          **extra: object) -> Trainer:
    cfg = load_config(None, toy_overrides(toy, **extra))
    trainer = Trainer(cfg, work_dir=work_dir, resume=resume, resume_changed=resume_changed)
    trainer.result = trainer.fit()  # type: ignore[attr-defined]
    return trainer


def records(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_short_training_lowers_loss_without_collapse(toy_imagenet: Path, tmp_path: Path) -> None:
    t = train(toy_imagenet, tmp_path / "run", **{"train.epochs": 4, "train.log_every": 1})
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 4 * 3
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.05, (first, last)
    # collapse monitor: healthy is ~1/sqrt(64) = 0.125; a collapsed run falls toward 0
    assert all(r["z_std"] > 0.25 / 8 for r in steps), [r["z_std"] for r in steps]
    assert {"lr", "images_per_s", "data_wait", "epoch", "step"} <= steps[0].keys()
    assert t.result.finished and t.result.step == 12


def test_run_directory_contents(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    train(toy_imagenet, wd, **{"train.epochs": 3, "output.keep_last": 2})
    names = sorted(p.name for p in wd.iterdir())
    # no best.pt: without the kNN monitor nothing measured which epoch is best
    assert names == [".fastsiam.lock", "config.yaml", "epoch_0002.pt", "epoch_0003.pt", "metrics.jsonl"]
    saved = load_config(wd / "config.yaml")
    assert saved.train.epochs == 3 and saved.data.batch_size == 16
    state = load_checkpoint(wd / "epoch_0003.pt")          # weights_only=True
    assert state["epoch"] == 3 and state["step"] == 9
    assert state["config"]["model"]["dim"] == 64
    assert {"model", "optimizer", "rng", "loader", "step_state"} <= state.keys()
    # the lr follows the cosine per step from the peak 8.0 * 16/256 = 0.5 (records every 2 steps)
    lrs = [r["lr"] for r in records(wd) if "lr" in r]
    assert lrs[0] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 1 / 9)))
    assert lrs[-1] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 8 / 9)))


def test_best_is_the_top_knn_epoch_and_a_hard_link(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    t = train(toy_imagenet, wd, **{"train.epochs": 3, "eval.knn_every": 1, "eval.knn_k": 5})
    knn = {r["epoch"]: r["knn_top1"] for r in records(wd) if r.get("event") == "knn" and r["label"] != "random init"}
    best_epoch = max(knn, key=lambda e: (knn[e], -e))  # the first epoch reaching the top score
    best = wd / "best.pt"
    assert load_checkpoint(best)["epoch"] == best_epoch and t.best_metric == knn[best_epoch]
    epoch_file = wd / f"epoch_{best_epoch:04d}.pt"
    assert best.stat().st_ino == epoch_file.stat().st_ino and best.stat().st_nlink == 2
    # A save with nothing trained since the last one (a stop right after an epoch) is a link too.
    again = t._save(f"step_{t.step:08d}.pt", prune=False)
    assert again is not None and again.stat().st_ino == (wd / "epoch_0003.pt").stat().st_ino


def test_resume_at_epoch_boundary_is_exact(toy_imagenet: Path, tmp_path: Path) -> None:
    straight = train(toy_imagenet, tmp_path / "a")
    train(toy_imagenet, tmp_path / "b", **{"train.max_steps": 3})    # exactly one epoch
    assert sorted(p.name for p in (tmp_path / "b").glob("*.pt")) == ["epoch_0001.pt"]
    resumed = train(toy_imagenet, tmp_path / "b", resume="auto")
    assert resumed.result.step == 6
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())


def test_resume_mid_epoch_is_exact(toy_imagenet: Path, tmp_path: Path) -> None:
    straight = train(toy_imagenet, tmp_path / "a")
    part = train(toy_imagenet, tmp_path / "b", **{"train.max_steps": 5})
    assert part.result.stopped_by == "max_steps"
    assert (tmp_path / "b" / "step_00000005.pt").is_file()
    resumed = train(toy_imagenet, tmp_path / "b", resume="auto")
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    # the online probe (on: the toy has labels and a val split) resumes exactly too
    assert_same_state(straight.probe.head.state_dict(), resumed.probe.head.state_dict())
    for p, q in zip(straight.probe.head.parameters(), resumed.probe.head.parameters()):
        assert torch.equal(straight.probe.optimizer.state[p]["momentum_buffer"],
                           resumed.probe.optimizer.state[q]["momentum_buffer"])


def test_corrupt_newest_checkpoint_is_skipped(toy_imagenet: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wd = tmp_path / "run"
    straight = train(toy_imagenet, tmp_path / "a")
    train(toy_imagenet, wd, **{"train.max_steps": 3})
    newest = wd / "step_00000009.pt"   # looks newer than epoch_0001.pt but is truncated
    data = (wd / "epoch_0001.pt").read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    resumed = train(toy_imagenet, wd, resume="auto")
    assert "step_00000009.pt" in caplog.text and "skipping" in caplog.text
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())


def test_work_dir_states_are_refused_clearly(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    train(toy_imagenet, wd, **{"train.epochs": 1})
    with pytest.raises(TrainingError, match=r"already holds a run .* --resume auto"):
        train(toy_imagenet, wd, **{"train.epochs": 1})
    with pytest.raises(TrainingError, match="already holds a finished run"):
        train(toy_imagenet, wd, resume="auto", **{"train.epochs": 1})


def test_read_only_work_dir(toy_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root (CI), which ignores permission bits: make mkdir fail as it would.
    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(TrainingError, match=r"^work dir .*ro is not writable: Permission denied$"):
        train(toy_imagenet, tmp_path / "ro", **{"train.epochs": 1})


def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk mid-save: a clear error, the previous file intact, no partial file left."""
    from fastsiam.checkpoint import CheckpointError

    path = tmp_path / "epoch_0001.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def full_disk(obj: object, f: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"no space left .* previous checkpoint is intact"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0001.pt"]
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))


def test_nonfinite_loss_stops_with_the_step_and_a_debug_checkpoint(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss \((nan|inf)\) at step (\d+) ") as e:
        train(toy_imagenet, wd, **{"optim.lr": 1e12, "train.log_every": 1})   # diverges
    step = int(e.value.args[0].split(" at step ")[1].split()[0])
    events = [r for r in records(wd) if r.get("event") == "nonfinite"]
    assert events and events[0]["step"] == step
    # every loss logged before that step was finite: the first bad step is the one named
    assert all(r["loss"] is not None for r in records(wd) if "loss" in r and r["step"] < step)
    assert load_checkpoint(wd / "debug_nonfinite.pt")["step"] >= step


def test_sigterm_checkpoints_and_resume_matches(toy_imagenet: Path, tmp_path: Path) -> None:
    """Preemption: SIGTERM mid-run exits 0 with a checkpoint; --resume auto finishes the run
    with the same parameters as an uninterrupted one."""
    straight = train(toy_imagenet, tmp_path / "a", **{"train.epochs": 3, "train.log_every": 1})
    wd = tmp_path / "b"
    config = tmp_path / "same.yaml"  # exactly the uninterrupted run's config
    config.write_text(load_config(None, toy_overrides(toy_imagenet, **{"train.epochs": 3, "train.log_every": 1})).to_yaml())
    cmd = [sys.executable, "-m", "fastsiam", "train", "--config", str(config), "--work-dir", str(wd)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (wd / "metrics.jsonl").is_file():
        time.sleep(0.05)
    assert (wd / "metrics.jsonl").is_file(), proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    stopped = [r for r in records(wd) if r.get("event") == "stopped"]
    assert stopped and stopped[0]["reason"] == "signal"
    resumed = train(toy_imagenet, wd, resume="auto", **{"train.epochs": 3, "train.log_every": 1})
    assert resumed.result.finished and resumed.result.step == 9
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())


def test_plot_command_writes_pngs(toy_imagenet: Path, tmp_path: Path) -> None:
    wd = tmp_path / "run"
    train(toy_imagenet, wd, **{"train.epochs": 1})
    assert main(["plot", str(wd)]) == 0
    pngs = sorted(p.name for p in (wd / "plots").glob("*.png"))
    assert pngs == ["images_per_s.png", "loss.png", "lr.png", "probe_loss.png", "probe_top1.png", "z_std.png"]
    assert all((wd / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fastsiam train: error: {tmp_path / 'missing.yaml'}: config file not found"
    cfg = REPO / "configs/simsiam_resnet18_toy-demo.yaml"
    assert main(["train", "--config", str(cfg), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fastsiam train: error: ffcv loader: data path {tmp_path / 'nope'} does not exist"


def test_print_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = REPO / "configs/simsiam_resnet18_toy-demo.yaml"
    assert main(["train", "--config", str(cfg), "--print-config", "optim.lr=0.3", "--max-steps", "5"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    again = load_config(printed)  # the printed text is a complete, valid config
    assert again.optim.lr == 0.3 and again.train.max_steps == 5
    assert again.to_dict() == load_config(cfg, ["optim.lr=0.3", "train.max_steps=5"]).to_dict()


def test_nonfinite_skip_leaves_the_weights_untouched(toy_imagenet: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """on_nonfinite=skip: a NaN loss at step 2 skips exactly that update, the run goes on."""
    from fastsiam import step as step_module

    calls = {"n": 0}
    real = step_module.simsiam_loss

    def nan_at_step_2(*args: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(step_module, "simsiam_loss", nan_at_step_2)
    cfg = load_config(None, toy_overrides(toy_imagenet, **{"train.epochs": 1, "train.max_steps": 2,
                                                           "train.on_nonfinite": "skip", "train.log_every": 1}))
    trainer = Trainer(cfg, work_dir=tmp_path / "run")
    before_step_2 = {}

    real_call = trainer.step_fn._run

    def spy(batch: object) -> object:
        if calls["n"] == 1:  # the first step is done: keep the weights step 2 starts from
            before_step_2.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return real_call(batch)

    trainer.step_fn._run = spy  # type: ignore[method-assign]
    result = trainer.fit()
    assert result.step == 2
    after = trainer.model.state_dict()
    params = {n for n, _ in trainer.model.named_parameters()}
    assert all(torch.equal(before_step_2[k], after[k]) for k in params)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
