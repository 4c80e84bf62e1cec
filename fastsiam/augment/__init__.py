"""Device-side view augmentation: SimSiam's recipe as batched tensor ops.

- :class:`SimSiamAugment` (``SimSiamAugment.from_config(cfg.aug)``): a
  :class:`~fastsiam.data.TwoViewBatch` of uint8 crops -> two normalized views, every sample
  with its own random draws, graph-safe (see :mod:`fastsiam.augment.simsiam`).
- :func:`to_normalized`: uint8 -> normalized float, for evaluation batches.
- :mod:`fastsiam.augment.functional`: the ops with per-sample parameters, each equal to
  torchvision's v2 functional op applied sample by sample.
"""

from fastsiam.augment import functional
from fastsiam.augment.simsiam import AugParams, SimSiamAugment, to_normalized

__all__ = ["AugParams", "SimSiamAugment", "functional", "to_normalized"]
