"""Render BENCHMARKS.md from every result in benchmarks/results/, with PNG plots.

One section per result file (a benchmark on a device, one run): how it was run, a table of
every row with its ratio against the run's own baseline, a bar chart of images/s per variant
(median, min-max whiskers) and, when rows carry a ``workers`` dimension (loaders, convert),
images/s against worker count. Ratios are only ever taken within one run; absolute numbers
are quoted with the device they came from. Files that break the schema
(:func:`benchmarks._harness.validate_result`) are listed with the reason, not rendered.

    python benchmarks/report.py                       # -> BENCHMARKS.md, benchmarks/plots/
    python benchmarks/report.py --results /tmp/out --out /tmp/BENCHMARKS.md --plots /tmp/plots
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._harness import (  # noqa: E402
    RESULTS_DIR,
    ResultError,
    baseline_row,
    is_count_row,
    load_result,
)

ORDER = ["end_to_end", "step", "augment", "loaders", "convert"]
# Columns shown besides variant / images/s / min-max / ratio; other benchmarks show every scalar.
COLUMNS = {
    "end_to_end": ["data_wait", "bound", "of_ceiling", "overlap", "ms_per_batch", "mode", "amp",
                   "optimizer", "torch_threads", "peak_memory_mb"],
    "step": ["tflops", "mode", "amp", "optimizer", "peak_memory_mb", "probe_share"],
}
HIDDEN = {"variant", "items_per_s", "items_per_s_min", "items_per_s_max", "seconds_per_call",
          "repeats", "iters", "warmup", "samples"}
TARGET_IMAGES_PER_S = 3600  # per H100, two views each: MLPerf ResNet-50's ~18% of bf16 peak (docs/scaling.md)
TARGET_OF_STEP = 0.95


class Result:
    """One loaded result file and the names it is rendered under."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data
        self.benchmark: str = data["benchmark"]
        self.stem = path.stem

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    def sort_key(self) -> tuple[int, str, str]:
        b = self.benchmark
        return (ORDER.index(b) if b in ORDER else len(ORDER), b, self.data["device_name"])


def load_all(results: Path) -> tuple[list[Result], list[str]]:
    """Valid results, sorted for the report, and one line per file that was left out."""
    good, bad = [], []
    for path in sorted(results.glob("*.json")):
        try:
            good.append(Result(path, load_result(path)))
        except ResultError as e:
            bad.append(str(e))
    return sorted(good, key=Result.sort_key), bad


# ------------------------------------------------------------------------------------ tables


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v).replace("|", "\\|")


def columns(result: Result) -> list[str]:
    present = {k for r in result.rows for k, v in r.items() if _scalar(v)} - HIDDEN
    wanted = COLUMNS.get(result.benchmark)
    if wanted is not None:
        return [c for c in wanted if c in present]
    return sorted(present)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def count_table(result: Result) -> str:
    """Counted device traffic (fake CUDA): kernels, bytes and their time at the stated bandwidth."""
    bandwidth = result.data["settings"].get("bandwidth_GBps")
    fixed = {"variant", "kernels", "device_bytes", "ms_at_bandwidth"}
    extra = sorted({k for r in result.rows for k, v in r.items() if k not in fixed and _scalar(v)})
    head = ["variant", "kernels", "GB moved", f"ms at {fmt(bandwidth)} GB/s", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in result.rows:
        cells = [fmt(r["variant"]), str(r["kernels"]), f"{r['device_bytes'] / 1e9:.3f}",
                 f"{r['ms_at_bandwidth']:.2f}", *(fmt(r.get(k)) for k in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(result: Result) -> str:
    if result.rows and all(is_count_row(r) for r in result.rows):
        return count_table(result)
    base = baseline_row(result.data)
    cols = columns(result)
    head = ["variant", "images/s", "min–max", *(["× baseline"] if base else []), *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in result.rows:
        cells = [fmt(r["variant"]), f"{r['items_per_s']:,.1f}",
                 f"{r['items_per_s_min']:,.1f}–{r['items_per_s_max']:,.1f}"]
        if base:  # rows of another kind (e.g. a ceiling next to a training run) get no ratio
            same = r.get("kind") == base.get("kind")
            cells.append(f"{r['items_per_s'] / base['items_per_s']:.2f}" if same else "–")
        cells += [fmt(r.get(c)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_run(result: Result) -> str:
    d = result.data
    v = d["versions"]
    versions = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    timing = sorted({(r["repeats"], r["iters"], r["warmup"]) for r in result.rows if not is_count_row(r)})
    timed = "; ".join(f"{rep} repeats x {it} calls after {w} warm-up" for rep, it, w in timing)
    settings = {k: x for k, x in d["settings"].items() if _scalar(x)}
    lines = [
        f"- run: {d['date']}, commit `{d['git_commit']}`, {d['cpu_count']} CPUs, {versions}",
        f"- command: `{d['command']}`",
        f"- settings: {', '.join(f'{k}={fmt(x)}' for k, x in settings.items()) or '–'}",
        f"- timing: {timed or '–'}; baseline: {d['baseline'] or 'none'}",
    ]
    for key in ("skipped", "errors"):
        value = d["settings"].get(key)
        if value:
            items = value.items() if isinstance(value, dict) else ((None, x) for x in value)
            lines.append(f"- {key}: " + "; ".join(f"{k}: {x}" if k else str(x) for k, x in items))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_variants(result: Result, path: Path) -> Path:
    """Horizontal bars of images/s per variant, min-max whiskers, the baseline highlighted."""
    plt = _pyplot()
    rows = result.rows
    names = [r["variant"] for r in rows]
    med = [r["items_per_s"] for r in rows]
    err = [[m - r["items_per_s_min"] for m, r in zip(med, rows)],
           [r["items_per_s_max"] - m for m, r in zip(med, rows)]]
    kinds = sorted({r.get("kind", "") for r in rows})
    palette = ["#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974"]
    colors = [palette[kinds.index(r.get("kind", "")) % len(palette)] for r in rows]
    colors = ["#DD8452" if r["variant"] == result.data["baseline"] else c for r, c in zip(rows, colors)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, med, xerr=err, color=colors, capsize=3)
    ax.set_yticks(y, names, fontsize=8)
    for yi, m, r in zip(y, med, rows):
        ax.text(r["items_per_s_max"], yi, f" {m:,.0f}" if m >= 100 else f" {m:.3g}", va="center",
                fontsize=7)
    log = max(med) / min(med) > 30  # e.g. per-stage rows next to whole pipelines
    if log:
        ax.set_xscale("log")
    if len(kinds) > 1:
        from matplotlib.patches import Patch

        handles = [Patch(color=palette[i % len(palette)], label=k) for i, k in enumerate(kinds)]
        handles.append(Patch(color="#DD8452", label="baseline"))
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("images/s (median, min–max over repeats)" + (", log scale" if log else ""))
    ax.set_title(f"{result.benchmark} — {result.data['device_name']}", fontsize=10)
    ax.margins(x=0.15)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_WORKERS_IN_NAME = re.compile(r"[\s,;(\[]*\b(?:w|workers?)\s*[=:]?\s*\d+[)\]]?", re.IGNORECASE)


def series_of(row: dict[str, Any]) -> str:
    """The line a row belongs to in the workers plot: its backend/converter, else its name."""
    for key in ("series", "backend", "converter", "loader", "method"):
        if isinstance(row.get(key), str):
            return row[key]
    return _WORKERS_IN_NAME.sub("", row["variant"]).strip() or row["variant"]


def has_workers_dimension(result: Result) -> bool:
    values = {r.get("workers") for r in result.rows if isinstance(r.get("workers"), int)}
    return len(values) >= 2


def plot_workers(result: Result, path: Path) -> Path:
    """images/s against workers, one line per series (rows without ``workers`` left out)."""
    plt = _pyplot()
    lines: dict[str, list[tuple[int, float, float, float]]] = {}
    for r in result.rows:
        if isinstance(r.get("workers"), int):
            lines.setdefault(series_of(r), []).append(
                (r["workers"], r["items_per_s"], r["items_per_s_min"], r["items_per_s_max"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in sorted(lines.items()):
        pts.sort()
        w, m, lo, hi = zip(*pts)
        ax.errorbar(w, m, yerr=[[a - b for a, b in zip(m, lo)], [c - a for a, c in zip(m, hi)]],
                    marker="o", capsize=3, label=name)
    ax.set_xlabel("workers")
    ax.set_ylabel("images/s")
    ax.set_xticks(sorted({p[0] for pts in lines.values() for p in pts}))
    ax.set_title(f"{result.benchmark}: images/s vs workers — {result.data['device_name']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


# ------------------------------------------------------------------------------------- goals


def goals(results: Iterable[Result]) -> str:
    """The issue's goals, as measured by the end-to-end results present (not asserted)."""
    out = []
    for res in results:
        if res.benchmark != "end_to_end":
            continue
        rows = {r["variant"]: r for r in res.rows}
        e2e = [r for r in res.rows if r.get("kind") == "end_to_end"]
        real = [r for r in e2e if r.get("backend") != "synthetic"]  # a loader that reads data
        if not real:
            continue
        device = res.data["device_name"]
        best = max(real, key=lambda r: r["items_per_s"])
        step = rows.get(_step_row_name(best, rows))
        cuda = res.data["device"].startswith("cuda")
        line = f"- **{device}** ({res.stem}): best end-to-end `{best['variant']}` {best['items_per_s']:,.0f} images/s"
        if step:
            share = best["items_per_s"] / step["items_per_s"]
            line += f", {share:.0%} of its step alone ({step['items_per_s']:,.0f})"
            if cuda:
                line += f": ≥ 95% goal {'met' if share >= TARGET_OF_STEP else 'not met'}"
        if cuda:
            ok = "met" if best["items_per_s"] >= TARGET_IMAGES_PER_S else "not met"
            line += f"; ≥ {TARGET_IMAGES_PER_S:,} images/s goal {ok}"
        else:
            line += " (no goal here: the loader and the step share the CPU's cores)"
        out.append(line + ".")
        overlaps = [r for r in e2e if r.get("overlap") is not None]
        if not res.data["device"].startswith("cuda") and overlaps:
            out.append("  Time per batch (ms) and the overlap (1: the cheaper side fully hidden, 0: in "
                       "series; above 1, or a run faster than its ceiling, means the machine's load "
                       "changed between the measurements):\n")
            out.append("  | combination | end-to-end | loader alone | step alone | overlap |")
            out.append("  |---|---|---|---|---|")
            for r in overlaps:
                ld = rows.get(f"loader alone: {r.get('backend')}")
                st = rows.get(_step_row_name(r, rows))
                cells = [r, ld, st]
                ms = [f"{c['seconds_per_call'] * 1e3:.0f}" if c else "–" for c in cells]
                out.append(f"  | {fmt(r['variant'])} | {' | '.join(ms)} | {r['overlap']:.2f} |")
    if not out:
        return "No end-to-end results yet: run `python benchmarks/end_to_end.py` (or `benchmarks/gpu_suite.sh`)."
    return "\n".join(out)


def _step_row_name(row: dict[str, Any], rows: dict[str, Any]) -> str:
    float_name = f"step alone: {row.get('step')} (float32 views)"
    uses_float = str(row.get("backend", "")) == "pil_full"
    return float_name if uses_float and float_name in rows else f"step alone: {row.get('step')}"


# ------------------------------------------------------------------------------------ render


HEADER = """# Benchmarks

Generated by `python benchmarks/report.py` from {n} result file(s) in `{results}`; do not edit
by hand: rerun the benchmarks (or `benchmarks/gpu_suite.sh` on a GPU machine) and this script.

How to read: images/s are medians over timed repeats, with the min–max of the repeats;
"× baseline" compares rows of the same run only (same machine, same process, same settings).
Absolute numbers hold only for the device named in the section title. Results measured on a
machine shared with other jobs say so in their `note` setting.
"""


def render(results_dir: Path, out: Path, plots_dir: Path | None) -> str:
    """Write ``out`` (and the PNGs under ``plots_dir``; None: no plots); return the markdown."""
    results, bad = load_all(results_dir)
    parts = [HEADER.format(n=len(results), results=_rel(results_dir, out.parent))]
    parts += ["## Goals (measured, not asserted)\n", goals(results), ""]
    for res in results:
        parts.append(f"## {res.benchmark} — {res.data['device_name']} (`{res.path.name}`)\n")
        parts.append(describe_run(res) + "\n")
        parts.append(table(res) + "\n")
        if plots_dir is not None and res.rows and not any(is_count_row(r) for r in res.rows):
            png = plot_variants(res, plots_dir / f"{res.stem}.png")
            parts.append(f"![{res.benchmark} images/s per variant]({_rel(png, out.parent)})\n")
            if has_workers_dimension(res):
                png = plot_workers(res, plots_dir / f"{res.stem}-workers.png")
                parts.append(f"![{res.benchmark} images/s vs workers]({_rel(png, out.parent)})\n")
    if bad:
        parts.append("## Result files left out\n")
        parts += [f"- {line}" for line in bad]
        parts.append("")
    text = "\n".join(parts).rstrip() + "\n"
    from fastsiam.files import atomic_open

    with atomic_open(out, "w") as f:
        f.write(text)
    return text


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of result JSON files")
    p.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--plots", type=Path, default=ROOT / "benchmarks" / "plots", help="PNG folder")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        print(f"report: {args.results} is not a folder of results", file=sys.stderr)
        return 2
    plots = None if args.no_plots else args.plots
    if plots is not None:
        try:
            _pyplot()
        except ImportError:
            print("report: matplotlib is not installed (pip install 'fastsiam[plot]'); "
                  "rendering tables only", file=sys.stderr)
            plots = None
    render(args.results, args.out, plots)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
