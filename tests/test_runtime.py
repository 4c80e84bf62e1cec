"""fastsiam.runtime: the config values translated once for every module."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from fastsiam.config import TrainConfig, load_config
from fastsiam.runtime import AMP_DTYPES, default_work_dir, memory_format, scaled_lr


def test_translations() -> None:
    assert memory_format(True) is torch.channels_last and memory_format(False) is torch.contiguous_format
    assert scaled_lr(0.05, 512) == 0.1  # SimSiam: 0.05 per 256 images
    amp = next(f for f in dataclasses.fields(TrainConfig) if f.name == "amp")
    assert set(AMP_DTYPES) == set(amp.metadata["choices"])  # every value the config accepts
    cfg = load_config(None, ["output.work_dir=/tmp/x"])
    assert default_work_dir(cfg) == Path("/tmp/x")
    assert default_work_dir(load_config(None)) == Path("work_dirs/fastsiam")
