"""Evaluation on fake CUDA: feature extraction (kNN bank, test) and the linear-evaluation loop
make no host<->device copy and no host sync per batch, and run the backbone under autocast.

The loaders here deliver batches already on the device, as the ffcv, DALI and nvjpeg backends
do on a GPU; each batch is a region of the trace (the consumer's work on batch ``i`` happens
while the generator is suspended inside ``trace.region(f"batch {i}")``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import fastsiam.features as features
import fastsiam.linear as L
from fastsiam.augment import to_normalized
from fastsiam.classifier import LinearClassifier
from fastsiam.config import load_config
from fastsiam.data.batch import EvalBatch, TwoViewBatch
from fastsiam.run_log import RunLogger
from fastsiam.testing.fake_cuda import DeviceTrace, fake_cuda

BATCHES, B, SIZE = 3, 8, 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _device_view(views: int = 1) -> torch.Tensor:
    return torch.empty((views * B, 3, SIZE, SIZE), dtype=torch.uint8, device="cuda",
                       memory_format=torch.channels_last)


def _eval_batches(trace: DeviceTrace) -> Iterator[EvalBatch]:
    for i in range(BATCHES):
        with trace.region(f"batch {i}"):
            yield EvalBatch(_device_view(), torch.empty(B, dtype=torch.long, device="cuda"))


class _TrainLoader:
    """A linear-evaluation loader on the device: length, epochs, two-view batches."""

    def __init__(self, trace: DeviceTrace):
        self.trace = trace

    def __len__(self) -> int:
        return BATCHES

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self) -> Iterator[TwoViewBatch]:
        for i in range(BATCHES):
            with self.trace.region(f"batch {i}"):
                yield TwoViewBatch(_device_view(2), torch.empty(B, dtype=torch.long, device="cuda"))


def _model() -> LinearClassifier:
    model = LinearClassifier("resnet18", num_classes=10, small_input=True)
    return model.to("cuda", memory_format=torch.channels_last)


@pytest.mark.parametrize("amp", ["bf16", "none"])
def test_feature_extraction_per_batch(amp: str) -> None:
    with fake_cuda() as trace:
        model = _model().eval()
        dtypes = []
        model.backbone.layer4.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        to_normalized(_device_view(), MEAN, STD)  # the first call copies mean/std, once
        feats, labels = features.extract_features(model, _eval_batches(trace), "cuda", mean=MEAN,
                                           std=STD, amp=amp, show_progress=False)
    assert feats.shape == (BATCHES * B, 512) and feats.dtype == torch.float32 and len(labels) == BATCHES * B
    assert dtypes == [torch.bfloat16 if amp == "bf16" else torch.float32] * BATCHES
    for i in range(BATCHES):
        trace.assert_clean(f"batch {i}")
        assert trace.kernels(f"batch {i}") > 20


def test_linear_evaluation_loop_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checkpoint write at the end of an epoch is host I/O of real data: not traced here.
    monkeypatch.setattr(L, "save_linear_checkpoint", lambda *a, **k: None)
    cfg = load_config(None, ["optim.name=lars", "train.epochs=1", "train.amp=bf16",
                             f"data.batch_size={B}", "model.backbone=resnet18"])
    with fake_cuda() as trace:
        model = _model()
        to_normalized(_device_view(), MEAN, STD)
        result = L.train_linear(model, _TrainLoader(trace), None, cfg, device=torch.device("cuda"),
                                logger=RunLogger(tmp_path, enabled=False),
                                checkpoint_path=tmp_path / "last.pt", show_progress=False)
    assert result["step"] == BATCHES
    names = {op.name for op in trace.select("batch 1", "kernel")}
    assert "aten.convolution.default" in names and "aten._foreach_norm.Scalar" in names  # LARS
    for i in range(BATCHES):
        trace.assert_clean(f"batch {i}")
