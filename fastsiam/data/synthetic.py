"""Synthetic batches made on the device: the loader that costs (almost) nothing.

For training-step benchmarks, which must measure the step and not the input pipeline: each
batch is drawn with ``torch.randint`` directly on the training device, in the contract's
layout (uint8, channels_last), so no host work or copy is involved. Epochs, sharding and
resume go through the same :class:`~fastsiam.data.sampler.EpochSampler` as the real loaders;
a batch's pixels and labels are a function of (seed, epoch, rank, batch), so a resumed run
sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from fastsiam.data.batch import EvalBatch, TwoViewBatch
from fastsiam.data.crops import derive_seed
from fastsiam.data.loader import Loader, LoaderSpec
from fastsiam.data.options import SyntheticOptions
from fastsiam.data.sampler import EpochSampler


class SyntheticLoader(Loader):
    """Random uint8 views (channels_last: ``[2B, 3, S, S]`` for both views of a train batch,
    ``[B, 3, S, S]`` for val) and labels, generated on ``device``.

    Args:
        sampler: epoch order and this rank's share (only the indices' count and labels matter).
        image_size: side ``S`` of the views.
        num_classes: labels are drawn in ``[0, num_classes)``.
        two_views: ``TwoViewBatch`` (train) or ``EvalBatch`` (val).
        device: where the batches are generated.
    """

    def __init__(
        self,
        sampler: EpochSampler,
        *,
        image_size: int,
        num_classes: int,
        two_views: bool,
        device: torch.device,
    ):
        super().__init__(sampler)
        self.image_size = image_size
        self.num_classes = num_classes
        self.two_views = two_views
        self.device = device
        self._generator = torch.Generator(device=device)

    def _views(self, count: int) -> torch.Tensor:
        s = self.image_size
        # Drawn as NHWC and permuted: the result is channels_last without a copy.
        pixels = torch.randint(
            0, 256, (count, s, s, 3), dtype=torch.uint8, device=self.device,
            generator=self._generator,
        )
        return pixels.permute(0, 3, 1, 2)

    def _batches(self) -> Iterator[TwoViewBatch | EvalBatch]:
        s = self.sampler
        for b, indices in enumerate(s, start=s.start_batch):
            self._generator.manual_seed(derive_seed(s.seed, s.epoch, s.rank, b))
            views = self._views((2 if self.two_views else 1) * len(indices))
            # Labels are drawn on the device too: a label built on the host would be a copy
            # from pageable memory in every step.
            label = torch.randint(0, self.num_classes, (len(indices),), device=self.device,
                                  generator=self._generator)
            yield TwoViewBatch(views, label) if self.two_views else EvalBatch(views, label)


def build(path: str | Path, spec: LoaderSpec, options: SyntheticOptions) -> SyntheticLoader:
    """Build the synthetic loader (``path`` and the spec's ``scale``, ``ratio``, ``workers``
    and ``on_corrupt`` are unused: made-up data is never damaged; the options:
    :class:`fastsiam.data.options.SyntheticOptions`)."""
    return SyntheticLoader(spec.sampler(options.num_samples), image_size=spec.image_size,
                           num_classes=options.num_classes, two_views=spec.train, device=spec.device)


__all__ = ["SyntheticLoader", "build"]
