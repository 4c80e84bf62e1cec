"""The FFCV backend: a .beton read by FFCV's loader with a decode-once, crop-twice decoder.

FFCV (Leclerc et al., "FFCV: Accelerating Training by Removing Data Bottlenecks", CVPR 2023)
reads a memory-mapped .beton and runs numba-compiled decoders on threads. Here the image
field goes through :class:`~fastsiam.data.ffcv_decoder.TwoCropDecoder` (one JPEG decode, two
RandomResizedCrops), so one pass yields both SimSiam views; flips and colour work happen on
the device. Batches are moved with FFCV's ``ToDevice(non_blocking=True)`` on FFCV's own CUDA
streams; both views are already one channels_last block, copied once out of FFCV's
recycled buffers (option ``copy``).

Order (backend option ``order``):

- ``random`` (default): the shared :class:`~fastsiam.data.sampler.EpochSampler`: a full
  permutation per epoch from (seed, epoch), rank ``r`` of ``w`` taking every ``w``-th sample
  (the rule of FFCV's ``distributed=True``, which follows torch's DistributedSampler, but taken
  from ``rank``/``world_size`` instead of an initialized process group).
- ``quasi_random``: FFCV's QUASI_RANDOM, which shuffles within a window of pages to read
  less of the file when it does not fit in memory (use with ``os_cache=False``); like FFCV,
  refused when ``world_size > 1``.

Resume: mid-epoch, exactly, for both orders: the order is a function of (seed, epoch) and
the crops of (seed, epoch, sample, view), so a resumed epoch skips the consumed batches and
continues with the same samples and crops.

Damaged data: at build, the .beton's tables are checked against each other and the file
(:mod:`fastsiam.data.beton`: absurd image sizes, pointers outside the file, a truncated file)
and the decoders' scratch memory against the machine's. A JPEG that does not decode is named
(file and sample index) and follows ``on_corrupt`` (:class:`~fastsiam.data.loader.Loader`;
``skip``: black views, from the decoders of :mod:`fastsiam.data.ffcv_decoder`, which check
libjpeg-turbo's status where FFCV's own ignore it). Raw samples hold no redundancy to check:
``fastsiam verify`` (the file's checksum) is what catches flipped bytes there.

Note: FFCV sets the process's torch CPU threads to ``workers`` when it starts an epoch; this
backend restores the caller's setting right after.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import ffcv  # noqa: F401  (a missing library fails here, with the install hint of build_loader)
import numpy as np
import torch
from ffcv.fields.decoders import IntDecoder
from ffcv.loader import Loader as FFCVLoader
from ffcv.loader import OrderOption
from ffcv.pipeline import PipelineSpec
from ffcv.reader import Reader
from ffcv.transforms import ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder

from fastsiam.data.batch import EvalBatch, TwoViewBatch
from fastsiam.data.beton import check_scratch, classes_path, open_beton
from fastsiam.data.ffcv_decoder import CenterCropDecoder, TwoCropDecoder, two_views
from fastsiam.data.loader import BatchDraws, Loader, LoaderSpec
from fastsiam.data.options import FFCVOptions
from fastsiam.data.sampler import EpochSampler


class SamplerOrder(TraversalOrder):
    """FFCV traversal order taken from an :class:`EpochSampler` and cut at its resume point.

    FFCV asks for an epoch's order when the epoch starts; this answers with the sampler's
    current epoch (ignoring FFCV's own epoch counter, which does not survive a restart) from
    batch ``sampler.start_batch`` on, and keeps it in :attr:`order` (the samples of each batch
    the loader hands out, for the damaged-JPEG flags).

    Args:
        loader: the FFCV loader.
        sampler: epoch, rank share and resume point.
        inner: an FFCV order to draw the permutation from instead (QUASI_RANDOM), or None.
    """

    def __init__(
        self, loader: FFCVLoader, sampler: EpochSampler, inner: TraversalOrder | None = None
    ):
        super().__init__(loader)
        self.epoch_sampler = sampler
        self.inner = inner
        self.order = np.zeros(0, dtype=np.uint64)
        if inner is not None:
            # QUASI_RANDOM shuffles its page table in place, so its order for an epoch depends
            # on the calls before; restarting from a pristine copy makes it a function of
            # (seed, epoch), which a resume needs.
            inner.prepare_data_structures()
            self._pages = inner.page_to_samples_array.copy()

    def sample_order(self, epoch: int) -> np.ndarray:
        s = self.epoch_sampler
        if self.inner is None:
            order = s.rank_indices().numpy()
        else:  # single rank (checked at build): the whole order, cut as the sampler's rule
            self.inner.page_to_samples_array = self._pages.copy()
            order = np.asarray(self.inner.sample_order(s.epoch))
            if s.drop_last:
                order = order[: len(s) * s.batch_size]
        self.order = order[s.start_batch * s.batch_size :].astype(np.uint64)
        return self.order


class FFCVTwoViewLoader(Loader):
    """An FFCV loader yielding :class:`TwoViewBatch` (or :class:`EvalBatch` for val).

    Args:
        ffcv_loader: the FFCV loader (built by :func:`build`; its order is a :class:`SamplerOrder`).
        sampler: the same sampler its order reads.
        decoder: the image decoder (:class:`TwoCropDecoder` for train, :class:`CenterCropDecoder`
            for val): its epoch, its damaged-JPEG flags.
        device: where batches are delivered.
        num_classes, classes: from the .beton's labels / ``classes.json``.
        copy: hand out copies (True), or views of FFCV's recycled buffers (False).
        path: the .beton (named in messages).
        on_corrupt: ``stop`` or ``skip`` (see the module docstring).
        draws: ``LoaderSpec.batch_draws``, for train batches that carry the augmentation's draws.
    """

    def __init__(
        self,
        ffcv_loader: FFCVLoader,
        sampler: EpochSampler,
        decoder: TwoCropDecoder,
        device: torch.device,
        num_classes: int,
        classes: list[str] | None,
        copy: bool = True,
        path: Path | None = None,
        on_corrupt: str = "stop",
        draws: BatchDraws | None = None,
    ):
        super().__init__(sampler, on_corrupt, path)
        self.copy = copy
        self.draws = draws
        self.ffcv_loader = ffcv_loader
        self.decoder = decoder
        self.train = not isinstance(decoder, CenterCropDecoder)
        self.device = device
        self.num_classes = num_classes
        self.classes = classes

    def _batch_indices(self, batch: int) -> np.ndarray:
        """The sample indices of batch ``batch`` of this pass (the order FFCV walks)."""
        b = self.sampler.batch_size
        return self.ffcv_loader.traversal_order.order[batch * b : (batch + 1) * b].astype(np.int64)

    def _check_decoded(self, indices: np.ndarray) -> None:
        """Apply ``on_corrupt`` to the JPEGs of a batch's ``indices`` that the decoder flagged:
        a read of the batch's flags (host memory; FFCV decodes on the CPU)."""
        for i in indices[self.decoder.failed[indices] != 0].tolist():
            self.decoder.failed[i] = 0  # met again in a later epoch: reported again
            self._corrupt(f"ffcv loader: {self.source} sample {i}",
                          "JPEG does not decode (libjpeg-turbo reports an error or corrupt data)")

    def _batches(self) -> Iterator[TwoViewBatch | EvalBatch]:
        self.decoder.set_epoch(self.sampler.epoch)
        with _keep_torch_threads():
            epoch = iter(self.ffcv_loader)
        try:
            for k, (images, labels) in enumerate(_guarded(epoch)):
                indices = self._batch_indices(k)
                self._check_decoded(indices)
                label = labels.reshape(-1)
                block = two_views(images) if self.train else images
                if self.copy:
                    label = label.clone()
                    block = _owned(block)
                # The NHWC block permuted to NCHW: channels_last without a copy.
                views = block.permute(0, 3, 1, 2)
                if not self.train:
                    yield EvalBatch(views, label)
                    continue
                draws = None if self.draws is None else self.draws(self.sampler.epoch, indices)
                yield TwoViewBatch(views, label, draws)
        finally:
            epoch.close()


@contextlib.contextmanager
def _keep_torch_threads() -> Iterator[None]:
    """Undo FFCV's ``torch.set_num_threads(num_workers)`` (in its Loader's constructor and at
    every epoch start): the caller's setting stands. The trainer leaves cores to the loader;
    OpenMP threads oversubscribed against FFCV's decoder threads ran 10x slower on 2 cores."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _owned(block: torch.Tensor) -> torch.Tensor:
    """A copy of a contiguous NHWC block. On the CPU through numpy: a plain single-threaded
    memcpy; torch's copy fans out to its OpenMP threads, which then fight FFCV's numba threads
    for the cores (measured: half the loader's throughput on 2 cores)."""
    if block.device.type == "cpu":
        return torch.from_numpy(block.numpy().copy())
    return block.clone()


def _guarded(epoch: Iterator) -> Iterator:
    """FFCV's epoch iterator, raising instead of waiting forever if its loading thread dies
    (FFCV's own ``__next__`` blocks on the output queue, which a crashed thread never fills)."""
    while True:
        while epoch.output_queue.empty():
            if not epoch.is_alive() and epoch.output_queue.empty():
                raise RuntimeError(
                    "ffcv loader: FFCV's loading thread died (its exception is above)"
                )
            time.sleep(0.0005)
        try:
            yield next(epoch)
        except StopIteration:
            return


def _classes(path: Path, reader: Reader, label_field: str) -> tuple[int, list[str] | None]:
    """Class count from the labels, names from data_prep/to_ffcv.py's ``<name>.classes.json``."""
    labels = reader.metadata[f"f{list(reader.handlers).index(label_field)}"]
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    names = None
    sidecar = classes_path(path)
    if sidecar.is_file():
        with open(sidecar) as f:
            data = json.load(f)
        names = data.get("classes") if isinstance(data, dict) else data
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f'ffcv loader: {sidecar} must hold {{"classes": [names...]}}')
        if len(names) < num_classes:
            raise ValueError(
                f"ffcv loader: {sidecar} names {len(names)} classes, but {path} has "
                f"label {num_classes - 1}"
            )
        num_classes = len(names)
    return num_classes, names


def build(path: str | Path, spec: LoaderSpec, options: FFCVOptions) -> FFCVTwoViewLoader:
    """Build the FFCV loader over a .beton with an RGB image field and an int label field
    (the options: :class:`fastsiam.data.options.FFCVOptions`)."""
    path = Path(path)
    order, batches_ahead = options.order, options.batches_ahead
    image_field, label_field = options.image_field, options.label_field
    if order == "quasi_random" and spec.world_size > 1:
        raise ValueError(
            f"ffcv loader: order='quasi_random' is not available with distributed "
            f"training (world_size={spec.world_size}), as in FFCV; use order='random'"
        )
    reader = open_beton(path, image_field, label_field)
    check_scratch(reader, path, image_field, spec.batch_size, batches_ahead)
    sampler = spec.sampler(int(reader.num_samples))
    device = spec.device
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    decoder = (TwoCropDecoder(spec.image_size, spec.scale, spec.ratio, spec.seed) if spec.train
               else CenterCropDecoder(spec.image_size))
    pipelines: dict[str, PipelineSpec | None] = {name: None for name in reader.handlers}
    pipelines[image_field] = PipelineSpec(
        image_field, decoder=decoder, transforms=[ToTensor(), *to_device]
    )
    pipelines[label_field] = PipelineSpec(
        label_field, decoder=IntDecoder(), transforms=[ToTensor(), *to_device]
    )
    quasi = order == "quasi_random" and spec.train
    with _keep_torch_threads():
        loader = FFCVLoader(
            str(path),
            batch_size=spec.batch_size,
            num_workers=max(spec.workers, 1),
            os_cache=options.os_cache,
            order=OrderOption.QUASI_RANDOM if quasi else OrderOption.SEQUENTIAL,
            seed=spec.seed,
            pipelines=pipelines,
            drop_last=False,
            batches_ahead=batches_ahead,
        )
    # The sampler already cut or padded the epoch; FFCV only walks the order it is given.
    loader.traversal_order = SamplerOrder(
        loader, sampler, loader.traversal_order if quasi else None
    )
    num_classes, classes = _classes(path, reader, label_field)
    return FFCVTwoViewLoader(loader, sampler, decoder, device, num_classes, classes, options.copy, path,
                             spec.on_corrupt, spec.batch_draws)


__all__ = ["FFCVTwoViewLoader", "SamplerOrder", "TwoCropDecoder", "build"]
