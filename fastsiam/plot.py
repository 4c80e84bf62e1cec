"""``fastsiam plot WORK_DIR``: PNG plots of a run's metrics (loss, z-std, lr, images/s, kNN)."""

from __future__ import annotations

from pathlib import Path

from fastsiam.metrics import read_metrics

# (metric key in metrics.jsonl, title, y label)
PANELS = [
    ("loss", "SimSiam loss", "negative cosine"),
    ("z_std", "collapse monitor: std of l2-normalized z", "z-std"),
    ("lr", "learning rate", "lr"),
    ("images_per_s", "throughput", "images/s"),
    ("knn_top1", "kNN top-1 on val", "%"),
]


def plot_run(work_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per metric present in ``work_dir/metrics.jsonl``; return their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("fastsiam plot needs matplotlib: pip install 'fastsiam[plot]'") from e
    records = read_metrics(work_dir)
    out = Path(out_dir) if out_dir else Path(work_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title, ylabel in PANELS:
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
        if not pts:
            continue
        steps, values = zip(*pts)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, values, marker="o" if len(pts) < 20 else None, linewidth=1.5)
        if key == "z_std":
            healthy = next((r["z_std_healthy"] for r in records if r.get("z_std_healthy")), None)
            if healthy:
                ax.axhline(healthy, color="gray", linestyle="--", linewidth=1, label="1/sqrt(dim)")
                ax.legend()
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    if not written:
        raise ValueError(f"{Path(work_dir) / 'metrics.jsonl'}: no step metrics to plot yet")
    return written
