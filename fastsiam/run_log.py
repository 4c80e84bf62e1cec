"""Run records: JSON-lines metrics, the resolved config, optional TensorBoard, a progress bar.

Only the main process (rank 0) writes; other ranks get a logger whose calls do nothing, so
the trainer needs no ``if rank == 0`` around every line.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


class RunLogger:
    """Writes ``metrics.jsonl`` (one JSON object per record) in ``work_dir``.

    Args:
        work_dir: the run directory (created by the trainer).
        enabled: False on ranks other than 0.
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package).
    """

    def __init__(self, work_dir: Path, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = work_dir / METRICS_FILE
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("output.tensorboard=true needs the tensorboard package: "
                                  "pip install 'fastsiam[tensorboard]'") from e
            self._tb = SummaryWriter(str(work_dir / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "time"):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(work_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (a torn last line from a crash is ignored)."""
    path = Path(work_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file; is {work_dir} a fastsiam run directory?")
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


_LINES = {"forced": False}  # -q: plain progress lines even on a terminal


def use_progress_lines(on: bool = True) -> None:
    """Print plain progress lines instead of a redrawn bar (``-q``; always when stderr is not a
    terminal)."""
    _LINES["forced"] = on


class ProgressLines:
    """A progress report for logs (SLURM, ``| tee``): one plain line per update of the postfix
    (the trainer's ``train.log_every`` window), at most ``interval`` seconds apart otherwise,
    and at the end; never the ``\r`` frames of a bar, which a log file keeps every one of.

    It has the part of tqdm's interface fastsiam uses (``update``, ``set_postfix``, ``close``,
    a context manager), counts images, and states images/s since it started and the ETA.
    """

    def __init__(self, total: int, initial: int, desc: str, interval: float = 60.0) -> None:
        self.total, self.n, self.desc, self.interval = total, initial, desc, interval
        self._start_n = initial
        self._start = self._last = time.perf_counter()
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self._last >= self.interval:
            self._print()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items() if v is not None)
        self._print()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _print(self) -> None:
        now = time.perf_counter()
        self._last = now
        rate = (self.n - self._start_n) / max(now - self._start, 1e-9)
        parts = [f"{self.desc}: {self.n:,}" + (f"/{self.total:,} img ({100 * self.n / self.total:.0f}%)"
                                               if self.total else " img"),
                 f"{rate:,.1f} img/s"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self._postfix:
            parts.append(self._postfix)
        print(", ".join(parts), file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress(total: int, initial: int, desc: str, enabled: bool) -> tqdm | ProgressLines:
    """Progress counting images (so the rate reads as images/s): a tqdm bar on a terminal,
    :class:`ProgressLines` in a log file or under ``-q``; ``enabled=False`` (ranks other than 0,
    ``show_progress=False``) shows nothing."""
    if enabled and (_LINES["forced"] or not sys.stderr.isatty()):
        return ProgressLines(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, unit="img", unit_scale=True,
                disable=not enabled, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
