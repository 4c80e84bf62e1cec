"""Write a small, procedurally generated dataset in ImageNet's folder layout.

Tests, benchmarks and smoke runs need an ImageNet look-alike that is made in seconds, is
byte-identical for the same arguments, and still carries a signal that a few CPU minutes of
SimSiam learn. Each class is one kind of shape (circle, star, crescent, spiral, ... and,
beyond the named ones, outlines with holes, rosettes, stars, gears, flowers, ...: see
``toy_shapes``), repeated over the image on a jittered grid, each instance with its own
size, rotation and colour, on a mosaic of random colours. The label lives only in shape and
structure: SimSiam's views (Chen & He, "Exploring Simple Siamese Representation Learning",
CVPR 2021) jitter colours and drop them to grayscale, and every colour statistic here is
drawn from the same distribution for every class.

Why this scene and not one object on a plain background (measured with the demo config,
ResNet-18 at 64 px, ~750 steps on 2 CPU cores): when an image has its own colours, the
cheapest feature two crops share is that colour, and SimSiam learns it first: for every
single-object variant tried (textured, plain, grey or constant grounds; random, palette or no
colour) the kNN monitor stayed within a few points of random init (10-18% against 8-15%).
Colours drawn per instance and per ground cell carry no such cue, and every crop contains the
shape: the demo then reaches about twice its random-init kNN top-1.

Layout (what ``torchvision.datasets.ImageFolder`` reads, sorted wnid = class index)::

    <out>/train/<wnid>/<wnid>_<i>.JPEG
    <out>/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG
    <out>/toy_imagenet.json        the summary (classes, shapes, counts, quirk files)

With ``quirks=True`` it also plants ImageNet's real oddities: grayscale JPEGs (mode L) in
train and val, one CMYK JPEG and one PNG file named ``.JPEG`` in train.

``style="photo"`` (``--style photo``) paints dead-leaves images instead (``dead_leaves``): no
class signal, but a photograph's entropy, so JPEGs decode at a photograph's speed. The
benchmarks use it; ``--min-side 340 --max-side 500`` gives ImageNet's ~0.11-0.25 MP and
~50-150 KB per file.

Usage::

    python data_prep/make_toy_imagenet.py --out data/toy_imagenet [--classes 10]
        [--train-per-class 100] [--val-per-class 30] [--seed 0] [--min-side 200]
        [--max-side 600] [--no-quirks] [--overwrite] [--workers 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

try:
    from data_prep.dead_leaves import paint_dead_leaves
    from data_prep.toy_shapes import class_shape, num_shapes
except ModuleNotFoundError:  # run as a script: python data_prep/make_toy_imagenet.py
    from dead_leaves import paint_dead_leaves  # type: ignore[no-redef]
    from toy_shapes import class_shape, num_shapes  # type: ignore[no-redef]

MAX_WNIDS = 1000
JPEG_QUALITY = 90
SUMMARY_NAME = "toy_imagenet.json"
STYLES = ("shapes", "photo")


def class_wnids(num_classes: int) -> list[str]:
    """ImageNet-like wnids (``n`` + 8 digits), increasing, the same prefix for any count."""
    if not 0 <= num_classes <= MAX_WNIDS:
        raise ValueError(f"num_classes={num_classes}: expected 0..{MAX_WNIDS}")
    gaps = np.random.default_rng(1440764).integers(1000, 90000, size=MAX_WNIDS)
    ids = 1440764 + np.cumsum(gaps) - gaps[0]
    return [f"n{int(i):08d}" for i in ids[:num_classes]]


# ----------------------------------------------------------------------------- painting

# Luma bands of the two tones: every image is either dark shapes on a light ground or light
# shapes on a dark ground (equally likely), so the outlines survive grayscale views and the
# mean brightness is the same for every class.
DARK_LUMA = (15.0, 80.0)
LIGHT_LUMA = (170.0, 245.0)
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def _colours(rng: np.random.Generator, n: int, luma: tuple[float, float]) -> np.ndarray:
    """``n`` random RGB colours (uint8, ``[n, 3]``) with their luma drawn from ``luma``."""
    rgb = rng.uniform(0.0, 255.0, size=(n, 3))
    shift = rng.uniform(*luma, size=n) - rgb @ _LUMA_WEIGHTS
    return np.clip(rgb + shift[:, None], 0, 255).astype(np.uint8)


def _confetti(rng: np.random.Generator, w: int, h: int, cell: float,
              luma: tuple[float, float]) -> Image.Image:
    """A ground of square cells of side ``cell``, each its own random colour."""
    gw, gh = int(w / cell) + 1, int(h / cell) + 1
    cells = _colours(rng, gw * gh, luma).reshape(gh, gw, 3)
    return Image.fromarray(cells).resize((w, h), Image.NEAREST)


def _paste_shape(rng: np.random.Generator, image: Image.Image, layers: list, cx: float,
                 cy: float, radius: float, colour: np.ndarray) -> None:
    # The layers are drawn into a mask of the shape's bounding box only (holes cut out of it),
    # then the colour is pasted through it, so a hole shows the ground beneath.
    angle = rng.uniform(0.0, 2.0 * math.pi)
    sx, sy = radius * rng.uniform(0.85, 1.15, size=2)
    c, s = math.cos(angle), math.sin(angle)
    box = math.ceil(1.2 * radius) + 1
    mask = Image.new("L", (2 * box, 2 * box), 0)
    draw = ImageDraw.Draw(mask)
    for poly, value in layers:
        x, y = poly[:, 0] * sx, poly[:, 1] * sy
        draw.polygon([tuple(p) for p in np.stack([c * x - s * y + box, s * x + c * y + box], 1)],
                     fill=value)
    image.paste(tuple(int(v) for v in colour), (round(cx) - box, round(cy) - box), mask)


def paint_image(rng: np.random.Generator, class_index: int, min_side: int,
                max_side: int) -> Image.Image:
    """One RGB image of class ``class_index``: a jittered grid of its shape on confetti.

    Every instance has its own size, rotation and colour, and the ground is a mosaic of
    random colours, so no colour statistic belongs to an image or a class: what two random
    crops of one image share, and what images of one class share, is the shape.
    """
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    side = min(w, h)
    shape_luma, ground_luma = ((DARK_LUMA, LIGHT_LUMA) if rng.random() < 0.5
                               else (LIGHT_LUMA, DARK_LUMA))
    image = _confetti(rng, w, h, rng.uniform(0.08, 0.15) * side, ground_luma)
    _, layers = class_shape(class_index)
    radius = rng.uniform(0.07, 0.1) * side
    pitch = 2.5 * radius
    centres = [(x, y) for y in np.arange(pitch / 2, h, pitch) for x in np.arange(pitch / 2, w, pitch)]
    colours = _colours(rng, len(centres), shape_luma)
    for (x, y), colour in zip(centres, colours):
        dx, dy = rng.uniform(-0.2, 0.2, size=2) * pitch
        _paste_shape(rng, image, layers, x + dx, y + dy, radius * rng.uniform(0.8, 1.2), colour)
    return image


# ----------------------------------------------------------------------------- writing


def _write_one(task: tuple[str, tuple[int, ...], int, int, int, str, str]) -> None:
    path, key, class_index, min_side, max_side, quirk, style = task
    rng = np.random.default_rng(list(key))
    if style == "photo":
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        image = paint_dead_leaves(rng, w, h)
    else:
        image = paint_image(rng, class_index, min_side, max_side)
    if quirk == "grayscale":
        image.convert("L").save(path, "JPEG", quality=JPEG_QUALITY)
    elif quirk == "cmyk":
        image.convert("CMYK").save(path, "JPEG", quality=JPEG_QUALITY)
    elif quirk == "png":
        image.save(path, "PNG")
    else:
        image.save(path, "JPEG", quality=JPEG_QUALITY)


def _check_args(num_classes: int, train_per_class: int, val_per_class: int, min_side: int,
                max_side: int, quirks: bool, workers: int, style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style={style!r}: expected one of {', '.join(STYLES)}")
    if not 1 <= num_classes <= num_shapes():
        raise ValueError(f"num_classes={num_classes}: expected 1..{num_shapes()} (one "
                         "distinct shape per class)")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"train_per_class={train_per_class}, val_per_class={val_per_class}: "
                         "expected at least 1 image per class in each split")
    if not 16 <= min_side <= max_side:
        raise ValueError(f"min_side={min_side}, max_side={max_side}: expected "
                         "16 <= min_side <= max_side")
    if quirks and num_classes * train_per_class < 4:
        raise ValueError(f"quirks=True needs at least 4 train images (2 grayscale, 1 CMYK, "
                         f"1 PNG), got {num_classes * train_per_class}; pass quirks=False")
    if workers < 1:
        raise ValueError(f"workers={workers}: expected at least 1")


def make_toy_imagenet(root: str | os.PathLike[str], *, num_classes: int = 10,
                      train_per_class: int = 100, val_per_class: int = 30, seed: int = 0,
                      min_side: int = 200, max_side: int = 600, quirks: bool = True,
                      overwrite: bool = False, workers: int = 1, style: str = "shapes") -> dict:
    """Write the toy ImageNet under ``root`` and return its summary.

    Args:
        root: Output folder. It must not exist or be empty unless ``overwrite``.
        num_classes: Number of classes, 1 to ``num_shapes()`` (about 100); class ``i`` is
            the shape ``class_shape(i)``.
        train_per_class: Train images per class.
        val_per_class: Val images per class.
        seed: Seed of every random choice; the same arguments give byte-identical files.
        min_side: Smallest image width/height in pixels.
        max_side: Largest image width/height in pixels (width and height are drawn apart,
            so aspect ratios vary).
        quirks: Plant ImageNet's odd files: 2 grayscale JPEGs in train and 1 in val, a CMYK
            JPEG and a PNG named ``.JPEG`` in train.
        overwrite: Replace a non-empty ``root``.
        workers: Processes to paint with; the output does not depend on it.
        style: ``"shapes"`` (a learnable shape per class) or ``"photo"`` (dead-leaves images
            with a photograph's statistics and no class signal, for benchmarks).

    Returns:
        A dict with ``root`` (absolute Path), ``classes`` (wnids, in class index order),
        ``style``, ``shapes`` (the shape name of each class; empty for photos), ``counts``
        (``{"train": {wnid: n}, "val": {...}}``), ``seed`` and ``quirks``
        (``{"grayscale": [...], "cmyk": [...], "png": [...]}``, absolute Paths). The same
        record, with quirk paths relative to ``root``, is written to
        ``<root>/toy_imagenet.json``.

    The images are painted into a hidden sibling folder that is renamed to ``root`` only
    when complete, so an interrupted run never leaves a complete-looking dataset.
    """
    _check_args(num_classes, train_per_class, val_per_class, min_side, max_side, quirks,
                workers, style)
    root = Path(root)
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root}: exists and is not a folder")
        if any(root.iterdir()) and not overwrite:
            raise FileExistsError(f"{root}: output folder exists and is not empty; "
                                  "pass overwrite=True (--overwrite) to replace it")
    wnids = class_wnids(num_classes)
    tasks, counts, quirk_files = _plan(wnids, train_per_class, val_per_class, seed, min_side,
                                       max_side, quirks)
    record = {
        "classes": wnids,
        "style": style,
        "shapes": [class_shape(c)[0] for c in range(num_classes)] if style == "shapes" else [],
        "counts": counts,
        "seed": seed,
        "quirks": quirk_files,
    }

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        os.chmod(tmp, 0o755)
        for split in ("train", "val"):
            for wnid in wnids:
                (tmp / split / wnid).mkdir(parents=True)
        jobs = [(str(tmp / rel), *rest, style) for rel, *rest in tasks]
        if workers == 1:
            for job in jobs:
                _write_one(job)
        else:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_one, jobs, chunksize=16))
        with open(tmp / SUMMARY_NAME, "w") as f:
            json.dump(record, f, indent=1)
        _replace_folder(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    root = root.absolute()
    quirk_paths = {q: [root / rel for rel in rels] for q, rels in quirk_files.items()}
    return {**record, "root": root, "quirks": quirk_paths}


def _plan(wnids: list[str], train_per_class: int, val_per_class: int, seed: int,
          min_side: int, max_side: int, quirks: bool) -> tuple[list, dict, dict]:
    """The painting tasks (relative path, RNG key, class, sides, quirk), counts, quirk files."""
    # Quirky files at seeded positions; they keep their painted content, only the encoding
    # changes, as in ImageNet. Each image has its own RNG key, so workers cannot reorder it.
    pick = np.random.default_rng([seed, 7])
    train_slots = pick.choice(len(wnids) * train_per_class, size=4 if quirks else 0,
                              replace=False)
    val_slots = pick.choice(len(wnids) * val_per_class, size=1 if quirks else 0,
                            replace=False)
    quirk_of = {("train", int(s)): q for s, q in
                zip(train_slots, ("grayscale", "grayscale", "cmyk", "png"))}
    quirk_of.update({("val", int(s)): "grayscale" for s in val_slots})

    tasks: list = []
    counts: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    quirk_files: dict[str, list[str]] = {"grayscale": [], "cmyk": [], "png": []}
    for split_id, (split, per_class) in enumerate((("train", train_per_class),
                                                  ("val", val_per_class))):
        for c, wnid in enumerate(wnids):
            counts[split][wnid] = per_class
            for i in range(per_class):
                slot = c * per_class + i
                # ImageNet's names: <wnid>_<n>.JPEG in train, numbered val files.
                name = (f"{wnid}_{i}.JPEG" if split == "train"
                        else f"ILSVRC2012_val_{slot + 1:08d}.JPEG")
                rel = f"{split}/{wnid}/{name}"
                quirk = quirk_of.get((split, slot), "")
                if quirk:
                    quirk_files[quirk].append(rel)
                tasks.append((rel, (seed, split_id, c, i), c, min_side, max_side, quirk))
    return tasks, counts, quirk_files


def _replace_folder(new: Path, root: Path) -> None:
    # rename(2) replaces an empty folder; a non-empty one (overwrite) is moved aside first
    # and deleted only after the new one is in place.
    if root.exists() and any(root.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
        os.replace(root, old / "data")
        os.replace(new, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            root.rmdir()
        os.replace(new, root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (ImageNet layout)")
    parser.add_argument("--classes", type=int, default=10,
                        help=f"number of classes (at most {num_shapes()})")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=200)
    parser.add_argument("--max-side", type=int, default=600)
    parser.add_argument("--no-quirks", action="store_true",
                        help="no grayscale/CMYK/PNG-named-JPEG files")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--workers", type=int, default=1, help="painting processes")
    parser.add_argument("--style", choices=STYLES, default="shapes",
                        help="shapes: a learnable shape per class; photo: dead-leaves images "
                        "with a photograph's statistics, for benchmarks")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = make_toy_imagenet(
            args.out, num_classes=args.classes, train_per_class=args.train_per_class,
            val_per_class=args.val_per_class, seed=args.seed, min_side=args.min_side,
            max_side=args.max_side, quirks=not args.no_quirks, overwrite=args.overwrite,
            workers=args.workers, style=args.style)
    except (ValueError, FileExistsError) as e:
        parser.exit(2, f"make_toy_imagenet: error: {e}\n")
    n_train = sum(summary["counts"]["train"].values())
    n_val = sum(summary["counts"]["val"].values())
    print(f"wrote {summary['root']}: {len(summary['classes'])} classes, {n_train} train + "
          f"{n_val} val images in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
