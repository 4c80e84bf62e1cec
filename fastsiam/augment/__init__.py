"""Device-side view augmentation: SimSiam's recipe as batched tensor ops.

- :class:`SimSiamAugment` (``SimSiamAugment.from_config(cfg.aug)``): a
  :class:`~fastsiam.data.TwoViewBatch` of uint8 crops -> two normalized views, every sample
  with its own random draws, graph-safe (see :mod:`fastsiam.augment.simsiam`).
- :func:`to_normalized`: uint8 -> normalized float, for evaluation batches.
- :data:`DRAW_COLUMNS`: the uniforms one view draws; loaders that carry them per sample
  (``TwoViewBatch.draws``) make the augmentation a function of (seed, epoch, sample, view).
- :mod:`fastsiam.augment.functional`: the ops with per-sample parameters, each equal to
  torchvision's v2 functional op applied sample by sample.
"""

from fastsiam.augment import functional
from fastsiam.augment.simsiam import DRAW_COLUMNS, AugParams, SimSiamAugment, to_normalized

__all__ = ["DRAW_COLUMNS", "AugParams", "SimSiamAugment", "functional", "to_normalized"]
