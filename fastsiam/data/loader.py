"""The loader interface every backend implements, and its rule for damaged samples."""

from __future__ import annotations

import abc
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastsiam.data.batch import EvalBatch, TwoViewBatch
from fastsiam.data.crops import view_uniforms
from fastsiam.data.sampler import EpochSampler

ON_CORRUPT = ("stop", "skip")
BatchDraws = Callable[[int, "Sequence[int] | np.ndarray"], torch.Tensor]
"""``LoaderSpec.draws``: (epoch, the batch's sample indices) -> its ``TwoViewBatch.draws``."""
log = logging.getLogger("fastsiam")


class CorruptDataError(ValueError):
    """A sample or data file that does not match what was written (one-line message naming
    the file and the sample). A ``ValueError``, so the command line prints it as one line."""


@dataclass(frozen=True)
class LoaderSpec:
    """What every backend's ``build(path, spec, options)`` is asked for: the arguments
    :func:`fastsiam.data.build_loader` shares among backends (see its docstring for each)."""

    batch_size: int
    image_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    workers: int
    device: torch.device
    split: str
    seed: int
    rank: int
    world_size: int
    drop_last: bool
    on_corrupt: str
    view_draws: int = 0

    @property
    def batch_draws(self) -> BatchDraws | None:
        """What a backend calls per train batch for its ``TwoViewBatch.draws``: :meth:`draws`
        when the batches carry the augmentation's draws (a train split and ``view_draws`` >
        0), else ``None`` (the batch leaves them empty and the augmentation draws its own)."""
        return self.draws if self.train and self.view_draws else None

    def draws(self, epoch: int, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The augmentation's ``view_draws`` uniforms per view for a train batch of ``indices``
        (float32 ``[2B, view_draws]``, view-major, on ``device``: see
        :func:`fastsiam.data.crops.view_uniforms`)."""
        u = torch.from_numpy(view_uniforms(self.seed, epoch, indices, self.view_draws))
        return u.to(self.device, non_blocking=True)

    @property
    def train(self) -> bool:
        """Two random views per image (``split="train"``), else one center view in order."""
        return self.split == "train"

    def sampler(self, num_samples: int) -> EpochSampler:
        """This rank's batches of every epoch over ``num_samples`` samples."""
        return EpochSampler.for_split(num_samples, self.batch_size, split=self.split,
                                      seed=self.seed, rank=self.rank,
                                      world_size=self.world_size, drop_last=self.drop_last)


class Loader(abc.ABC):
    """An epoch-aware, resumable iterable of :class:`TwoViewBatch` (or :class:`EvalBatch`).

    Subclasses implement :meth:`_batches`, which yields the batches of the current epoch
    from ``self.sampler.start_batch`` on. The base class counts what the consumer has taken,
    so :meth:`state_dict` taken mid-epoch resumes with the next unseen batch.

    Damaged samples (``on_corrupt``): a backend that finds a sample it cannot decode calls
    :meth:`_corrupt`. ``stop`` raises :class:`CorruptDataError`; ``skip`` has the backend put a
    black image of the sample's label in its place (batch shapes stay static; a black image
    needs no other sample, so the choice never depends on the thread schedule or on which
    neighbours are damaged too), counts it in :attr:`corrupt_count` and logs a warning the
    first time that sample is met.

    Attributes:
        sampler: the epoch ordering (see :mod:`fastsiam.data.sampler`).
        num_classes: number of classes in the source (for kNN / linear evaluation).
        classes: class names in label order, when the source records them.
        on_corrupt: ``stop`` or ``skip``.
        source: the data path (named in the ``fastsiam verify`` hint).
        corrupt_count: damaged samples replaced so far (``skip``), every occurrence in every
            epoch; backends that decode ahead of the consumer (nvjpeg, DALI) count a sample
            when it is decoded, up to their prefetch depth before its batch is handed out.
        corrupt_samples: each damaged sample replaced so far (its name) and why it is damaged.
    """

    num_classes: int
    classes: list[str] | None = None

    def __init__(self, sampler: EpochSampler, on_corrupt: str = "stop",
                 source: str | os.PathLike[str] | None = None):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
        self.sampler = sampler
        self.on_corrupt = on_corrupt
        self.source = source
        self.corrupt_count = 0
        self.corrupt_samples: dict[str, str] = {}
        self._corrupt_lock = threading.Lock()  # decoder threads report concurrently

    def _corrupt(self, name: str, reason: str) -> None:
        """One damaged sample (``name``: backend, file and sample; ``reason``: what is wrong).

        ``stop``: raises :class:`CorruptDataError`. ``skip``: counts it, warns the first time
        this sample is met, and returns; the caller then substitutes the black image.
        """
        if self.on_corrupt == "stop":
            raise CorruptDataError(
                f"{name}: {reason}; set data.on_corrupt=skip to train on with a black image in "
                f"its place, and run `fastsiam verify --decode {self.source}` to list every "
                "damaged sample"
            )
        with self._corrupt_lock:
            self.corrupt_count += 1
            first = name not in self.corrupt_samples
            self.corrupt_samples.setdefault(name, reason)
        if first:
            log.warning("%s: %s; replaced by a black image (data.on_corrupt=skip; counted in "
                        "loader.corrupt_count, warned once per sample)", name, reason)

    @abc.abstractmethod
    def _batches(self) -> Iterator[TwoViewBatch | EvalBatch]:
        """Yield the current epoch's batches, starting at ``self.sampler.start_batch``."""

    def __iter__(self) -> Iterator[TwoViewBatch | EvalBatch]:
        for batch in self._batches():
            self.sampler.start_batch += 1
            yield batch
        # A finished epoch: the next iteration replays this epoch unless set_epoch moves on.
        self.sampler.start_batch = 0

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
