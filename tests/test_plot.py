"""``fastsiam plot``: the panels tell a pretrain run from a linear one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from fastsiam.config import Config
from fastsiam.plot import run_figures
from fastsiam.run_log import CONFIG_FILE, RunLogger

# Rows as fastsiam.linear.train_linear logs them: one per epoch (a resume adds an event row).
LINEAR_ROWS = [
    {"event": "epoch", "epoch": 1, "step": 3, "loss": 1.39, "lr": 0.1, "top1": 25.0, "top5": 100.0},
    {"event": "resumed", "from": "run/last.pt", "epoch": 1},
    {"event": "epoch", "epoch": 2, "step": 6, "loss": 1.21, "lr": 0.05, "top1": 43.75, "top5": 100.0},
]
# Rows as fastsiam.trainer logs them: train.log_every windows (with the online probe's loss),
# a kNN event, the online probe's epoch event, the end.
PRETRAIN_ROWS = [
    {"epoch": 0, "step": 2, "loss": -0.21, "z_std": 0.041, "skipped_steps": 0, "corrupt_samples": 0,
     "z_std_healthy": 0.0625, "lr": 0.05, "images_per_s": 118.0, "data_wait": 0.2, "probe_loss": 2.3},
    {"epoch": 0, "step": 4, "loss": -0.35, "z_std": 0.052, "skipped_steps": 0, "corrupt_samples": 0,
     "z_std_healthy": 0.0625, "lr": 0.04, "images_per_s": 131.5, "data_wait": 0.1, "probe_loss": 2.1},
    {"event": "knn", "label": "epoch 1", "epoch": 1, "step": 4, "knn_top1": 31.25, "knn_top5": 87.5},
    {"event": "online_probe", "epoch": 1, "step": 4, "probe_top1": 37.5, "probe_top5": 93.75,
     "probe_num_samples": 16},
    {"event": "finished", "epoch": 1, "step": 4},
]


def make_run(wd: Path, rows: list[dict], task: str | None) -> Path:
    """A run directory as the trainer leaves it: resolved config.yaml (``task=None``: one written
    before configs had the key) and metrics.jsonl written by the real logger."""
    wd.mkdir()
    if task is not None:
        (wd / CONFIG_FILE).write_text(Config(task=task).to_yaml())
    logger = RunLogger(wd)
    for row in rows:
        logger.log(row)
    return wd


def labels(figs: dict) -> dict[str, tuple[str, str, str]]:
    """Each figure's single axes as (title, x label, y label)."""
    assert all(len(fig.axes) == 1 for fig in figs.values())
    return {k: (f.axes[0].get_title(), f.axes[0].get_xlabel(), f.axes[0].get_ylabel()) for k, f in figs.items()}


def line(fig) -> tuple[list[float], list[float]]:
    (ln,) = fig.axes[0].get_lines()
    return list(ln.get_xdata()), list(ln.get_ydata())


@pytest.mark.parametrize("task", ["linear", None])  # None: told from the metrics rows
def test_a_linear_run_plots_cross_entropy_and_val_accuracy(tmp_path: Path, task: str | None) -> None:
    figs = dict(run_figures(make_run(tmp_path / "run", LINEAR_ROWS, task)))
    assert list(figs) == ["loss", "top1", "top5", "lr"]
    text = labels(figs)
    assert text["loss"][2] == "cross-entropy" and "cross-entropy" in text["loss"][0]
    assert not any("SimSiam" in s or "cosine" in s for t in text.values() for s in t)
    assert all(t[1] == "epoch" for t in text.values())
    assert "top-1" in text["top1"][0] and "top-5" in text["top5"][0]
    assert line(figs["top1"]) == ([1, 2], [25.0, 43.75])
    assert line(figs["top5"]) == ([1, 2], [100.0, 100.0])
    assert line(figs["loss"]) == ([1, 2], [1.39, 1.21])


def test_a_linear_run_without_val_scores_draws_no_accuracy_axes(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k not in ("top1", "top5")} for r in LINEAR_ROWS]
    figs = dict(run_figures(make_run(tmp_path / "run", rows, "linear")))
    assert list(figs) == ["loss", "lr"]
    assert labels(figs)["loss"][2] == "cross-entropy"


@pytest.mark.parametrize("task", ["pretrain", None])
def test_a_pretrain_run_keeps_its_panels(tmp_path: Path, task: str | None) -> None:
    figs = dict(run_figures(make_run(tmp_path / "run", PRETRAIN_ROWS, task)))
    assert list(figs) == ["loss", "z_std", "lr", "images_per_s", "knn_top1", "probe_top1", "probe_loss"]
    text = labels(figs)
    assert text["loss"] == ("SimSiam loss", "step", "negative cosine")
    assert text["probe_top1"] == ("online linear probe: val top-1", "step", "%")
    assert line(figs["loss"]) == ([2, 4], [-0.21, -0.35])
    assert line(figs["knn_top1"]) == ([4], [31.25])
    assert line(figs["probe_top1"]) == ([4], [37.5]) and line(figs["probe_loss"]) == ([2, 4], [2.3, 2.1])
    # z-std draws the healthy level 1/sqrt(dim) = 1/sqrt(256) as a dashed line beside the data
    data, healthy = figs["z_std"].axes[0].get_lines()
    assert list(data.get_ydata()) == [0.041, 0.052] and list(healthy.get_ydata()) == [0.0625, 0.0625]


def test_a_bad_task_in_config_is_one_line(tmp_path: Path) -> None:
    wd = make_run(tmp_path / "run", LINEAR_ROWS, None)
    (wd / CONFIG_FILE).write_text("task: finetune\n")
    with pytest.raises(ValueError) as e:
        run_figures(wd)
    assert str(e.value) == f"{wd / CONFIG_FILE}: task='finetune'; expected one of pretrain, linear"


def test_plot_cli_writes_a_linear_runs_pngs(tmp_path: Path) -> None:
    wd = make_run(tmp_path / "run", LINEAR_ROWS, "linear")
    proc = subprocess.run([sys.executable, "-m", "fastsiam", "plot", str(wd)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = ["loss", "top1", "top5", "lr"]
    assert proc.stdout.split() == [str(wd / "plots" / f"{n}.png") for n in names]
    assert sorted(p.name for p in (wd / "plots").iterdir()) == sorted(f"{n}.png" for n in names)
    for n in names:
        height, width, _ = imread(wd / "plots" / f"{n}.png").shape  # a real PNG, 6 x 3.5 in at 100 dpi
        assert (width, height) == (600, 350)
