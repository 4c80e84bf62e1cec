"""The torch-only backend: the converter's shards, decoded by torchvision (nvJPEG on a GPU).

For machines with neither FFCV nor DALI. Samples are read through the shard index files with
one ``pread`` each (:class:`~fastsiam.data.shards.ShardReader`, no tar scan), decoded once by
``torchvision.io.decode_jpeg`` (batched nvJPEG with ``device="cuda"``, libjpeg-turbo on CPU
threads otherwise) and cut into two resized crops: on a GPU by one runtime-compiled kernel
that reads each image once (:mod:`fastsiam.data.resample_kernel`, ~3x the output's bytes of
device traffic) or by batched matrix products (:mod:`fastsiam.data.resample`, any device,
~36x), on the CPU by torchvision's vectorized uint8 ``resized_crop`` per image on the decoding
threads (option ``resize``). Flips and colour work are left to the device augmentation.

Three stages overlap, each in its own thread: reading batch ``k + 2`` (a thread pool of
``readers`` preads), decoding and cropping batch ``k + 1`` (on a side CUDA stream, or a pool
of ``workers`` CPU threads), and the consumer using batch ``k``. torch and torchvision release
the GIL inside their kernels and decoders, so the threads run in parallel.

Order, crops and resume: the shared :class:`~fastsiam.data.sampler.EpochSampler` (a full
permutation per epoch; rank ``r`` of ``w`` takes every ``w``-th sample) and the crop boxes of
:mod:`fastsiam.data.crops`, both functions of (seed, epoch, sample), so a mid-epoch resume is
exact and the boxes equal those of the ffcv backend and the DALI ``index`` reader.

Damaged samples: a JPEG that does not decode is named (tar, key, index) and follows
``on_corrupt`` (:class:`~fastsiam.data.loader.Loader`); with ``skip`` a black image takes its
place. On the CPU each image is decoded alone, so the failure is the sample's; on a GPU a batch
is decoded in one call that fails as a whole, and only then are its samples decoded one by one
on the CPU to find the damaged ones, and the rest decoded again on the GPU.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2.functional import resized_crop

from fastsiam.data.batch import EvalBatch, TwoViewBatch
from fastsiam.data.crops import center_crop_boxes, random_crop_boxes, sample_keys
from fastsiam.data.jpeg import BLACK_SIDE, decoder_message, jpeg_problem
from fastsiam.data.loader import BatchDraws, Loader, LoaderSpec
from fastsiam.data.options import NVJPEGOptions
from fastsiam.data.resample import crop_resize
from fastsiam.data.resample_kernel import crop_resize_kernel, kernel_works
from fastsiam.data.sampler import EpochSampler
from fastsiam.data.shards import ShardReader, open_shard_folder

# torchvision 0.29 deprecates its image codecs in favour of torchcodec (on every call); they
# are what this backend is for and what the GPU machines' torchvision provides.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)
_DONE = object()  # end-of-epoch marker in the stage queues


class NVJPEGLoader(Loader):
    """Reads, decodes and crops on threads; yields batches on ``device``.

    Args:
        shards: the shard folder's reader.
        sampler: epoch, rank share, resume point.
        train: two random views (True) or one center view (False).
        image_size, scale, ratio: the crops.
        workers: CPU decoding threads (CPU device).
        readers: threads issuing the preads of a batch.
        device: where decoding (CUDA: nvJPEG) and cropping happen and batches are delivered.
        prefetch: finished batches held ahead of the consumer.
        resize: ``kernel`` (the crop-resize kernel; CUDA only), ``batched`` (the batched
            matrix-product resize, any device) or ``per_image`` (torchvision's uint8
            ``resized_crop`` per image on the decoding threads; CPU only).
        on_corrupt: ``stop`` or ``skip`` (see the module docstring).
        draws: ``LoaderSpec.batch_draws``, for train batches that carry the augmentation's draws.
    """

    def __init__(
        self,
        shards: ShardReader,
        sampler: EpochSampler,
        *,
        train: bool,
        image_size: int,
        scale: Sequence[float],
        ratio: Sequence[float],
        workers: int,
        readers: int,
        device: torch.device,
        prefetch: int,
        resize: str,
        on_corrupt: str = "stop",
        draws: BatchDraws | None = None,
    ):
        super().__init__(sampler, on_corrupt, shards.root)
        self.shards = shards
        self.draws = draws
        self.train = train
        self.image_size = image_size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.workers = max(workers, 1)
        self.readers = max(readers, 1)
        self.device = device
        self.prefetch = max(prefetch, 1)
        if resize == "per_image" and device.type != "cpu":
            raise ValueError(f"nvjpeg loader: resize='per_image' is the CPU path; device is {device}")
        if resize == "kernel" and device.type != "cuda":
            raise ValueError(f"nvjpeg loader: resize='kernel' is a CUDA kernel; device is {device}")
        self.resize = resize
        self.classes = list(shards.classes)
        self.num_classes = len(self.classes)

    # ------------------------------------------------------------------ stages

    def _read(self, indices: list[int], pool: ThreadPoolExecutor) -> list[torch.Tensor]:
        # bytearray: torch wants writable memory to wrap without a warning.
        blobs = pool.map(lambda i: bytearray(self.shards.read_component(i, "jpg")), indices)
        return [torch.frombuffer(b, dtype=torch.uint8) for b in blobs]

    def _black(self, device: torch.device) -> torch.Tensor:
        return torch.zeros((3, BLACK_SIDE, BLACK_SIDE), dtype=torch.uint8, device=device)

    def _decode_one(self, i: int, blob: torch.Tensor) -> torch.Tensor:
        """Sample ``i`` decoded on the CPU, or (``skip``) a black image if it does not decode."""
        try:
            return decode_jpeg(blob, mode=ImageReadMode.RGB)
        except RuntimeError as e:
            self._corrupt(f"nvjpeg loader: {self.shards.describe(i)}",
                          f"JPEG does not decode ({decoder_message(e)})")
            return self._black(blob.device)

    def _decode_batch(
        self, indices: list[int], data: list[torch.Tensor], device: torch.device
    ) -> list[torch.Tensor]:
        """The batch decoded by one batched call on ``device`` (nvJPEG). That call fails as a
        whole on one damaged JPEG; then, and only then, the samples are checked one by one on
        the CPU, the damaged ones reported (``skip``: black images) and the rest decoded again."""
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            problems = {p: jpeg_problem(blob.numpy()) for p, blob in enumerate(data)}
            bad = {p: why for p, why in problems.items() if why is not None}
            if not bad:
                raise RuntimeError(
                    f"nvjpeg loader: the {device} decoder failed on the batch of "
                    f"{self.shards.describe(indices[0])} and {len(indices) - 1} more, which all "
                    f"decode on the CPU ({decoder_message(e)}); try device=cpu"
                ) from e
        for p, why in bad.items():
            self._corrupt(f"nvjpeg loader: {self.shards.describe(indices[p])}",
                          f"JPEG does not decode ({why})")
        good = [p for p in range(len(data)) if p not in bad]
        images = [self._black(device)] * len(data)
        decoded = decode_jpeg([data[p] for p in good], mode=ImageReadMode.RGB, device=device) if good else []
        for p, image in zip(good, decoded):
            images[p] = image
        return images

    def _decode(
        self, indices: list[int], data: list[torch.Tensor], pool: ThreadPoolExecutor
    ) -> list[torch.Tensor]:
        if self.device.type == "cuda":
            return self._decode_batch(indices, data, self.device)
        chunks = np.array_split(np.arange(len(data)), min(self.workers, len(data)))
        parts = pool.map(lambda c: [self._decode_one(indices[p], data[p]) for p in c], chunks)
        return [im for part in parts for im in part]

    def _boxes(
        self, epoch: int, idx: np.ndarray, heights: np.ndarray, widths: np.ndarray
    ) -> np.ndarray:
        """Crop boxes ``[views * n, 4]``, view-major (all first views, then all second views)."""
        if not self.train:
            return center_crop_boxes(heights, widths, self.image_size)
        return np.concatenate(
            [
                random_crop_boxes(
                    sample_keys(self.sampler.seed, epoch, idx, v),
                    heights,
                    widths,
                    self.scale,
                    self.ratio,
                )
                for v in (0, 1)
            ]
        )

    def _decode_crop(
        self,
        epoch: int,
        idx: np.ndarray,
        positions: np.ndarray,
        data: list[torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        # The per-image CPU path: decode and crop a chunk of the batch on one thread.
        images = [self._decode_one(int(idx[p]), data[p]) for p in positions]
        heights = np.array([im.shape[1] for im in images])
        widths = np.array([im.shape[2] for im in images])
        views = 2 if self.train else 1
        boxes = self._boxes(epoch, idx[positions], heights, widths).reshape(
            views, len(positions), 4
        )
        n, s = len(idx), self.image_size
        for v in range(views):
            for j, p in enumerate(positions):
                top, left, h, w = (int(x) for x in boxes[v, j])
                crop = resized_crop(images[j], top, left, h, w, [s, s], antialias=True)
                out[v * n + p].copy_(crop.permute(1, 2, 0))

    def _make_batch(
        self, epoch: int, indices: list[int], data: list[torch.Tensor], pool: ThreadPoolExecutor
    ) -> TwoViewBatch | EvalBatch:
        idx = np.asarray(indices, dtype=np.int64)
        n, s = len(idx), self.image_size
        views = 2 if self.train else 1
        label = torch.from_numpy(self.shards.labels[idx]).to(self.device, non_blocking=True)
        if self.resize == "kernel" and not kernel_works(self.device):
            self.resize = "batched"  # checked at the first batch (building touches no device); said why
        if self.resize != "per_image":
            images = self._decode(indices, data, pool)
            heights = np.array([im.shape[1] for im in images])
            widths = np.array([im.shape[2] for im in images])
            resize = crop_resize_kernel if self.resize == "kernel" else crop_resize
            out = resize(images, np.tile(np.arange(n), views), self._boxes(epoch, idx, heights, widths), s)
        else:
            out = torch.empty((views * n, s, s, 3), dtype=torch.uint8)
            chunks = np.array_split(np.arange(n), min(self.workers, n))
            list(pool.map(lambda c: self._decode_crop(epoch, idx, c, data, out), chunks))
        # [views * n, S, S, 3] view-major, one NHWC block: the batch's views as channels_last
        # NCHW, without a copy.
        nchw = out.permute(0, 3, 1, 2)
        if not self.train:
            return EvalBatch(nchw, label)
        draws = None if self.draws is None else self.draws(epoch, idx)
        return TwoViewBatch(nchw, label, draws)

    def _make_device_batch(
        self,
        epoch: int,
        indices: list[int],
        data: list[torch.Tensor],
        pool: ThreadPoolExecutor,
        stream: torch.cuda.Stream,
    ) -> tuple[TwoViewBatch | EvalBatch, torch.cuda.Event]:
        """Decode and crop a batch on the side ``stream``; the event marks it done.

        torchvision's CUDA ``decode_jpeg`` allocates its outputs from the caching allocator on
        the current (side) stream but writes them on its own stream, which does not wait for
        ``stream``: a block that the previous batch's crop-resize freed could be handed to the
        decoder while that kernel is still queued, and overwritten under it. So the side stream
        is drained first; this thread waits, the training stream does not.
        """
        stream.synchronize()
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            batch = self._make_batch(epoch, indices, data, pool)
            ready = torch.cuda.Event()
            ready.record(stream)
        return batch, ready

    def _hand_over(self, batch: TwoViewBatch | EvalBatch, ready: torch.cuda.Event) -> TwoViewBatch | EvalBatch:
        """The consumer's stream waits for the side stream's batch (no host wait), and the
        caching allocator must not give the batch's memory back to the side stream in use."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        for t in batch:
            t.record_stream(current)
        return batch

    # ------------------------------------------------------------------ threads

    def _batches(self) -> Iterator[TwoViewBatch | EvalBatch]:
        s = self.sampler
        epoch, batches = s.epoch, list(s)
        stop = threading.Event()
        read_q: queue.Queue = queue.Queue(maxsize=2)
        out_q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        read_pool = ThreadPoolExecutor(self.readers, thread_name_prefix="fastsiam-read")
        decode_pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fastsiam-decode")
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        def put(q: queue.Queue, item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def get(q: queue.Queue) -> Any:
            # The reader may stop without a last item (its put refused once the consumer
            # stopped); a plain get() would wait for it forever.
            while not stop.is_set():
                try:
                    return q.get(timeout=0.1)
                except queue.Empty:
                    continue
            return _DONE

        def reader() -> None:
            try:
                for indices in batches:
                    if not put(read_q, (indices, self._read(indices, read_pool))):
                        return
                put(read_q, _DONE)
            except BaseException as e:  # handed to the consumer, raised there
                put(read_q, e)

        def decoder() -> None:
            try:
                while True:
                    item = get(read_q)
                    if item is _DONE or isinstance(item, BaseException):
                        put(out_q, item)
                        return
                    indices, data = item
                    if stream is None:
                        item = (self._make_batch(epoch, indices, data, decode_pool), None)
                    else:
                        item = self._make_device_batch(epoch, indices, data, decode_pool, stream)
                    if not put(out_q, item):  # the consumer stopped early
                        return
            except BaseException as e:
                put(out_q, e)

        threads = [
            threading.Thread(target=f, daemon=True, name=f"fastsiam-nvjpeg-{f.__name__}")
            for f in (reader, decoder)
        ]
        for t in threads:
            t.start()
        try:
            while True:
                item = out_q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, ready = item
                yield batch if ready is None else self._hand_over(batch, ready)
        finally:
            stop.set()
            for q in (read_q, out_q):  # unblock a stage waiting on a full queue
                while not q.empty():
                    q.get_nowait()
            for t in threads:
                t.join(timeout=10)
            read_pool.shutdown(wait=False)
            decode_pool.shutdown(wait=False)


def build(path: str | Path, spec: LoaderSpec, options: NVJPEGOptions) -> NVJPEGLoader:
    """Build the torchvision/nvJPEG loader over a shard folder written by ``data_prep/to_dali.py``
    (the options: :class:`fastsiam.data.options.NVJPEGOptions`)."""
    path = Path(path)
    readers, prefetch = options.readers, options.prefetch
    resize = options.resize or ("kernel" if spec.device.type == "cuda" else "per_image")
    shards = open_shard_folder(path, "nvjpeg")
    return NVJPEGLoader(
        shards,
        spec.sampler(len(shards)),
        train=spec.train,
        image_size=spec.image_size,
        scale=spec.scale,
        ratio=spec.ratio,
        workers=spec.workers,
        readers=readers,
        device=spec.device,
        prefetch=prefetch,
        resize=resize,
        on_corrupt=spec.on_corrupt,
        draws=spec.batch_draws,
    )


__all__ = ["NVJPEGLoader", "build"]
