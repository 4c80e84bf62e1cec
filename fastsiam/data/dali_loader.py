"""The DALI backend: two views per image from the converter's tar shards, decoded by DALI.

NVIDIA DALI runs decoding and resizing in its own C++ thread pool (``device="cpu"``) or, with
a GPU, decodes with nvJPEG and the hardware JPEG decoder (``device="mixed"``) and crops on the
GPU, so the host only reads bytes. Each image is decoded once and resized into two views
(option ``decode="once"``), or decoded twice with a region of interest (``"twice"``:
``decoders.image_slice`` / ``decoders.image_random_crop``, which skip the parts of the JPEG
outside each crop). Flips and colour work are left to the device augmentation, like every
uint8 backend.

Readers (backend option ``reader``):

- ``index`` (default): fastsiam's :class:`~fastsiam.data.sampler.EpochSampler` order (a full
  permutation per epoch, rank ``r`` of ``w`` taking every ``w``-th sample) and the crops of
  :mod:`fastsiam.data.crops`, fed through ``fn.external_source``; bytes are read with one
  ``pread`` per sample through the index files (:class:`~fastsiam.data.shards.ShardReader`).
  Same samples and crop boxes as the ffcv and nvjpeg backends; resumes mid-epoch exactly.
- ``webdataset``: DALI's own ``fn.readers.webdataset`` over the tars and index files, sharded
  with ``shard_id``/``num_shards`` (rotated every epoch, as DALI does without
  ``stick_to_shard``), a shuffling buffer of ``initial_fill`` samples and ``pad_last_batch``
  (a rank's shard is padded by repeating its last sample), crops drawn by DALI's
  ``random_resized_crop``. The buffer shuffles only locally: on shards written in class order
  (data_prep/to_dali.py's sorted order) a batch holds few classes unless ``initial_fill`` is
  large. A pipeline is built per epoch with the seed (seed, epoch, rank), so an epoch is
  reproducible; a mid-epoch resume replays the epoch's consumed batches (exact, costs their
  decode time).

Damaged samples (``on_corrupt``, :class:`~fastsiam.data.loader.Loader`), ``index`` reader: a
sample whose JPEG header cannot be read is caught in the external source, before DALI sees
it; when DALI's decoder fails, its error names no file (at most "sample #k" of some batch), so
the loader decodes the samples of the batches in flight on the host (torchvision, only on that
error path) to name the damaged one, and with ``skip`` builds the pipeline again from the
failed batch with a black JPEG in the damaged sample's place, in this epoch and every later one.
DALI's decoder, like PIL, shows an image for JPEG data that libjpeg-turbo reports as corrupt
(flipped bytes in the entropy-coded payload); only ``fastsiam verify`` (the manifest's
checksums) or ``verify --decode`` (a strict decode) catch those. The ``webdataset`` reader
chooses its samples inside DALI, so a decode failure stops the run with a pointer to
``fastsiam verify --decode``, and ``skip`` needs the ``index`` reader.

Batches arrive as uint8 channels_last torch tensors on the pipeline's device: DALI's NHWC
outputs (one per view: DALI builds batches sample by sample, so it cannot lay out both views
view-major itself) are each copied once, out of DALI's recycled buffers, into their rows of
one torch tensor (device to device with a GPU), the ``[2B, 3, S, S]`` views of a
:class:`~fastsiam.data.TwoViewBatch` (``[B, 3, S, S]`` for evaluation); its NCHW
permutation is channels_last without another copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
import torch
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray

from fastsiam.data.batch import EvalBatch, TwoViewBatch
from fastsiam.data.crops import derive_seed, eval_crop_fraction, random_crop_boxes, sample_keys
from fastsiam.data.jpeg import JPEGHeaderError, black_jpeg, decoder_message, jpeg_problem, jpeg_size
from fastsiam.data.loader import BatchDraws, CorruptDataError, Loader, LoaderSpec
from fastsiam.data.options import DALIOptions
from fastsiam.data.sampler import EpochSampler
from fastsiam.data.shards import ShardReader, open_shard_folder

LABEL_DIGITS = 8  # the .cls member holds the label as decimal text; padded to this width


def _center_roi(jpegs, image_size: int):
    """The eval box of :func:`fastsiam.data.crops.center_crop_boxes`, computed in the graph
    from the JPEG headers: ROI corners (y0, x0), (y1, x1) as float DataNodes."""
    shape = fn.cast(fn.peek_image_shape(jpegs), dtype=types.INT64)
    h, w = shape[0], shape[1]
    short = fn.cast(dmath.min(h, w), dtype=types.FLOAT64)
    side = fn.cast(dmath.floor(short * eval_crop_fraction(image_size)), dtype=types.INT64)
    side = dmath.max(side, 1)
    top, left = (h - side) // 2, (w - side) // 2
    start = fn.cast(fn.stack(top, left), dtype=types.FLOAT)
    end = fn.cast(fn.stack(top + side, left + side), dtype=types.FLOAT)
    return start, end


class DALITwoViewLoader(Loader):
    """Runs one DALI pipeline per epoch and hands its outputs over as torch tensors.

    Args:
        shards: the shard folder's reader (manifest, index, bytes).
        sampler: epoch, rank share, resume point.
        train: two random views (True) or one center view (False).
        image_size, scale, ratio: the crops.
        reader, decode: see the module docstring.
        workers: DALI CPU threads.
        device: CPU (DALI CPU operators) or a CUDA device (mixed decode, GPU operators).
        initial_fill: shuffling buffer of the ``webdataset`` reader.
        hw_decoder_load: share of the JPEGs sent to the hardware decoder (mixed decode).
        prefetch: batches DALI prepares ahead.
        on_corrupt: ``stop`` or ``skip`` (see the module docstring).
        draws: ``LoaderSpec.batch_draws``, for train batches of the ``index`` reader (whose batches
            are the sampler's) that carry the augmentation's draws; the ``webdataset`` reader
            picks its samples itself and carries none.
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
        reader: str,
        decode: str,
        workers: int,
        device: torch.device,
        initial_fill: int,
        hw_decoder_load: float,
        prefetch: int,
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
        self.reader = reader
        self.decode = decode
        self.workers = max(workers, 1)
        self.device = device
        self.initial_fill = initial_fill
        self.hw_decoder_load = hw_decoder_load
        self.prefetch = prefetch
        self.classes = list(shards.classes)
        self.num_classes = len(self.classes)
        self._damaged: dict[int, str] = {}  # sample -> why; fed as a black JPEG (skip)
        self._fed_batches = 0  # the epoch's batches handed to DALI so far (index reader)

    # ------------------------------------------------------------------ graph

    def _decoder_args(self) -> dict:
        args = {
            "device": "mixed" if self.device.type == "cuda" else "cpu",
            "output_type": types.RGB,
            "adjust_orientation": False,
        }
        if self.device.type == "cuda":
            args["hw_decoder_load"] = self.hw_decoder_load
        return args

    def _pipeline(self) -> Pipeline:
        s = self.sampler
        device_id = None  # DALI's CPU-only mode
        if self.device.type == "cuda":
            device_id = self.device.index
            if device_id is None:
                device_id = torch.cuda.current_device()
        pipe = Pipeline(
            batch_size=s.batch_size,
            num_threads=self.workers,
            device_id=device_id,
            seed=derive_seed(s.seed, s.epoch, s.rank) & 0x7FFFFFFF,
            prefetch_queue_depth=self.prefetch,
        )
        size = (self.image_size, self.image_size)
        dec = self._decoder_args()
        with pipe:
            if self.reader == "index":
                # Per sample: the JPEG, its label and (train) each view's ROI as (y0, x0), (y1, x1).
                rois = 4 if self.train else 0
                jpegs, label, *roi = fn.external_source(
                    source=self._index_source(),
                    num_outputs=2 + rois,
                    batch=True,
                    dtype=[types.UINT8, types.INT64, *[types.INT32] * rois],
                )
            else:
                jpegs, cls = fn.readers.webdataset(
                    paths=self.shards.manifest.tar_paths(self.shards.root),
                    index_paths=self.shards.manifest.index_paths(self.shards.root),
                    ext=["jpg", "cls"],
                    shard_id=(s.rank + s.epoch) % s.world_size if self.train else s.rank,
                    num_shards=s.world_size,
                    random_shuffle=self.train,
                    initial_fill=self.initial_fill,
                    pad_last_batch=True,
                    name="reader",
                )
                label = fn.pad(cls, fill_value=0, shape=(LABEL_DIGITS,), axes=(0,))
            if not self.train:
                start, end = _center_roi(jpegs, self.image_size)
                image = fn.decoders.image(jpegs, **dec)
                view = fn.resize(image, size=size, roi_start=start, roi_end=end, antialias=True)
                pipe.set_outputs(view, label)
                return pipe
            if self.reader == "index":
                corners = [(roi[0], roi[1]), (roi[2], roi[3])]
                if self.decode == "once":
                    image = fn.decoders.image(jpegs, **dec)
                    views = [
                        fn.resize(
                            image,
                            size=size,
                            roi_start=fn.cast(a, dtype=types.FLOAT),
                            roi_end=fn.cast(b, dtype=types.FLOAT),
                            antialias=True,
                        )
                        for a, b in corners
                    ]
                else:
                    views = [
                        fn.resize(
                            fn.decoders.image_slice(jpegs, start=a, end=b, axis_names="HW", **dec),
                            size=size,
                            antialias=True,
                        )
                        for a, b in corners
                    ]
            elif self.decode == "once":
                image = fn.decoders.image(jpegs, **dec)
                views = [
                    fn.random_resized_crop(
                        image,
                        size=size,
                        random_area=self.scale,
                        random_aspect_ratio=self.ratio,
                        antialias=True,
                    )
                    for _ in range(2)
                ]
            else:
                views = [
                    fn.resize(
                        fn.decoders.image_random_crop(
                            jpegs, random_area=self.scale, random_aspect_ratio=self.ratio, **dec
                        ),
                        size=size,
                        antialias=True,
                    )
                    for _ in range(2)
                ]
            pipe.set_outputs(*views, label)
        return pipe

    def _jpeg(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Sample ``i``'s JPEG and (height, width) for the pipeline, or the black JPEG in its
        place when it is known to be damaged or its header is unreadable (``skip``)."""
        data = self.shards.read_component(i, "jpg")
        why = self._damaged.get(i)
        if why is None:
            try:
                return np.frombuffer(data, dtype=np.uint8), jpeg_size(data, "JPEG header")
            except JPEGHeaderError as e:
                why = str(e)
        self._corrupt(f"dali loader: {self.shards.describe(i)}", why)
        black = black_jpeg()
        return np.frombuffer(black, dtype=np.uint8), jpeg_size(black)

    def _index_source(self) -> Iterator[list]:
        """The epoch's batches for ``fn.external_source``: JPEG bytes, labels, two views' ROIs."""
        s = self.sampler
        epoch = s.epoch
        self._fed_batches = s.start_batch
        for indices in s:
            idx = np.asarray(indices, dtype=np.int64)
            data, sizes = zip(*(self._jpeg(i) for i in indices))
            data = list(data)
            self._fed_batches += 1
            labels = self.shards.labels[idx]
            if not self.train:
                yield [data, labels]
                continue
            hw = np.array(sizes)
            rois = []
            for v in (0, 1):
                box = random_crop_boxes(
                    sample_keys(s.seed, epoch, idx, v), hw[:, 0], hw[:, 1], self.scale, self.ratio
                ).astype(np.int32)
                rois += [np.ascontiguousarray(box[:, :2]), box[:, :2] + box[:, 2:]]
            yield [data, labels, *rois]

    # ------------------------------------------------------------------ iteration

    def _to_torch(self, tensor_lists, n: int) -> torch.Tensor:
        """The image outputs (one per view) as one channels_last ``[views * n, 3, S, S]``
        tensor, view-major, that the consumer owns: one copy per output out of DALI's buffer
        (recycled on the next run), straight into the view's rows.

        Output ``k`` (``m >= n`` samples) is written to rows ``[k * n, k * n + m)``: the rows
        past ``n`` of a padded batch (the webdataset reader's ``pad_last_batch``) are
        overwritten by the next view, or cut off after the last, so no other copy is needed.
        """
        dense = [t.as_tensor() for t in tensor_lists]
        m, *sample = dense[0].shape()
        views = len(dense)
        out = torch.empty(((views - 1) * n + m, *sample), dtype=torch.uint8, device=self.device)
        # In view order (queued on one stream with a GPU): a view's padding is written before
        # the next view overwrites it.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for k, d in enumerate(dense):
            feed_ndarray(d, out[k * n : k * n + m], cuda_stream=stream)
        return out[: views * n].permute(0, 3, 1, 2)

    def _labels(self, tensor_list) -> torch.Tensor:
        array = tensor_list.as_array()
        if self.reader == "webdataset":  # decimal text, zero-padded on the right
            digits = array.astype(np.int64)
            value = np.zeros(len(digits), np.int64)
            for col in digits.T:
                present = col != 0
                value = np.where(present, value * 10 + (col - ord("0")), value)
            array = value
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(
            self.device, non_blocking=True
        )

    def _samples_on_rank(self) -> int:
        # The sampler's count for this rank (drop_last cut, or padded to the largest shard).
        s = self.sampler
        w = s.world_size
        return len(s) * s.batch_size if s.drop_last else -(-s.num_samples // w)

    def _decode_failed(self, error: RuntimeError) -> None:
        """DALI's decoder failed on a batch in flight: name the damaged samples (a host decode
        of those batches' samples) and stop, or (``skip``) remember them for the next pipeline."""
        s = self.sampler
        reason = decoder_message(error)
        if self.reader == "webdataset":
            raise CorruptDataError(
                f"dali loader: {self.shards.root}: DALI failed in batch {s.start_batch} of epoch "
                f"{s.epoch} ({reason}); its webdataset reader does not say which sample: run "
                f"`fastsiam verify --decode {self.shards.root}` to name it, or use reader=index, "
                "which names damaged samples and can skip them"
            ) from None
        batches = list(s)[: self._fed_batches - s.start_batch]
        found = {}
        for i in (i for batch in batches for i in batch if i not in self._damaged):
            why = jpeg_problem(self.shards.read_component(i, "jpg"))
            if why is not None:
                found[i] = f"JPEG does not decode ({why})"
        if not found:
            raise RuntimeError(
                f"dali loader: DALI failed in batch {s.start_batch} of epoch {s.epoch} of "
                f"{self.shards.root}, whose samples all decode with libjpeg-turbo: {reason}"
            ) from error
        for i, why in found.items():
            if self.on_corrupt == "stop":
                self._corrupt(f"dali loader: {self.shards.describe(i)}", why)
            self._damaged[i] = why  # counted and warned when the next pipeline feeds it

    def _batches(self) -> Iterator[TwoViewBatch | EvalBatch]:
        s = self.sampler
        while s.start_batch < len(s):  # one pass, or a new pipeline after a damaged sample
            pipe = self._pipeline()
            pipe.build()
            try:
                if self.reader == "webdataset":
                    for _ in range(s.start_batch):  # replay to the resume point (module docstring)
                        pipe.run()
                remaining = self._samples_on_rank() - s.start_batch * s.batch_size
                order = s.rank_indices().numpy() if self.draws is not None else None
                for b in range(s.start_batch, len(s)):
                    try:
                        outputs = pipe.run()
                    except RuntimeError as e:
                        self._decode_failed(e)
                        break
                    n = min(s.batch_size, remaining)
                    remaining -= n
                    views = self._to_torch(outputs[:-1], n)
                    label = self._labels(outputs[-1])[:n]
                    if not self.train:
                        yield EvalBatch(views, label)
                        continue
                    draws = None
                    if order is not None:
                        indices = order[b * s.batch_size:(b + 1) * s.batch_size]
                        draws = self.draws(s.epoch, indices)
                    yield TwoViewBatch(views, label, draws)
                else:
                    return
            finally:
                del pipe


def build(path: str | Path, spec: LoaderSpec, options: DALIOptions) -> DALITwoViewLoader:
    """Build the DALI loader over a shard folder written by ``data_prep/to_dali.py`` (the
    options: :class:`fastsiam.data.options.DALIOptions`)."""
    path = Path(path)
    reader, decode, prefetch = options.reader, options.decode, options.prefetch
    initial_fill, hw_decoder_load = options.initial_fill, options.hw_decoder_load
    if spec.on_corrupt == "skip" and reader != "index":
        raise ValueError(
            f"dali loader: on_corrupt='skip' needs reader='index' (DALI's {reader} reader picks "
            "its samples itself, so a damaged one cannot be replaced)"
        )
    shards = open_shard_folder(path, "dali")
    return DALITwoViewLoader(
        shards,
        spec.sampler(len(shards)),
        train=spec.train,
        image_size=spec.image_size,
        scale=spec.scale,
        ratio=spec.ratio,
        reader=reader,
        decode=decode,
        workers=spec.workers,
        device=spec.device,
        initial_fill=initial_fill,
        hw_decoder_load=hw_decoder_load,
        prefetch=prefetch,
        on_corrupt=spec.on_corrupt,
        draws=spec.batch_draws if reader == "index" else None,
    )


__all__ = ["DALITwoViewLoader", "build"]
