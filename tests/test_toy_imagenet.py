"""The toy ImageNet generator: layout, determinism, quirks, sizes, safety, class signal."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

import data_prep.make_toy_imagenet as toy
from data_prep.make_toy_imagenet import class_wnids, make_toy_imagenet
from data_prep.toy_shapes import class_shape, num_shapes, shape_mask

SMALL = dict(num_classes=3, train_per_class=5, val_per_class=2, min_side=40, max_side=72)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_layout_is_what_imagefolder_reads(toy_imagenet: Path) -> None:
    record = json.loads((toy_imagenet / "toy_imagenet.json").read_text())
    wnids = record["classes"]
    assert len(wnids) == 4 and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    for split, per_class in (("train", 12), ("val", 4)):
        ds = ImageFolder(str(toy_imagenet / split))
        assert ds.classes == wnids  # sorted wnid order is the class index order
        assert ds.class_to_idx == {w: i for i, w in enumerate(wnids)}
        assert np.bincount(ds.targets).tolist() == [per_class] * 4
        assert record["counts"][split] == dict.fromkeys(wnids, per_class)
        for path, target in ds.samples:
            assert Path(path).parent.name == wnids[target] and path.endswith(".JPEG")
    assert record["shapes"] == ["circle", "triangle", "square", "star"]
    # No temporary folder was left behind next to the dataset.
    assert not list(toy_imagenet.parent.glob(f".{toy_imagenet.name}.*"))


def test_quirk_files_are_what_pil_reports(toy_imagenet: Path) -> None:
    record = json.loads((toy_imagenet / "toy_imagenet.json").read_text())
    quirks = record["quirks"]
    assert len(quirks["grayscale"]) == 3 and len(quirks["cmyk"]) == 1 and len(quirks["png"]) == 1
    assert sum(p.startswith("val/") for p in quirks["grayscale"]) == 1
    assert all(p.startswith("train/") for p in quirks["cmyk"] + quirks["png"])
    expected = {p: ("JPEG", "L") for p in quirks["grayscale"]}
    expected.update({p: ("JPEG", "CMYK") for p in quirks["cmyk"]})
    expected.update({p: ("PNG", "RGB") for p in quirks["png"]})
    for path in sorted(toy_imagenet.rglob("*.JPEG")):
        with Image.open(path) as im:
            rel = str(path.relative_to(toy_imagenet))
            assert (im.format, im.mode) == expected.get(rel, ("JPEG", "RGB")), rel


def test_sides_within_range_and_aspect_ratios_vary(toy_imagenet: Path) -> None:
    sizes = []
    for path in toy_imagenet.rglob("*.JPEG"):
        with Image.open(path) as im:
            sizes.append(im.size)
    sides = np.array(sizes)
    assert sides.min() >= 64 and sides.max() <= 160  # the fixture's min_side, max_side
    ratios = sides[:, 0] / sides[:, 1]
    assert ratios.min() < 0.8 and ratios.max() > 1.25


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    a = make_toy_imagenet(tmp_path / "a", seed=3, **SMALL)
    make_toy_imagenet(tmp_path / "b", seed=3, workers=2, **SMALL)
    make_toy_imagenet(tmp_path / "c", seed=4, **SMALL)
    files_a, files_b, files_c = (_files(tmp_path / n) for n in "abc")
    assert len(files_a) == 3 * (5 + 2) + 1
    assert files_a == files_b  # same seed, any number of workers: byte-identical
    assert files_a.keys() == files_c.keys()
    assert sum(files_a[k] != files_c[k] for k in files_a) > 0.9 * len(files_a)
    assert a["root"] == (tmp_path / "a").absolute()
    assert all(p.is_file() and p.is_relative_to(a["root"]) for ps in a["quirks"].values()
               for p in ps)


def test_refuses_non_empty_output_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        make_toy_imagenet(out, **SMALL)
    assert _files(out) == {"keep.txt": b"precious"}

    cli = [sys.executable, "data_prep/make_toy_imagenet.py", "--out", str(out),
           "--classes", "2", "--train-per-class", "2", "--val-per-class", "1",
           "--min-side", "32", "--max-side", "48"]
    run = subprocess.run(cli, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 2 and "not empty" in run.stderr
    assert _files(out) == {"keep.txt": b"precious"}

    run = subprocess.run([*cli, "--overwrite"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    assert not (out / "keep.txt").exists()
    assert len(ImageFolder(str(out / "train"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = []

    def fail_on_fifth(task: tuple) -> None:
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(task)
        original(task)

    original = toy._write_one
    monkeypatch.setattr(toy, "_write_one", fail_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        make_toy_imagenet(tmp_path / "out", **SMALL)
    assert len(written) == 4
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_classes=0), "num_classes=0"),
    (dict(num_classes=num_shapes() + 1), "distinct shape"),
    (dict(val_per_class=0), "val_per_class=0"),
    (dict(min_side=80, max_side=40), "min_side=80"),
    (dict(num_classes=1, train_per_class=3), "quirks=True needs"),
    (dict(workers=0), "workers=0"),
])
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_toy_imagenet(tmp_path / "out", **{**SMALL, **kwargs})
    assert not (tmp_path / "out").exists()


def test_wnids_look_like_imagenet_and_keep_their_prefix() -> None:
    wnids = class_wnids(num_shapes())
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids == sorted(set(wnids))
    assert class_wnids(7) == wnids[:7]
    assert wnids[0] == "n01440764"  # ImageNet's first class id, for familiarity


def test_mean_colour_does_not_tell_classes_apart(tmp_path: Path) -> None:
    # Colours are drawn the same way for every class, so a nearest-class-mean classifier on
    # the mean RGB of an image must stay near chance (1/4) on held-out images.
    make_toy_imagenet(tmp_path / "d", num_classes=4, train_per_class=40, val_per_class=20,
                      min_side=40, max_side=64, quirks=False)

    def mean_rgb(split: str) -> tuple[np.ndarray, np.ndarray]:
        ds = ImageFolder(str(tmp_path / "d" / split))
        x = np.array([np.asarray(Image.open(p).convert("RGB"), np.float64).mean((0, 1))
                      for p, _ in ds.samples])
        return x, np.array(ds.targets)

    x_train, y_train = mean_rgb("train")
    x_val, y_val = mean_rgb("val")
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(4)])
    pred = np.linalg.norm(x_val[:, None] - centroids[None], axis=2).argmin(1)
    accuracy = float((pred == y_val).mean())
    # 80 val images: chance is 0.25 with a standard deviation of about 0.05.
    assert accuracy < 0.42, accuracy
    # Per channel, class means differ by no more than sampling noise: a z-score over the
    # within-class spread of image means (40 images per class) stays small for every pair.
    within = np.stack([x_train[y_train == c].std(0) for c in range(4)]).mean(0)
    z = np.abs(centroids[:, None] - centroids[None]) / (within * math.sqrt(2 / 40))
    assert z.max() < 4.0, z.max()


def _outline(mask: np.ndarray) -> np.ndarray:
    # Pixels on or next to the mask's boundary (boundary dilated by one pixel).
    p = np.pad(mask, 1)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    edge = np.pad(mask & ~interior, 1)
    return (edge[1:-1, 1:-1] | edge[:-2, 1:-1] | edge[2:, 1:-1] | edge[1:-1, :-2]
            | edge[1:-1, 2:])


def test_every_class_is_a_different_shape() -> None:
    # Up to rotation and mirroring (both are in the views), any two classes differ in the
    # region they cover or in their outline: the best-aligned overlap (IoU) of one of the two
    # stays clearly below 1.
    n, size = num_shapes(), 64
    assert n >= 100 and len({class_shape(i)[0] for i in range(n)}) == n
    poses = [(math.radians(a), m) for m in (False, True) for a in range(0, 360, 10)]
    overlaps = []
    for transform in (lambda m: m, _outline):
        ref = np.stack([transform(shape_mask(i, size)) for i in range(n)])
        ref = ref.reshape(n, -1).astype(np.float32)
        posed = np.stack([[transform(shape_mask(i, size, a, m)) for a, m in poses]
                          for i in range(n)]).reshape(n, len(poses), -1).astype(np.float32)
        inter = np.einsum("ap,bkp->abk", ref, posed)
        area = ref.sum(1)
        overlaps.append((inter / (area[:, None, None] + area[None, :, None] - inter)).max(2))
    worst = np.minimum(*overlaps)
    np.fill_diagonal(worst, 0.0)
    a, b = np.unravel_index(worst.argmax(), worst.shape)
    assert worst.max() < 0.85, (class_shape(a)[0], class_shape(b)[0], worst.max())
