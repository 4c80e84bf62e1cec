"""The loader interface every backend implements."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any

from fastsiam.data.batch import EvalBatch, TwoViewBatch
from fastsiam.data.sampler import EpochSampler


class Loader(abc.ABC):
    """An epoch-aware, resumable iterable of :class:`TwoViewBatch` (or :class:`EvalBatch`).

    Subclasses implement :meth:`_batches`, which yields the batches of the current epoch
    from ``self.sampler.start_batch`` on. The base class counts what the consumer has taken,
    so :meth:`state_dict` taken mid-epoch resumes with the next unseen batch.

    Attributes:
        sampler: the epoch ordering (see :mod:`fastsiam.data.sampler`).
        num_classes: number of classes in the source (for kNN / linear evaluation).
        classes: class names in label order, when the source records them.
    """

    num_classes: int
    classes: list[str] | None = None

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

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
