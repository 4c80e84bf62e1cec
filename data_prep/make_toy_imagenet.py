"""Write a small, procedurally generated dataset in ImageNet's folder layout.

Tests, benchmarks and smoke runs need an ImageNet look-alike that is made in seconds, is
byte-identical for the same arguments, and still carries a learnable signal. Each class is
one kind of shape (circle, star, crescent, spiral, ... and, beyond the named ones, outlines
with holes, rosettes, stars, gears, flowers, ...: see ``toy_shapes``), drawn in random
colours, sizes, positions and rotations, mostly one large instance and sometimes two or
three, with sparse clutter, on a random flat/gradient/blotchy/striped/checked background. The label lives
only in shape and structure: SimSiam's views (Chen & He, "Exploring Simple Siamese
Representation Learning", CVPR 2021) jitter colours and drop them to grayscale, and every
colour and background statistic here is drawn from the same distribution for every class.

Layout (what ``torchvision.datasets.ImageFolder`` reads, sorted wnid = class index)::

    <out>/train/<wnid>/<wnid>_<i>.JPEG
    <out>/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG
    <out>/toy_imagenet.json        the summary (classes, shapes, counts, quirk files)

With ``quirks=True`` it also plants ImageNet's real oddities: grayscale JPEGs (mode L) in
train and val, one CMYK JPEG and one PNG file named ``.JPEG`` in train.

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
    from data_prep.toy_shapes import class_shape, num_shapes
except ModuleNotFoundError:  # run as a script: python data_prep/make_toy_imagenet.py
    from toy_shapes import class_shape, num_shapes  # type: ignore[no-redef]

MAX_WNIDS = 1000
JPEG_QUALITY = 90
SUMMARY_NAME = "toy_imagenet.json"


def class_wnids(num_classes: int) -> list[str]:
    """ImageNet-like wnids (``n`` + 8 digits), increasing, the same prefix for any count."""
    if not 0 <= num_classes <= MAX_WNIDS:
        raise ValueError(f"num_classes={num_classes}: expected 0..{MAX_WNIDS}")
    gaps = np.random.default_rng(1440764).integers(1000, 90000, size=MAX_WNIDS)
    ids = 1440764 + np.cumsum(gaps) - gaps[0]
    return [f"n{int(i):08d}" for i in ids[:num_classes]]


# ----------------------------------------------------------------------------- painting


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _texture(rng: np.random.Generator, w: int, h: int, soft: bool) -> np.ndarray:
    """A random texture, float32 HxWx3: flat, gradient, blotches, stripes or checks.

    ``soft`` (backgrounds) damps the contrast of stripes and checks: their hard edges must
    not drown the object's outline, which is the label.
    """
    c0, c1 = _colour(rng), _colour(rng)
    kind = int(rng.integers(0, 5))
    if soft and kind in (1, 2):
        c1 = c0 + rng.uniform(0.25, 0.6) * (c1 - c0)
    if kind == 4:  # flat
        return np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    if kind == 3:  # smooth blotches: a coarse random field, upsampled bilinearly
        cells = rng.integers(0, 256, size=(int(rng.integers(2, 8)), int(rng.integers(2, 8))))
        field = Image.fromarray(cells.astype(np.uint8)).resize((w, h), Image.BILINEAR)
        t = np.asarray(field, dtype=np.float32)[..., None] / 255.0
        return c0 + t * (c1 - c0)
    a = rng.uniform(0.0, math.pi)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    if kind == 0:  # linear gradient
        u = xs * math.cos(a) + ys * math.sin(a)
        t = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif kind == 1:  # stripes of random period and orientation
        period = rng.uniform(6.0, 0.25 * max(w, h))
        t = (np.sin((xs * math.cos(a) + ys * math.sin(a)) * (2 * math.pi / period)) > 0)
    else:  # checks
        cell = rng.uniform(6.0, 0.2 * max(w, h))
        t = ((xs // cell + ys // cell) % 2).astype(bool)
    return c0 + t.astype(np.float32)[..., None] * (c1 - c0)


def _fill_colour(rng: np.random.Generator, avoid: float) -> np.ndarray:
    # Enough luminance contrast with what is behind that the shape survives grayscale views.
    for _ in range(20):
        c = _colour(rng)
        if abs(_luma(c) - avoid) >= 60:
            return c
    return np.full(3, 0.0 if avoid > 127 else 255.0, dtype=np.float32)


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, w: int, h: int) -> None:
    # Thin lines and small dots: edges that belong to no class, kept sparse enough that a
    # 1,000-image training set still learns the shapes.
    side = min(w, h)
    for _ in range(int(rng.integers(0, 3))):
        xy = [tuple(rng.uniform(0, 1, 2) * (w, h)) for _ in range(2)]
        draw.line(xy, fill=tuple(int(v) for v in _colour(rng)), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = rng.uniform(0, 1, 2) * (w, h)
        r = rng.uniform(0.01, 0.035) * side
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in _colour(rng)))


def paint_image(rng: np.random.Generator, class_index: int, min_side: int,
                max_side: int) -> Image.Image:
    """One RGB image of class ``class_index``: instances of its shape over a random scene."""
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    canvas = _texture(rng, w, h, soft=True)
    background_luma = _luma(canvas.reshape(-1, 3).mean(axis=0))
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, w, h)

    _, layers = class_shape(class_index)
    # Mostly one large object: with ~100 images per class, several small ones per image
    # leave too little signal to learn (measured with a supervised probe).
    count = int(rng.choice([1, 2, 3], p=[0.75, 0.2, 0.05]))
    side = min(w, h)
    for _ in range(count):
        radius = rng.uniform(0.25, 0.45) * side / math.sqrt(count)
        cx = rng.uniform(0.8 * radius, max(w - 0.8 * radius, 0.8 * radius + 1))
        cy = rng.uniform(0.8 * radius, max(h - 0.8 * radius, 0.8 * radius + 1))
        angle = rng.uniform(0.0, 2.0 * math.pi)
        sx, sy = radius * rng.uniform(0.85, 1.15, size=2)
        c, s = math.cos(angle), math.sin(angle)
        mask = Image.new("L", (w, h), 0)
        mask_draw = ImageDraw.Draw(mask)
        outlines = []
        for poly, value in layers:
            x, y = poly[:, 0] * sx, poly[:, 1] * sy
            pts = [tuple(p) for p in np.stack([c * x - s * y + cx, s * x + c * y + cy], axis=1)]
            mask_draw.polygon(pts, fill=value)
            outlines.append(pts)
        if rng.random() < 0.85:
            fill: Image.Image | tuple[int, ...] = tuple(
                int(v) for v in _fill_colour(rng, background_luma))
        else:  # a textured object, itself contrasting with the scene on average
            tex = _texture(rng, w, h, soft=False)
            shift = 80.0 if background_luma < 128 else -80.0
            tex = np.clip(tex + (background_luma + shift - _luma(tex.reshape(-1, 3).mean(0))),
                          0, 255)
            fill = Image.fromarray(tex.astype(np.uint8))
        image.paste(fill, (0, 0), mask)
        if rng.random() < 0.2:
            edge = tuple(int(v) for v in _colour(rng))
            for pts in outlines:
                draw.polygon(pts, outline=edge, width=int(rng.integers(1, 4)))
    if rng.random() < 0.25:
        _clutter(rng, draw, w, h)
    return image


# ----------------------------------------------------------------------------- writing


def _write_one(task: tuple[str, tuple[int, ...], int, int, int, str]) -> None:
    path, key, class_index, min_side, max_side, quirk = task
    image = paint_image(np.random.default_rng(list(key)), class_index, min_side, max_side)
    if quirk == "grayscale":
        image.convert("L").save(path, "JPEG", quality=JPEG_QUALITY)
    elif quirk == "cmyk":
        image.convert("CMYK").save(path, "JPEG", quality=JPEG_QUALITY)
    elif quirk == "png":
        image.save(path, "PNG")
    else:
        image.save(path, "JPEG", quality=JPEG_QUALITY)


def _check_args(num_classes: int, train_per_class: int, val_per_class: int, min_side: int,
                max_side: int, quirks: bool, workers: int) -> None:
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
                      overwrite: bool = False, workers: int = 1) -> dict:
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

    Returns:
        A dict with ``root`` (absolute Path), ``classes`` (wnids, in class index order),
        ``shapes`` (the shape name of each class), ``counts``
        (``{"train": {wnid: n}, "val": {...}}``), ``seed`` and ``quirks``
        (``{"grayscale": [...], "cmyk": [...], "png": [...]}``, absolute Paths). The same
        record, with quirk paths relative to ``root``, is written to
        ``<root>/toy_imagenet.json``.

    The images are painted into a hidden sibling folder that is renamed to ``root`` only
    when complete, so an interrupted run never leaves a complete-looking dataset.
    """
    _check_args(num_classes, train_per_class, val_per_class, min_side, max_side, quirks,
                workers)
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
        "shapes": [class_shape(c)[0] for c in range(num_classes)],
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
        jobs = [(str(tmp / rel), *rest) for rel, *rest in tasks]
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
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = make_toy_imagenet(
            args.out, num_classes=args.classes, train_per_class=args.train_per_class,
            val_per_class=args.val_per_class, seed=args.seed, min_side=args.min_side,
            max_side=args.max_side, quirks=not args.no_quirks, overwrite=args.overwrite,
            workers=args.workers)
    except (ValueError, FileExistsError) as e:
        parser.exit(2, f"make_toy_imagenet: error: {e}\n")
    n_train = sum(summary["counts"]["train"].values())
    n_val = sum(summary["counts"]["val"].values())
    print(f"wrote {summary['root']}: {len(summary['classes'])} classes, {n_train} train + "
          f"{n_val} val images in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
