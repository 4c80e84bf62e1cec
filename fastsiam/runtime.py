"""The few runtime translations of config values that several modules need, each in one place:
the memory format, the AMP dtype, the batch-scaled learning rate and the run's work dir; and
the source commit a run or a benchmark records."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import torch

from fastsiam.config import Config

#: ``train.amp`` -> autocast dtype (``none``: float32, no autocast).
AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def memory_format(channels_last: bool) -> torch.memory_format:
    """``train.channels_last`` as a memory format (NHWC feeds cuDNN's fastest convolutions)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule (Goyal et al., 2017) as SimSiam states its lr: ``optim.lr`` is per
    256 images, the run's peak lr is ``base x global batch / 256``."""
    return base_lr * global_batch / 256


def default_work_dir(cfg: Config) -> Path:
    """``output.work_dir``, else ``work_dirs/<config name>`` (the name is not inherited)."""
    return Path(cfg.output.work_dir or Path("work_dirs") / cfg.name)


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit (12 hex digits, ``-dirty`` with uncommitted changes to tracked
    files), or None outside a git checkout (an installed package). Asked once per process (two
    git subprocesses; every checkpoint records it): the code a run imported is that of its start."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, cwd=here).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None
