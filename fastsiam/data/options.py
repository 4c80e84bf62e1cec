"""Each loader backend's own settings (``data.options``), one dataclass per backend.

A backend is registered with its options class (``register_backend(..., options=...)``) and
its ``build(path, spec, options)`` receives an instance. The fields are declared like the
config's own sections (:func:`fastsiam.config.setting`: default, choices, bounds, help), so the
config checks ``data.options`` with the same one-line errors as every other key and
``--help-config`` lists them, and :func:`fastsiam.data.build_loader` checks options given as
keyword arguments the same way. This module imports no backend library (ffcv, DALI): a machine
that writes configs without them still validates every backend's options.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastsiam.config import setting

__all__ = ["DALIOptions", "FFCVOptions", "NVJPEGOptions", "NoOptions", "PILOptions", "SyntheticOptions"]


@dataclass(frozen=True)
class NoOptions:
    """A backend that takes no options."""


@dataclass(frozen=True)
class PILOptions:
    augment: str = setting("full", choices=["full", "crop"], help="full: the official recipe per view, "
                           "in PIL; crop: random-resized crop only (plain uint8 views, for linear "
                           "evaluation and the aug.* recipe on the device)")


@dataclass(frozen=True)
class FFCVOptions:
    order: str = setting("random", choices=["random", "quasi_random"], help="random: the sampler's permutation; "
                         "quasi_random: FFCV's page-local shuffle (one process only)")
    os_cache: bool = setting(True, help="let the OS page cache hold the file (FFCV's default; good when it "
                             "fits in RAM or several processes read it); false reads pages into the process")
    batches_ahead: int = setting(3, min=1, help="batches FFCV prepares in advance")
    copy: bool = setting(True, help="FFCV refills its output buffers batches_ahead + 2 batches later: true "
                         "hands out copies the consumer may keep, false the buffers themselves, as stock "
                         "FFCV does (one memcpy less per batch; fine for a consumer that uses each batch "
                         "before drawing the next few, like the trainer)")
    image_field: str = setting("image", help="the .beton's RGB image field")
    label_field: str = setting("label", help="the .beton's int label field")


@dataclass(frozen=True)
class DALIOptions:
    reader: str = setting("index", choices=["index", "webdataset"], help="index: fastsiam's sampler over the shards' "
                          "index files; webdataset: DALI's own tar reader with a shuffling buffer")
    decode: str = setting("once", choices=["once", "twice"], help="once: decode, then two ROI resizes; "
                          "twice: two ROI decodes")
    initial_fill: int = setting(1024, min=1, help="the webdataset reader's shuffling buffer, in samples")
    hw_decoder_load: float = setting(0.65, min=0.0, max=1.0, help="share of JPEGs for the hardware "
                                     "decoder (mixed decode on A100/H100)")
    prefetch: int = setting(2, min=1, help="DALI's prefetch queue depth, in batches")


@dataclass(frozen=True)
class NVJPEGOptions:
    readers: int = setting(4, min=1, help="threads reading a batch's bytes (more for network file systems)")
    prefetch: int = setting(2, min=1, help="finished batches held ahead of the consumer")
    resize: str | None = setting(None, choices=["kernel", "batched", "per_image"], help="kernel (one NVRTC "
                                 "kernel; GPU), batched (torch's matrix products; any device) or per_image "
                                 "(torchvision per image; CPU); null: kernel on a GPU (batched where it does "
                                 "not compile), per_image on the CPU")


@dataclass(frozen=True)
class SyntheticOptions:
    # An epoch of a few hundred steps: made-up data has no size of its own, and a step benchmark
    # wants epochs (schedules, sampler restarts) to come round, not ImageNet's 1.28 M samples.
    num_samples: int = setting(10_240, min=1, help="the epoch's length")
    num_classes: int = setting(1000, min=1, help="the label range")
