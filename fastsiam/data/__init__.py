"""Loader backends behind one contract: ``build_loader(backend, path, ...)``.

Backends are registered by name with the module that implements them; a backend's module is
imported only when it is asked for, so optional libraries (ffcv, DALI) are never needed to
import fastsiam. Each backend module defines ``build(path, spec, options) -> Loader``: ``spec``
is a :class:`~fastsiam.data.loader.LoaderSpec` with the arguments of :func:`build_loader` that
every backend shares (its ``sampler(n)`` is the epoch's batches for this rank), ``options``
an instance of the backend's own options dataclass (:mod:`fastsiam.data.options`; ``data.options``
in a config), already checked.

Damaged data: every backend checks its files at open (cheap checks, O(files)), names a sample
that does not decode, and follows ``on_corrupt`` (see :class:`~fastsiam.data.loader.Loader`);
``fastsiam verify PATH`` (:mod:`fastsiam.verify`) checks every byte against the checksums.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastsiam.config import backend_options as backend_options_of
from fastsiam.data.batch import EvalBatch, TwoViewBatch
from fastsiam.data.loader import ON_CORRUPT, CorruptDataError, Loader, LoaderSpec
from fastsiam.data.options import (
    DALIOptions,
    FFCVOptions,
    NoOptions,
    NVJPEGOptions,
    PILOptions,
    SyntheticOptions,
)
from fastsiam.data.sampler import EpochSampler

__all__ = [
    "CorruptDataError", "EpochSampler", "EvalBatch", "Loader", "LoaderSpec", "TwoViewBatch", "available_backends",
    "build_loader", "build_loader_from_config", "makes_data_up", "register_backend",
]


@dataclass(frozen=True)
class Backend:
    module: str            # implements build(path, spec, options)
    options: type          # its data.options, a dataclass (fastsiam.data.options)
    needs: str | None      # the optional library it imports, for the install hint
    install: str | None    # how to get it
    made_up: bool = False  # the backend makes its data up: no path, no classes to find (synthetic)


_BACKENDS: dict[str, Backend] = {}


def register_backend(
    name: str, module: str, *, options: type = NoOptions, needs: str | None = None,
    install: str | None = None, made_up: bool = False,
) -> None:
    """Make ``module`` available as backend ``name``.

    Args:
        name: the ``data.backend`` value.
        module: an importable module defining ``build(path, spec, options)`` (a
            :class:`LoaderSpec` and an ``options`` instance) that returns a :class:`Loader`.
        options: the dataclass of its ``data.options`` (see :mod:`fastsiam.data.options`),
            declared with :func:`fastsiam.config.setting` so the config checks and lists them.
        needs, install: the optional library ``module`` imports, and how to install it (the
            error a user without it sees).
        made_up: the backend generates its data (no path, no classes to find).
    """
    if not (dataclasses.is_dataclass(options) and isinstance(options, type)):
        raise TypeError(f"register_backend({name!r}): options must be a dataclass type, got {options!r}")
    _BACKENDS[name] = Backend(module, options, needs, install, made_up)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def makes_data_up(backend: str) -> bool:
    """Whether ``backend`` generates its samples (random pixels and labels, for benchmarks)."""
    spec = _BACKENDS.get(backend)
    return spec is not None and spec.made_up


register_backend("pil", "fastsiam.data.pil_loader", options=PILOptions)
register_backend("synthetic", "fastsiam.data.synthetic", options=SyntheticOptions, made_up=True)
register_backend("nvjpeg", "fastsiam.data.nvjpeg_loader", options=NVJPEGOptions)
register_backend("ffcv", "fastsiam.data.ffcv_loader", options=FFCVOptions, needs="ffcv",
                 install="pip install 'fastsiam[ffcv]' (needs apt packages pkg-config libopencv-dev libturbojpeg0-dev)")
register_backend("dali", "fastsiam.data.dali_loader", options=DALIOptions, needs="nvidia.dali",
                 install="pip install 'fastsiam[dali]' (nvidia-dali-cuda120)")


def build_loader(
    backend: str,
    path: str | Path,
    *,
    batch_size: int,
    image_size: int = 224,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    workers: int = 4,
    device: str | torch.device = "cpu",
    split: str = "train",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
    on_corrupt: str = "stop",
    view_draws: int = 0,
    **backend_options: Any,
) -> Loader:
    """Build a loader of ``TwoViewBatch`` (``split="train"``) or ``EvalBatch`` (``"val"``).

    Args:
        backend: a registered name (``fastsiam.data.available_backends()``).
        path: the data in the backend's format (ignored by ``synthetic``).
        batch_size: samples per batch on this rank.
        image_size: output side; val batches are resized to ``image_size / 0.875`` first
            (256 for 224) and center-cropped.
        scale, ratio: RandomResizedCrop ranges for both views.
        workers: worker processes or threads.
        device: where batches are delivered (channels_last).
        split: ``train`` (two random views, shuffled) or ``val`` (one center view, in order).
        seed: the epoch order and crops are a function of (seed, epoch, rank).
        rank, world_size: this process's shard of every epoch.
        drop_last: drop the incomplete last batch (training); see the sampler's padding rule.
        on_corrupt: a sample that does not decode: ``stop`` (raise :class:`CorruptDataError`
            naming its file and sample) or ``skip`` (a black image in its place, counted in
            ``loader.corrupt_count``, warned once per sample).
        view_draws: random numbers per view that train batches carry for the device
            augmentation (``TwoViewBatch.draws``; ``SimSiamAugment.DRAWS``' columns), each a
            function of (seed, epoch, sample, view); 0: none. DALI's ``webdataset`` reader
            (which picks its samples itself), synthetic (made-up data) and pil's ``full``
            mode (augmented in PIL already) carry none.
        backend_options: the backend's own options (its ``data.options``: the fields of its
            options class in :mod:`fastsiam.data.options`), checked as the config checks them.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown loader backend {backend!r}; expected one of {', '.join(available_backends())}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
    registered = _BACKENDS[backend]
    if not registered.made_up and not Path(path).exists():
        raise FileNotFoundError(f"{backend} loader: data path {path} does not exist")
    try:
        module = importlib.import_module(registered.module)
    except ImportError as e:
        if registered.needs and registered.needs in str(e.name or e):
            raise ImportError(
                f"loader backend {backend!r} needs {registered.needs}, which is not installed: "
                f"{registered.install}"
            ) from e
        raise
    spec = LoaderSpec(
        batch_size=batch_size, image_size=image_size, scale=(scale[0], scale[1]),
        ratio=(ratio[0], ratio[1]), workers=workers, device=torch.device(device), split=split,
        seed=seed, rank=rank, world_size=world_size, drop_last=drop_last, on_corrupt=on_corrupt,
        view_draws=view_draws)
    options = backend_options_of(registered.options, backend_options, backend, f"{backend} loader")
    return module.build(path, spec, options)


def build_loader_from_config(
    data_cfg: Any, *, split: str = "train", device: str | torch.device = "cpu", seed: int = 0,
    rank: int = 0, world_size: int = 1, path: str | Path | None = None, batch_size: int | None = None,
    view_draws: int = 0,
) -> Loader:
    """Build from the config's ``data`` section (``train_path`` or ``val_path`` by split)."""
    if path is None:
        path = data_cfg.train_path if split == "train" else data_cfg.val_path
    spec = _BACKENDS.get(data_cfg.backend)
    if not path and (spec is None or not spec.made_up):
        key = "data.train_path" if split == "train" else "data.val_path"
        raise ValueError(f"config key '{key}' is empty: set it to the dataset for the {data_cfg.backend} backend")
    return build_loader(
        data_cfg.backend, path or "", batch_size=batch_size or data_cfg.batch_size,
        image_size=data_cfg.image_size, scale=data_cfg.scale, ratio=data_cfg.ratio,
        workers=data_cfg.workers, device=device, split=split, seed=seed, rank=rank,
        world_size=world_size, drop_last=split == "train", on_corrupt=data_cfg.on_corrupt,
        view_draws=view_draws, **data_cfg.options,
    )
