"""The shape library of the toy ImageNet: one shape per class, all pairwise distinct.

A shape is a list of layers ``(polygon, value)`` in unit coordinates (the shape fits the unit
disc, centred at 0). Drawing the layers in order into a mask, value 255 paints and 0 cuts out
(holes, crescents), so ring, frame and "shape with a hole" are plain polygons too.

The first classes are named shapes (circle, triangle, ..., spiral); after them come
structured families, interleaved so that any number of classes mixes them: an outline with
a hole of another outline, rosettes of ``k`` small outlines, stars, gears, ``k``-lobed
flowers, ``k``-armed asterisks, bars and targets. Parameters are on coarse grids, so no two
classes are the same shape up to rotation, mirroring and scale jitter; the tests check it by
mask overlap.
"""

from __future__ import annotations

import functools
import math
from itertools import zip_longest

import numpy as np
from PIL import Image, ImageDraw

Layer = tuple[np.ndarray, int]
Shape = tuple[str, list[Layer]]


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


def _place(poly: np.ndarray, scale: float, angle: float = 0.0, cx: float = 0.0,
           cy: float = 0.0) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    x, y = poly[:, 0] * scale, poly[:, 1] * scale
    return np.stack([c * x - s * y + cx, s * x + c * y + cy], axis=1)


_PLUS = _poly((-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
              (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3))

# Outlines that the families combine; all fit the unit disc.
_PRIMITIVES: dict[str, np.ndarray] = {
    "disc": _ellipse(),
    "triangle": _regular(3),
    "square": _regular(4),
    "star": _star(5, 0.42),
    "plus": _PLUS,
}

_NAMED: dict[str, list[Layer]] = {
    "circle": [(_ellipse(), 255)],
    "triangle": [(_regular(3), 255)],
    "square": [(_regular(4), 255)],
    "star": [(_star(5, 0.42), 255)],
    "cross": [(_PLUS, 255)],
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


def _holed() -> list[Shape]:
    # An outline with a hole of another outline (disc-in-disc and square-in-square are named).
    return [(f"{outer}_with_{hole}_hole",
             [(_PRIMITIVES[outer], 255), (_place(_PRIMITIVES[hole], 0.62), 0)])
            for hole in _PRIMITIVES for outer in _PRIMITIVES
            if (outer, hole) not in {("disc", "disc"), ("square", "square")}]


def _rosettes() -> list[Shape]:
    # k copies of an outline on a circle, each turned outward (three discs are named).
    shapes = []
    for k in (2, 4, 5, 6, 3):
        a = 0.9 * math.sin(math.pi / k)
        size = min(a / (1 + a), 0.45)
        for name, prim in _PRIMITIVES.items():
            if (k, name) == (3, "disc"):
                continue
            angles = [2 * math.pi * j / k - math.pi / 2 for j in range(k)]
            layers = [(_place(prim, size, t + math.pi / 2, (1 - size) * math.cos(t),
                              (1 - size) * math.sin(t)), 255) for t in angles]
            shapes.append((f"rosette{k}_{name}", layers))
    return shapes


def _stars() -> list[Shape]:
    return [(f"star{k}_{inner}", [(_star(k, inner), 255)])
            for inner in (0.22, 0.42) for k in (3, 4, 6, 8, 10)]


def _gears() -> list[Shape]:
    return [(f"gear{teeth}{'_holed' if hole else ''}",
             [(_gear(teeth, 0.3), 255)] + ([(_ellipse(0.4), 0)] if hole else []))
            for hole in (False, True) for teeth in (6, 8, 14)]


def _flowers() -> list[Shape]:
    t = np.linspace(0.0, 2.0 * math.pi, 144, endpoint=False)
    return [(f"flower{lobes}", [(_radial((1 + 0.45 * np.cos(lobes * t)) / 1.45), 255)])
            for lobes in (2, 3, 4, 5, 7)]


def _asterisks() -> list[Shape]:
    # k thin arms from the centre.
    arm = _poly((0, -0.12), (1, -0.12), (1, 0.12), (0, 0.12))
    return [(f"asterisk{k}", [(_place(arm, 1.0, 2 * math.pi * j / k), 255) for j in range(k)])
            for k in (3, 5, 6, 8)]


def _bars() -> list[Shape]:
    # k parallel bars inside the unit disc ("barcode").
    shapes = []
    for k in (2, 3, 4):
        pitch = 1.6 / k
        ys = [-0.8 + pitch * (j + 0.5) for j in range(k)]
        w = 0.3 * pitch
        shapes.append((f"bars{k}", [(_poly((-0.6, y - w), (0.6, y - w), (0.6, y + w),
                                           (-0.6, y + w)), 255) for y in ys]))
    return shapes


def _targets() -> list[Shape]:
    # An outline frame with a dot of the same outline in its middle.
    return [(f"{name}_target", [(prim, 255), (_place(prim, 0.72), 0), (_place(prim, 0.42), 255)])
            for name, prim in _PRIMITIVES.items()]


def _frames() -> list[Shape]:
    return [(f"{name}_frame", [(_regular(sides), 255), (_regular(sides, 0.62), 0)])
            for name, sides in (("pentagon", 5), ("hexagon", 6))]


def _sectors() -> list[Shape]:
    # Pie slices of a disc (the half disc is named).
    shapes = []
    for degrees in (90, 270):
        t = np.linspace(0.0, math.radians(degrees), degrees // 5 + 1)
        arc = np.stack([np.cos(t), np.sin(t)], axis=1)
        shapes.append((f"sector{degrees}", [(np.concatenate([[[0.0, 0.0]], arc]), 255)]))
    return shapes


@functools.cache
def _library() -> tuple[Shape, ...]:
    families = [_holed(), _rosettes(), _stars(), _gears(), _flowers(), _asterisks(), _bars(),
                _targets(), _frames(), _sectors()]
    interleaved = [s for group in zip_longest(*families) for s in group if s is not None]
    return (*_NAMED.items(), *interleaved)


NAMED_SHAPES: tuple[str, ...] = tuple(_NAMED)


def num_shapes() -> int:
    """How many distinct class shapes there are (the most classes a toy ImageNet can have)."""
    return len(_library())


def class_shape(index: int) -> Shape:
    """Name and layers of the shape that is class ``index``'s label."""
    if not 0 <= index < num_shapes():
        raise IndexError(f"class index {index}: expected 0..{num_shapes() - 1}")
    return _library()[index]


def shape_mask(index: int, size: int, angle: float = 0.0, mirror: bool = False) -> np.ndarray:
    """Class ``index``'s shape as a boolean ``size x size`` mask (the unit disc fills it)."""
    _, layers = class_shape(index)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for poly, value in layers:
        pts = _place(poly * (-1 if mirror else 1, 1), size / 2 - 1, angle, size / 2, size / 2)
        draw.polygon([tuple(p) for p in pts], fill=value)
    return np.asarray(mask) > 0
