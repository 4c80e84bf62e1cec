"""The shared benchmark harness: timing with warm-up and repeats, environment capture, JSON output.

Every script under ``benchmarks/`` measures through :func:`measure` and records through
:class:`BenchmarkReport`, so all results share one schema (``SCHEMA_VERSION``) that
``benchmarks/report.py`` renders into BENCHMARKS.md.

Timing rule: a *call* processes ``items_per_call`` images; one *repeat* times ``iters`` calls
after ``warmup`` untimed calls (warm-up happens once, before the first repeat). On CUDA the
device is synchronized before starting and before stopping the clock, so asynchronous kernel
launches are not mistaken for finished work. The reported rate is the median over repeats,
with the min-max spread.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@dataclass
class Measurement:
    """Throughput of one variant: ``items_per_s`` is the median over repeats."""

    items_per_s: float
    items_per_s_min: float
    items_per_s_max: float
    seconds_per_call: float
    repeats: int
    iters: int
    warmup: int
    samples: list[float] = field(default_factory=list)  # items/s of each repeat


def measure(
    fn: Callable[[], Any],
    *,
    items_per_call: int,
    iters: int,
    repeats: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    timer: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
) -> Measurement:
    """Time ``fn``: ``warmup`` untimed calls, then ``repeats`` timed groups of ``iters`` calls.

    Args:
        fn: one unit of work, processing ``items_per_call`` images.
        items_per_call: images (or samples) processed by one call.
        iters: calls per timed repeat.
        repeats: timed repeats; the median rate is reported.
        warmup: untimed calls before the first repeat (compilation, caches, cudnn autotune).
        device: ``"cuda..."`` synchronizes the GPU around each repeat.
        timer: the clock, replaceable for tests.
        sync: overrides the synchronization function (default: ``torch.cuda.synchronize`` on CUDA).
    """
    if iters < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"measure: need iters>=1, repeats>=1, warmup>=0; got {iters}, {repeats}, {warmup}")
    if sync is None:
        sync = _cuda_sync if str(device).startswith("cuda") else _no_sync
    for _ in range(warmup):
        fn()
    rates = []
    total_time = 0.0
    for _ in range(repeats):
        sync()
        start = timer()
        for _ in range(iters):
            fn()
        sync()
        elapsed = max(timer() - start, 1e-12)
        total_time += elapsed
        rates.append(items_per_call * iters / elapsed)
    return Measurement(
        items_per_s=statistics.median(rates),
        items_per_s_min=min(rates),
        items_per_s_max=max(rates),
        seconds_per_call=total_time / (repeats * iters),
        repeats=repeats,
        iters=iters,
        warmup=warmup,
        samples=rates,
    )


def _no_sync() -> None:
    pass


def _cuda_sync() -> None:
    import torch

    torch.cuda.synchronize()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: str) -> str:
    """A human name for the device: the GPU's name on CUDA, the CPU model otherwise."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} x{os.cpu_count()}"


def device_slug(device: str) -> str:
    """A short file-name-safe tag: e.g. ``h100``, ``a100``, ``cpu2``."""
    if str(device).startswith("cuda"):
        name = device_name(device).lower()
        for tag in ("h200", "h100", "a100", "l40s", "l4", "v100", "a10", "t4", "rtx"):
            if tag in name:
                return tag
        return "".join(c for c in name if c.isalnum())[:16] or "cuda"
    return f"cpu{os.cpu_count()}"


def environment(device: str) -> dict[str, Any]:
    """What produced a result: versions, machine, command and commit."""
    env: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {
            name: _version(dist)
            for name, dist in [
                ("torch", "torch"),
                ("torchvision", "torchvision"),
                ("numpy", "numpy"),
                ("ffcv", "ffcv"),
                ("dali", "nvidia-dali-cuda120"),
                ("pillow", "pillow"),
            ]
        },
    }
    return env


def peak_memory_mb(device: str) -> float | None:
    """Peak allocated device memory since the last reset, in MiB (None off CUDA)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def reset_peak_memory(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(torch.device(device))


class BenchmarkReport:
    """Rows of one benchmark run, printed as a table and written as one JSON file.

    Args:
        benchmark: the script's name (``step``, ``loaders``, ...); part of the file name.
        device: the device measured (``cpu``, ``cuda``, ``cuda:1``).
        settings: the run's fixed settings (batch size, resolution, workers, ...).
        baseline: the variant other rows are compared against (ratios in the table/report).
    """

    def __init__(self, benchmark: str, device: str, settings: dict[str, Any], baseline: str | None = None):
        self.benchmark = benchmark
        self.device = device
        self.settings = dict(settings)
        self.baseline = baseline
        self.rows: list[dict[str, Any]] = []
        self.env = environment(device)

    def add(self, variant: str, m: Measurement, **extra: Any) -> dict[str, Any]:
        row = {"variant": variant, **asdict(m), **extra}
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "benchmark": self.benchmark,
            "baseline": self.baseline,
            "settings": self.settings,
            **self.env,
            "rows": self.rows,
        }

    def table(self) -> str:
        base = next((r for r in self.rows if r["variant"] == self.baseline), None)
        extra_keys = sorted({k for r in self.rows for k in r} - _ROW_CORE_KEYS)
        head = ["variant", "images/s", "min-max", *(["x baseline"] if base else []), *extra_keys]
        lines = []
        for r in self.rows:
            cells = [
                r["variant"],
                f"{r['items_per_s']:.1f}",
                f"{r['items_per_s_min']:.1f}-{r['items_per_s_max']:.1f}",
            ]
            if base:
                cells.append(f"{r['items_per_s'] / base['items_per_s']:.2f}")
            cells += [_fmt(r.get(k)) for k in extra_keys]
            lines.append(cells)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        title = f"{self.benchmark} on {self.env['device_name']} ({_fmt(self.settings)})"
        return "\n".join([title, fmt.format(*head), *(fmt.format(*c) for c in lines)])

    def write(self, out_dir: str | os.PathLike[str] | None = None, name: str | None = None) -> Path:
        """Write ``<out_dir>/<benchmark>-<device>.json`` atomically; ``$OUT`` wins when set."""
        from fastsiam.io import atomic_open

        directory = Path(out_dir or os.environ.get("OUT") or RESULTS_DIR)
        path = directory / f"{name or self.benchmark}-{device_slug(self.device)}.json"
        with atomic_open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return path


_ROW_CORE_KEYS = {
    "variant", "items_per_s", "items_per_s_min", "items_per_s_max", "seconds_per_call",
    "repeats", "iters", "warmup", "samples",
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return "-" if v is None else str(v)
