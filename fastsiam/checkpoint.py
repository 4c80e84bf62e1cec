"""Checkpoints that survive preemption, full disks and corruption.

A checkpoint is a dict of tensors and plain Python data only (the config as a dict, RNG
states as tensors/lists), so it loads with ``torch.load(weights_only=True)`` and never runs
pickled code. Files are written under a temporary name, fsync'ed and renamed (see
:mod:`fastsiam.files`), so a crash while saving leaves the previous checkpoint intact and never a
truncated file under a checkpoint's name (a full disk or a read-only work dir is a one-line
:class:`CheckpointError` saying that the previous checkpoint is intact).

Naming in a work dir: ``epoch_0003.pt`` (end of an epoch), ``step_00001234.pt`` (a mid-epoch
save: preemption or ``--max-steps``), ``best.pt`` (the epoch of the highest kNN top-1, only
when the kNN monitor runs; a hard link to that epoch's file), ``debug_nonfinite.pt``. ``latest`` is the valid file with the largest global step.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastsiam.files import atomic_open

log = logging.getLogger(__name__)

_PERIODIC = re.compile(r"^(epoch_\d+|step_\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


class _KeepsWriteError:
    """A binary file that remembers its write error: ``torch.save`` turns an ``OSError`` of
    the file into a ``RuntimeError`` without the errno ("unexpected pos ..."), which would hide
    a full disk."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self._f.write(data))
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically to ``path``; a failure leaves any previous file untouched."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            out = _KeepsWriteError(f)
            try:
                torch.save(state, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None
    except OSError as e:
        raise CheckpointError(describe_write_error(path, e)) from None
    return path


def describe_write_error(path: Path, e: OSError, what: str = "checkpoint") -> str:
    """One line for a failed write of ``path`` into a work dir (``what`` it holds)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: no space left on the device while saving; the previous {what} is intact"
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"work dir {path.parent} is not writable: {os.strerror(e.errno)}"
    return f"{path}: cannot save the {what}: {e.strerror or e}"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; errors name the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it contains pickled Python objects, which are refused (weights_only=True)"
        raise CheckpointError(f"{path}: not a readable fastsiam checkpoint: {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(state).__name__}")
    return state


def periodic_checkpoints(work_dir: str | Path) -> list[Path]:
    """The epoch/step checkpoints in ``work_dir``, oldest first by name order of step."""
    d = Path(work_dir)
    if not d.is_dir():
        return []
    files = [p for p in d.iterdir() if _PERIODIC.match(p.name)]
    return sorted(files, key=lambda p: p.stat().st_mtime_ns)


def find_resumable(work_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``work_dir`` that loads, by global step; corrupt ones are
    skipped with a warning naming them."""
    from fastsiam.weights import WeightsError, check_resumable

    candidates = []
    for p in periodic_checkpoints(work_dir):
        try:
            state = load_checkpoint(p)
            check_resumable(state, p)
            candidates.append((int(state["step"]), p.stat().st_mtime_ns, p, state))
        except (CheckpointError, WeightsError) as e:
            log.warning("skipping %s", e)
    if not candidates:
        return None
    _, _, path, state = max(candidates, key=lambda c: (c[0], c[1]))
    return path, state


def prune(work_dir: str | Path, keep_last: int) -> None:
    """Keep the ``keep_last`` newest periodic checkpoints (``best.pt`` is never pruned)."""
    files = periodic_checkpoints(work_dir)
    for p in files[: max(0, len(files) - keep_last)]:
        p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Every RNG a training run draws from: torch CPU/CUDA, numpy, Python."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
