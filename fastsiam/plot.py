"""``fastsiam plot WORK_DIR``: PNG plots of a run's metrics.

A pretrain run (``fastsiam train``) gets SimSiam loss, z-std, lr, images/s, kNN top-1 and the
online probe's val top-1 and train cross-entropy; a linear run (``fastsiam linear``) gets its
cross-entropy, val top-1/top-5 and lr.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from fastsiam.run_log import CONFIG_FILE, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# task -> (x key, [(metric key in metrics.jsonl, title, y label)])
PANELS = {
    "pretrain": ("step", [
        ("loss", "SimSiam loss", "negative cosine"),
        ("z_std", "collapse monitor: std of l2-normalized z", "z-std"),
        ("lr", "learning rate", "lr"),
        ("images_per_s", "throughput", "images/s"),
        ("knn_top1", "kNN top-1 on val", "%"),
        ("probe_top1", "online linear probe: val top-1", "%"),
        ("probe_loss", "online linear probe: train cross-entropy", "cross-entropy"),
    ]),
    "linear": ("epoch", [
        ("loss", "linear classifier: train cross-entropy", "cross-entropy"),
        ("top1", "linear classifier: val top-1", "%"),
        ("top5", "linear classifier: val top-5", "%"),
        ("lr", "learning rate", "lr"),
    ]),
}


def run_task(work_dir: str | Path, records: list[dict]) -> str:
    """``pretrain`` or ``linear``: the ``task`` of the run's resolved config, else (a config from
    before the key) told by the per-epoch rows only ``fastsiam linear`` logs."""
    path = Path(work_dir) / CONFIG_FILE
    if path.is_file():
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {getattr(e, 'problem', None) or e}") from e
        task = raw.get("task") if isinstance(raw, dict) else None
        if task is not None:
            if task not in PANELS:
                raise ValueError(f"{path}: task={task!r}; expected one of {', '.join(PANELS)}")
            return task
    return "linear" if any(r.get("event") == "epoch" for r in records) else "pretrain"


def run_figures(work_dir: str | Path) -> list[tuple[str, Figure]]:
    """One figure per metric present in ``work_dir/metrics.jsonl``, as ``(metric key, figure)``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("fastsiam plot needs matplotlib: pip install 'fastsiam[plot]'") from e
    records = read_metrics(work_dir)
    xkey, panels = PANELS[run_task(work_dir, records)]
    figures = []
    for key, title, ylabel in panels:
        pts = [(r[xkey], r[key]) for r in records if r.get(key) is not None and xkey in r]
        if not pts:
            continue
        xs, values = zip(*pts)
        # a Figure on its own Agg canvas, not pyplot: no global backend switch, nothing to close
        fig = Figure(figsize=(6, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(xs, values, marker="o" if len(pts) < 20 else None, linewidth=1.5)
        if key == "z_std":
            healthy = next((r["z_std_healthy"] for r in records if r.get("z_std_healthy")), None)
            if healthy:
                ax.axhline(healthy, color="gray", linestyle="--", linewidth=1, label="1/sqrt(dim)")
                ax.legend()
        ax.set(title=title, xlabel=xkey, ylabel=ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        figures.append((key, fig))
    if not figures:
        raise ValueError(f"{Path(work_dir) / 'metrics.jsonl'}: no {xkey} metrics to plot yet")
    return figures


def plot_run(work_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per metric present in ``work_dir/metrics.jsonl``; return their paths."""
    figures = run_figures(work_dir)
    out = Path(out_dir) if out_dir else Path(work_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, fig in figures:
        path = out / f"{key}.png"
        fig.savefig(path)
        written.append(path)
    return written
