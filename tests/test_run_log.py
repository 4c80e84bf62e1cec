"""Run records (fastsiam.run_log): metrics.jsonl, TensorBoard events, progress lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_trainer import records, train

from fastsiam.run_log import ProgressLines


def test_tensorboard_events_hold_the_metrics_of_the_run(toy_imagenet: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wd = tmp_path / "run"
    train(toy_imagenet, wd, **{"output.tensorboard": True, "train.log_every": 1})
    events = EventAccumulator(str(wd / "tb"))  # TensorBoard's own reader
    events.Reload()
    steps = [r for r in records(wd) if "loss" in r]
    assert len(steps) == 6  # 2 epochs x 3 steps, one record each
    for key in ("loss", "z_std", "lr", "images_per_s"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in steps], key


def test_progress_lines_count_rate_and_eta(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("fastsiam.run_log.time.perf_counter", lambda: now[0])
    bar = ProgressLines(total=1000, initial=0, desc="train", interval=10.0)
    now[0] = 102.0
    bar.update(100)                 # 2 s after the last line: below the interval, no line
    bar.set_postfix(loss="0.5000")  # 100 images in 2 s: 50 img/s, 900 left: 18 s
    now[0] = 114.0
    bar.update(500)                 # 12 s since the last line: one, 600 in 14 s, 400 left
    now[0] = 115.0
    bar.close()
    bar.close()  # once only
    assert capsys.readouterr().err.splitlines() == [
        "train: 100/1,000 img (10%), 50.0 img/s, ETA 0:18, loss=0.5000",
        "train: 600/1,000 img (60%), 42.9 img/s, ETA 0:09, loss=0.5000",
        "train: 600/1,000 img (60%), 40.0 img/s, ETA 0:10, loss=0.5000",
    ]
