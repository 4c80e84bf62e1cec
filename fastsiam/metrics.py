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
                raise ImportError("output.tensorboard=true needs the tensorboard package: pip install tensorboard") from e
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


def progress(total: int, initial: int, desc: str, enabled: bool) -> tqdm:
    """A progress bar counting images (so tqdm's rate reads as images/s)."""
    return tqdm(total=total, initial=initial, desc=desc, unit="img", unit_scale=True,
                disable=not enabled, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)
