"""The nvjpeg loader's device stages on fake CUDA: stream order around the decoder, and the
only host<->device traffic of a batch.

The loader's threads are not traced (dispatch modes are thread-local), so the test calls the
two device stages in this thread: the decoder stage (``_make_device_batch``: decode and
crop-resize on the side stream, by the kernel or by the batched torch ops) and the hand-over to the consumer (``_hand_over``).
torchvision's CUDA ``decode_jpeg`` has no fake kernel: it is replaced by one that returns
fake images of the JPEGs' real sizes and marks its place in the trace.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from loader_helpers import SIZE, write_shards
from torchvision.io import decode_jpeg

import fastsiam.data.nvjpeg_loader as nvjpeg
from fastsiam.data import build_loader
from fastsiam.testing.fake_cuda import fake_cuda

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")
B = 6


@pytest.mark.parametrize("resize", [None, "batched"], ids=["default-kernel", "batched"])
def test_decoder_stage_drains_the_side_stream_before_decoding(
    toy_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resize: str | None
) -> None:
    root = write_shards(toy_imagenet / "train", tmp_path / "shards")
    pool = ThreadPoolExecutor(2)
    loader = build_loader("nvjpeg", root, batch_size=B, image_size=SIZE, workers=1,
                          device="cuda", seed=0, resize=resize)  # builds without touching the device
    assert loader.resize == (resize or "kernel")
    indices = list(range(B))
    data = loader._read(indices, pool)
    sizes = [tuple(decode_jpeg(d).shape) for d in data]  # real sizes, decoded on the CPU

    with fake_cuda() as trace:
        def fake_decode(blobs, mode, device):
            assert torch.device(device).type == "cuda" and len(blobs) == B
            trace.record("torchvision decode_jpeg (cuda)", "kernel")
            return [torch.empty(s, dtype=torch.uint8, device="cuda") for s in sizes]

        monkeypatch.setattr(nvjpeg, "decode_jpeg", fake_decode)
        stream = torch.cuda.Stream()
        with trace.region("decoder stage"):
            batch, ready = loader._make_device_batch(0, indices, data, pool, stream)
        with trace.region("hand-over"):
            batch = loader._hand_over(batch, ready)

    # Both views in one tensor, straight from the crop-resize (no split, no copy).
    assert batch.views.shape == (2 * B, 3, SIZE, SIZE) and batch.views.device.type == "cuda"
    assert batch.views.is_contiguous(memory_format=torch.channels_last)
    ops = trace.select("decoder stage")
    names = [op.name for op in ops]
    decode = names.index("torchvision decode_jpeg (cuda)")
    assert names[0] == "torch.cuda.Stream.synchronize"  # drained before anything is allocated
    # Host<->device traffic of the stage: that wait, and two small copies made on this loader
    # thread (the labels, the crop boxes' metadata), never one from the device.
    problems = [(op.kind, op.where.split(" in ")[-1]) for op in trace.problems("decoder stage")]
    resizer = "crop_resize" if resize == "batched" else "crop_resize_kernel"
    assert problems == [("sync", "_make_device_batch"), ("h2d", "_make_batch"),
                        ("h2d", resizer)], trace.report("decoder stage")
    if resize == "batched":
        assert names.index("aten.bmm.default") > decode
    else:  # one kernel after the decode, none of the batched path's products
        assert names[decode:].count("fastsiam.crop_resize_kernel.default") == 1
        assert "aten.bmm.default" not in names
    trace.assert_clean("hand-over")
