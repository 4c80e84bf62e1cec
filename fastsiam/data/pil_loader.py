"""The reference loader: torchvision ImageFolder and the official SimSiam PIL transforms.

This is the loader the official SimSiam code uses (a torch DataLoader decoding and augmenting
each image in PIL on the CPU), kept as the baseline every benchmark compares against and as
the fallback that needs nothing beyond torchvision.

Modes (backend option ``augment``):

- ``full`` (default): the whole official view pipeline on the CPU: RandomResizedCrop,
  ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, RandomGrayscale p=0.2, GaussianBlur sigma in
  [0.1, 2] p=0.5 (PIL's blur with radius = sigma, as the official code), horizontal flip,
  ToTensor, ImageNet normalization. Views are float32 and already normalized; the device-side
  augmentation passes them through.
- ``crop``: RandomResizedCrop only, uint8 views; flip and colour work happen on the device
  like every fast backend (the apples-to-apples baseline for them).

Each sample's random draws are a function of (seed, epoch, index) alone, so a run is
reproducible whatever the number of workers or ranks.

Damaged files: a file PIL cannot open or decode becomes a black image of its label in the
worker, which returns the file's path and the reason with the sample; the loader applies
``on_corrupt`` (:class:`~fastsiam.data.loader.Loader`) in the main process when the batch
arrives, so ``stop`` is one :class:`~fastsiam.data.loader.CorruptDataError` naming the file
(an exception raised in a DataLoader worker reaches the caller wrapped in a multi-line
traceback). PIL, like DALI, shows an image for JPEG data that libjpeg reports as corrupt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets, transforms

from fastsiam.config import IMAGENET_MEAN, IMAGENET_STD
from fastsiam.data.batch import EvalBatch, TwoViewBatch, to_device
from fastsiam.data.jpeg import BLACK_SIDE
from fastsiam.data.loader import BatchDraws, Loader, LoaderSpec
from fastsiam.data.options import PILOptions
from fastsiam.data.sampler import EpochSampler
from fastsiam.imageio import to_rgb


class RandomGaussianBlurPIL:
    """PIL Gaussian blur with radius drawn uniformly from ``sigma`` (the official loader's
    ``GaussianBlur``), drawing from torch's RNG so per-sample seeding covers it."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = tuple(sigma)

    def __call__(self, img: Image.Image) -> Image.Image:
        s = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=s))


def official_view_transform(image_size: int, scale: Sequence[float], ratio: Sequence[float]) -> transforms.Compose:
    """The official SimSiam training view (main_simsiam.py), as a torchvision Compose."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([RandomGaussianBlurPIL((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def crop_view_transform(image_size: int, scale: Sequence[float], ratio: Sequence[float]) -> transforms.Compose:
    """RandomResizedCrop only, to uint8 ``[3, H, W]``."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio)),
        transforms.PILToTensor(),
    ])


def eval_transform(image_size: int) -> transforms.Compose:
    """Resize the short side to ``image_size / 0.875`` (256 for 224), center-crop, uint8."""
    return transforms.Compose([
        transforms.Resize(round(image_size / 0.875)),
        transforms.CenterCrop(image_size),
        transforms.PILToTensor(),
    ])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 of the triple)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    return x & (2**63 - 1)


class TwoViewFolder(Dataset):
    """ImageFolder samples as ``(view1, view2, label, index, bad_path, reason)`` (train) or
    ``(view, label, index, bad_path, reason)`` (val); ``bad_path`` and ``reason`` are ``""``, or
    name a file that does not decode and why (its views are then of a black image).

    Items are addressed as ``(index, epoch)`` so that the epoch reaches persistent workers.
    """

    def __init__(self, folder: datasets.ImageFolder, view: transforms.Compose, two_views: bool, seed: int):
        self.folder = folder
        self.view = view
        self.two_views = two_views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, ...]:
        index, epoch = key
        path, label = self.folder.samples[index]
        bad_path = reason = ""
        try:
            with open(path, "rb") as f:
                img = to_rgb(Image.open(f))  # 16-bit and float images rescaled, not clipped
        except Exception as e:  # PIL raises assorted types on a damaged file
            bad_path, reason = path, f"does not decode ({type(e).__name__}: {e})"
            img = Image.new("RGB", (BLACK_SIDE, BLACK_SIDE))
        if not self.two_views:
            return self.view(img), label, index, bad_path, reason
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.view(img), self.view(img), label, index, bad_path, reason


class _EpochKeys:
    """Batch sampler adapter: the sampler's index batches as ``(index, epoch)`` keys."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(i, epoch) for i in batch]

    def __len__(self) -> int:
        return len(self.sampler)


def _collate(samples: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """:class:`TwoViewFolder` samples as ``(views, labels, indices, bad_paths, reasons)``: ``views``
    stacks every first view, then every second, into one ``[views * B, 3, H, W]`` tensor (the
    layout of a :class:`~fastsiam.data.TwoViewBatch`, by the one stack a batch needs anyway;
    into shared memory in a worker, as ``default_collate`` does)."""
    *views, labels, indices, bad_paths, reasons = zip(*samples)
    return (default_collate([v for view in views for v in view]), default_collate(labels),
            list(indices), list(bad_paths), list(reasons))


class PILLoader(Loader):
    """A torch DataLoader over :class:`TwoViewFolder`, delivering batches to ``device``; with
    ``draws`` (``LoaderSpec.batch_draws``) each train batch carries the augmentation's draws."""

    def __init__(self, dataset: TwoViewFolder, sampler: EpochSampler, workers: int, device: torch.device,
                 on_corrupt: str = "stop", draws: BatchDraws | None = None):
        super().__init__(sampler, on_corrupt, dataset.folder.root)
        self.dataset = dataset
        self.draws = draws
        self.device = device
        self.classes = list(dataset.folder.classes)
        self.num_classes = len(self.classes)
        self._loader = DataLoader(
            dataset,
            batch_sampler=_EpochKeys(sampler),
            collate_fn=_collate,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers > 0 else None,
        )

    def _batches(self) -> Iterator[TwoViewBatch | EvalBatch]:
        for views, label, indices, bad_paths, reasons in self._loader:
            for path, reason in zip(bad_paths, reasons):
                if path:
                    self._corrupt(f"pil loader: {path}", reason)
            views, label = to_device(views, self.device), to_device(label, self.device)
            if not self.dataset.two_views:
                yield EvalBatch(views, label)
            else:
                draws = None if self.draws is None else self.draws(self.sampler.epoch, indices)
                yield TwoViewBatch(views, label, draws)


def build(path: str | Path, spec: LoaderSpec, options: PILOptions) -> PILLoader:
    """Build the PIL reference loader over an ImageFolder directory (``<path>/<class>/<image>``);
    ``options.augment`` is ``full`` (the official recipe per view, in PIL) or ``crop``
    (random-resized crop only: plain uint8 views, for linear evaluation and GPU-side
    augmentation)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"pil loader: {path} is not a directory; expected an ImageFolder (<path>/<class>/<image>)")
    try:
        folder = datasets.ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"pil loader: {path} is not an ImageFolder: {e}") from None
    if not spec.train:
        view = eval_transform(spec.image_size)
    elif options.augment == "full":
        view = official_view_transform(spec.image_size, spec.scale, spec.ratio)
    else:
        view = crop_view_transform(spec.image_size, spec.scale, spec.ratio)
    # The full recipe augments in PIL: the device augmentation has nothing left to draw.
    draws = spec.batch_draws if options.augment == "crop" else None
    return PILLoader(TwoViewFolder(folder, view, two_views=spec.train, seed=spec.seed),
                     spec.sampler(len(folder)), spec.workers, spec.device, spec.on_corrupt, draws)


__all__ = ["PILLoader", "build", "crop_view_transform", "eval_transform", "official_view_transform"]
