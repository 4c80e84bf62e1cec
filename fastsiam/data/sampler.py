"""Epoch ordering shared by the backends that index samples themselves.

The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so every rank
computes the same one without communication; rank ``r`` of ``w`` takes positions
``r, r + w, r + 2w, ...``.

Padding rule: with ``drop_last`` the shuffled order is cut to a multiple of ``w * batch_size``
(every rank gets the same number of full batches; the few samples cut differ from epoch to
epoch); without it the order is padded to a multiple of ``w`` by repeating its first samples,
as torch's DistributedSampler does, and the last batch of a rank may be short.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class EpochSampler:
    """Batches of sample indices for one rank, resumable mid-epoch.

    Args:
        num_samples: size of the dataset.
        batch_size: samples per batch on this rank.
        shuffle: a fresh permutation per epoch (training) or the natural order (evaluation).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        rank, world_size: this process's share.
        drop_last: see the module's padding rule.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0  # batches of the current epoch already consumed (mid-epoch resume)
        if len(self) == 0:
            raise ValueError(
                f"{num_samples} samples cannot fill one batch of {batch_size} on each of "
                f"{world_size} rank(s); lower the batch size or set drop_last=False"
            )

    @classmethod
    def for_split(cls, num_samples: int, batch_size: int, *, split: str, seed: int, rank: int,
                  world_size: int, drop_last: bool) -> EpochSampler:
        """The sampler every backend uses: shuffled for ``train``, natural order for ``val``."""
        return cls(num_samples, batch_size, shuffle=split == "train", seed=seed, rank=rank,
                   world_size=world_size, drop_last=drop_last)

    def rank_indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        w = self.world_size
        if self.drop_last:
            order = order[: (self.num_samples // (w * self.batch_size)) * w * self.batch_size]
        elif self.num_samples % w:
            pad = w - self.num_samples % w
            order = torch.cat([order, order[:pad]])
        return order[self.rank :: w]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the whole epoch, also when resumed mid-way)."""
        w, b = self.world_size, self.batch_size
        if self.drop_last:
            return self.num_samples // (w * b)
        per_rank = _ceil_div(self.num_samples, w)
        return _ceil_div(per_rank, b)

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.rank_indices().tolist()
        for b in range(self.start_batch, len(self)):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_batch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.start_batch = int(state["start_batch"])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
