"""Write a small, procedurally generated dataset in ImageNet's folder layout.

Tests, benchmarks and smoke runs need an ImageNet look-alike that is made in seconds, is
byte-identical for the same arguments, and still carries a learnable signal. Each class is
one kind of shape (circle, star, crescent, spiral, ... and parametric stars, frames, blobs
and gears beyond the named ones), drawn in random colours, sizes, positions and rotations,
with a few instances and clutter, on a random gradient/texture background. The label lives
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

MAX_CLASSES = 1000
JPEG_QUALITY = 90
SUMMARY_NAME = "toy_imagenet.json"

# A shape is a list of layers (polygon in unit coordinates, value): value 255 paints the
# polygon into the object's mask, 0 cuts it out again (holes, crescents).
Layer = tuple[np.ndarray, int]


# ----------------------------------------------------------------------------- shapes


def _ellipse(r: float = 1.0, cx: float = 0.0, cy: float = 0.0, n: int = 72) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _radial(radii: np.ndarray, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.linspace(0.0, 2.0 * math.pi, len(radii), endpoint=False)
    return np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)


def _regular(sides: int, r: float = 1.0) -> np.ndarray:
    return _radial(np.full(sides, r))


def _star(points: int, inner: float) -> np.ndarray:
    return _radial(np.tile([1.0, inner], points))


def _gear(teeth: int, depth: float) -> np.ndarray:
    # Four vertices per tooth: two on the tip circle, two on the root circle.
    return _radial(np.tile([1.0, 1.0, 1.0 - depth, 1.0 - depth], teeth), phase=0.0)


def _spiral(turns: float = 2.2, width: float = 0.09, n: int = 160) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi * turns, n)
    r = 0.15 + 0.85 * t / t[-1]
    outer = np.stack([(r + width) * np.cos(t), (r + width) * np.sin(t)], axis=1)
    inner = np.stack([(r - width) * np.cos(t), (r - width) * np.sin(t)], axis=1)
    return np.concatenate([outer, inner[::-1]])


def _heart(n: int = 80) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1) / 17.0


def _poly(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


_NAMED: dict[str, list[Layer]] = {
    "circle": [(_ellipse(), 255)],
    "triangle": [(_regular(3), 255)],
    "square": [(_regular(4), 255)],
    "star": [(_star(5, 0.42), 255)],
    "cross": [(_poly((-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3),
                     (0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)),
               255)],
    "ring": [(_ellipse(), 255), (_ellipse(0.6), 0)],
    "square_frame": [(_regular(4), 255), (_regular(4, 0.6), 0)],
    "crescent": [(_ellipse(), 255), (_ellipse(0.85, cx=0.45), 0)],
    "arrow": [(_poly((-1, -0.22), (0.2, -0.22), (0.2, -0.62), (1, 0), (0.2, 0.62),
                     (0.2, 0.22), (-1, 0.22)), 255)],
    "heart": [(_heart(), 255)],
    "spiral": [(_spiral(), 255)],
    "tee": [(_poly((-1, -1), (1, -1), (1, -0.55), (0.22, -0.55), (0.22, 1), (-0.22, 1),
                   (-0.22, -0.55), (-1, -0.55)), 255)],
    "hourglass": [(_poly((-0.8, -1), (0.8, -1), (0.1, 0), (0.8, 1), (-0.8, 1), (-0.1, 0)),
                   255)],
    "gear": [(_gear(10, 0.25), 255), (_ellipse(0.3), 0)],
    "lightning": [(_poly((-0.25, -1), (0.5, -1), (0.1, -0.15), (0.55, -0.15), (-0.4, 1),
                         (-0.1, 0.12), (-0.55, 0.12)), 255)],
    "three_dots": [(_ellipse(0.36, 0.6 * math.cos(a), 0.6 * math.sin(a)), 255)
                   for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)],
    "semicircle": [(np.concatenate([_ellipse(n=73)[:37], [[-1.0, 0.0]]]), 255)],
    "ell": [(_poly((-0.7, -1), (-0.2, -1), (-0.2, 0.5), (0.7, 0.5), (0.7, 1), (-0.7, 1)),
             255)],
}
NAMED_SHAPES: tuple[str, ...] = tuple(_NAMED)


def _parametric(index: int) -> tuple[str, list[Layer]]:
    """A shape for a class beyond the named list, its parameters fixed by the class index."""
    rng = np.random.default_rng([0x5EED, index])
    family = index % 4
    if family == 0:
        points = int(rng.choice([3, 4, 6, 7, 8, 9, 10, 11, 12]))
        inner = float(rng.uniform(0.3, 0.75))
        return f"star{points}_{inner:.2f}", [(_star(points, inner), 255)]
    if family == 1:
        sides = int(rng.choice([3, 5, 6, 7, 8]))
        keep = float(rng.uniform(0.45, 0.75))
        return f"frame{sides}_{keep:.2f}", [(_regular(sides), 255), (_regular(sides, keep), 0)]
    if family == 2:
        t = np.linspace(0.0, 2.0 * math.pi, 96, endpoint=False)
        r = np.ones_like(t)
        for j in range(2, 6):
            r += rng.uniform(0.0, 0.3) * np.cos(j * t + rng.uniform(0, 2 * math.pi))
        r = np.maximum(r, 0.25)
        return f"blob{index}", [(_radial(r / r.max()), 255)]
    teeth = int(rng.integers(5, 15))
    depth = float(rng.uniform(0.15, 0.35))
    hole = float(rng.choice([0.0, rng.uniform(0.2, 0.45)]))
    layers = [(_gear(teeth, depth), 255)]
    if hole > 0:
        layers.append((_ellipse(hole), 0))
    return f"gear{teeth}_{depth:.2f}_{hole:.2f}", layers


def class_shape(index: int) -> tuple[str, list[Layer]]:
    """Name and layers of the shape that is class ``index``'s label."""
    if index < len(NAMED_SHAPES):
        name = NAMED_SHAPES[index]
        return name, _NAMED[name]
    return _parametric(index)


def shape_mask(index: int, size: int, angle: float = 0.0, mirror: bool = False) -> np.ndarray:
    """Class ``index``'s shape as a boolean ``size x size`` mask (unit circle = image)."""
    _, layers = class_shape(index)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(angle), math.sin(angle)
    for poly, value in layers:
        x, y = poly[:, 0] * (-1 if mirror else 1), poly[:, 1]
        pts = np.stack([c * x - s * y, s * x + c * y], axis=1) * (size / 2 - 1) + size / 2
        draw.polygon([tuple(p) for p in pts], fill=value)
    return np.asarray(mask) > 0


def class_wnids(num_classes: int) -> list[str]:
    """ImageNet-like wnids (``n`` + 8 digits), increasing, the same prefix for any count."""
    gaps = np.random.default_rng(1440764).integers(1000, 90000, size=MAX_CLASSES)
    ids = 1440764 + np.cumsum(gaps) - gaps[0]
    return [f"n{int(i):08d}" for i in ids[:num_classes]]


# ----------------------------------------------------------------------------- painting


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A random background-like texture, float32 HxWx3: gradient, stripes, checks or blotches."""
    c0, c1 = _colour(rng), _colour(rng)
    kind = int(rng.integers(0, 5))
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
    side = min(w, h)
    for _ in range(int(rng.integers(0, 4))):
        xy = [tuple(rng.uniform(0, 1, 2) * (w, h)) for _ in range(2)]
        draw.line(xy, fill=tuple(int(v) for v in _colour(rng)), width=int(rng.integers(1, 5)))
    for _ in range(int(rng.integers(0, 5))):
        cx, cy = rng.uniform(0, 1, 2) * (w, h)
        r = rng.uniform(0.01, 0.035) * side
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in _colour(rng)))


def paint_image(rng: np.random.Generator, class_index: int, min_side: int,
                max_side: int) -> Image.Image:
    """One RGB image of class ``class_index``: instances of its shape over a random scene."""
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    canvas = _texture(rng, w, h)
    background_luma = _luma(canvas.reshape(-1, 3).mean(axis=0))
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, w, h)

    _, layers = class_shape(class_index)
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    side = min(w, h)
    for _ in range(count):
        radius = rng.uniform(0.2, 0.4) * side / math.sqrt(count)
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
        if rng.random() < 0.6:
            fill: Image.Image | tuple[int, ...] = tuple(
                int(v) for v in _fill_colour(rng, background_luma))
        else:  # a textured object, itself contrasting with the scene on average
            tex = _texture(rng, w, h)
            shift = 80.0 if background_luma < 128 else -80.0
            tex = np.clip(tex + (background_luma + shift - _luma(tex.reshape(-1, 3).mean(0))),
                          0, 255)
            fill = Image.fromarray(tex.astype(np.uint8))
        image.paste(fill, (0, 0), mask)
        if rng.random() < 0.3:
            edge = tuple(int(v) for v in _colour(rng))
            for pts in outlines:
                draw.polygon(pts, outline=edge, width=int(rng.integers(1, 4)))
    if rng.random() < 0.5:
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
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes={num_classes}: expected 1..{MAX_CLASSES}")
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
        num_classes: Number of classes (1 to 1000); class ``i`` is shape ``class_shape(i)``.
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
        A dict with ``root``, ``classes`` (wnids), ``shapes``, ``counts``
        (``{"train": {wnid: n}, "val": {...}}``), ``seed`` and ``quirks``
        (``{"grayscale": [...], "cmyk": [...], "png": [...]}`` absolute file paths).

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

    # Quirky files at seeded positions; they keep their painted content, only the encoding
    # changes, as in ImageNet.
    pick = np.random.default_rng([seed, 7])
    train_slots = pick.choice(num_classes * train_per_class, size=4 if quirks else 0,
                              replace=False)
    val_slots = pick.choice(num_classes * val_per_class, size=1 if quirks else 0,
                            replace=False)
    quirk_of = {("train", int(s)): q for s, q in
                zip(train_slots, ("grayscale", "grayscale", "cmyk", "png"))}
    quirk_of.update({("val", int(s)): "grayscale" for s in val_slots})

    tasks, relpaths, quirk_files = [], {}, {"grayscale": [], "cmyk": [], "png": []}
    for split_id, (split, per_class) in enumerate((("train", train_per_class),
                                                  ("val", val_per_class))):
        for c, wnid in enumerate(wnids):
            for i in range(per_class):
                slot = c * per_class + i
                name = (f"{wnid}_{i}.JPEG" if split == "train"
                        else f"ILSVRC2012_val_{slot + 1:08d}.JPEG")
                rel = f"{split}/{wnid}/{name}"
                quirk = quirk_of.get((split, slot), "")
                if quirk:
                    quirk_files[quirk].append(str(root.absolute() / rel))
                tasks.append((rel, (seed, split_id, c, i), c, min_side, max_side, quirk))
                relpaths.setdefault(split, {}).setdefault(wnid, 0)
                relpaths[split][wnid] += 1

    summary = {
        "root": str(root.absolute()),
        "classes": wnids,
        "shapes": [class_shape(c)[0] for c in range(num_classes)],
        "counts": relpaths,
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
            json.dump({k: v for k, v in summary.items() if k != "root"}, f, indent=1)
        _replace_folder(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


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
    parser.add_argument("--classes", type=int, default=10, help="number of classes (<= 1000)")
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
