"""The training loop on fake CUDA: the host waits for the GPU only at log points.

A :class:`fastsiam.trainer.Trainer` is built unchanged on fake CUDA tensors
(:mod:`fastsiam.testing.fake_cuda`) with the synthetic loader, which makes its batches on the
device; the loop then runs past three log points (``train.log_every=3``, 7 steps: logs after
steps 3, 6 and 7). Between two log points nothing may copy between host and device or wait
for the device: not the loader, not ``LRSchedule.set``, not the step (eager or a CUDA-graph
replay). Each log point makes exactly one copy to the host (the window's losses and z-stds,
stacked), which is the one synchronization the loop needs; the first step copies the
augmentation's constants to the device, once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastsiam.config import load_config
from fastsiam.run_log import progress
from fastsiam.testing.fake_cuda import CAPTURE, fake_cuda
from fastsiam.trainer import Trainer, TrainResult, _StopSignal

STEPS, LOG_EVERY = 7, 3
LOG_POINTS = 3  # after steps 3, 6 and 7 (max_steps)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_loop_syncs_once_per_log_point(mode: str, tmp_path: Path) -> None:
    cfg = load_config(None, [
        "data.backend=synthetic", "data.batch_size=4", "data.image_size=32", "data.workers=0",
        "data.options={num_samples: 64, num_classes: 10}",
        "model.backbone=resnet18", "model.dim=64", "model.pred_dim=16", "model.small_input=true",
        "train.device=cuda", f"train.step={mode}", "train.amp=bf16", f"train.log_every={LOG_EVERY}",
        "eval.knn_every=0",
    ])
    with fake_cuda() as trace:
        trainer = Trainer(cfg, work_dir=tmp_path / "run")
        assert trainer.step_fn.mode == mode
        step_fn = trainer.step_fn

        def traced_step(batch):
            with trace.region("first step" if trainer.step == 0 else "step"):
                return step_fn(batch)

        trainer.step_fn = traced_step  # type: ignore[assignment]
        result = TrainResult(tmp_path / "run", 0, 0, finished=False)
        with trace.region("loop"), _StopSignal() as stop:
            trainer._run_epoch(progress(0, 0, "train", False), stop, result, STEPS)
    assert trainer.step == STEPS
    trace.assert_clean("step")
    trace.assert_clean(CAPTURE)
    # The first step copies the augmentation's constants to the device, once.
    assert {op.where.split(" in ")[-1] for op in trace.problems("first step")} == {"_constants"}
    assert trace.counts("first step")["h2d"] == 9  # factor ranges, mean/std, op indices, luma
    problems = trace.problems("loop")
    assert [op.kind for op in problems] == ["d2h"] * LOG_POINTS, trace.report("loop")
    assert all("_run_epoch" in op.where for op in problems), trace.report("loop")
    if mode == "graph":
        assert trace.kernels(CAPTURE) > 500  # captured once, on the first batch
        assert trace.counts("first step")["launch"] + trace.counts("step")["launch"] == STEPS


def test_knn_monitor_extracts_features_under_autocast(tmp_path: Path) -> None:
    cfg = load_config(None, [
        "data.backend=synthetic", "data.batch_size=4", "data.image_size=32", "data.workers=0",
        "data.val_path=unused-by-synthetic", "data.options={num_samples: 8, num_classes: 2}",
        "model.backbone=resnet18", "model.dim=64", "model.pred_dim=16", "model.small_input=true",
        "train.device=cuda", "train.amp=bf16", "eval.knn_every=1", "eval.knn_k=2",
    ])
    with fake_cuda():
        trainer = Trainer(cfg, work_dir=tmp_path / "run")
        dtypes = []
        trainer.model.backbone.layer4.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        trainer._knn("test")
    assert dtypes == [torch.bfloat16] * 4  # 2 bank batches + 2 val batches
