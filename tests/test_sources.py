"""data_prep.listing (vs torchvision ImageFolder, labels files), data_prep.images (the checks), data_prep.parallel."""

from __future__ import annotations

import functools
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from data_prep.errors import ConversionError
from data_prep.images import check_image, psnr, verify_indices
from data_prep.listing import (
    list_file_list,
    list_flat_folder,
    list_image_folder,
    read_classes,
    write_classes,
)
from data_prep.parallel import parallel_map, start_method
from tests.convert_data import EMPTY_CLASS, plant_bad_files


@pytest.fixture(scope="module")
def bad_tree(toy_imagenet, tmp_path_factory):
    root = tmp_path_factory.mktemp("sources") / "train"
    return root, plant_bad_files(toy_imagenet, root)


@pytest.fixture
def flat_val(toy_imagenet, tmp_path):
    """ImageNet's flat val layout; returns (folder, {file name: class name})."""
    flat = tmp_path / "val"
    flat.mkdir()
    truth = {}
    for path in sorted((toy_imagenet / "val").rglob("*.JPEG")):
        (flat / path.name).write_bytes(path.read_bytes())
        truth[path.name] = path.parent.name
    return flat, truth


def test_image_folder_listing_equals_torchvision(bad_tree):
    from torchvision.datasets import ImageFolder

    root, bad = bad_tree
    source = list_image_folder(root)
    folder = ImageFolder(str(root), allow_empty=True)  # lists the bad image files too
    assert [(it.path, it.label) for it in source.items] == [(str(Path(p).absolute()), y) for p, y in folder.samples]
    assert source.classes == folder.classes and source.classes[0] == EMPTY_CLASS
    assert [it.rel for it in source.items if it.rel in bad.values()] == [bad["truncated"], bad["empty"], bad["garbage"]]
    assert [rel for rel, _ in source.rejected] == [bad["text"]]


def test_image_folder_with_a_fixed_mapping(toy_imagenet):
    classes = ["zzz", *sorted(p.name for p in (toy_imagenet / "val").iterdir())]
    source = list_image_folder(toy_imagenet / "val", classes=classes)
    assert source.classes == classes and {it.label for it in source.items} == {1, 2, 3, 4}
    with pytest.raises(ConversionError, match="is not in the class mapping"):
        list_image_folder(toy_imagenet / "val", classes=classes[:2])


def test_limit_takes_the_first_files_of_each_class(toy_imagenet):
    full = list_image_folder(toy_imagenet / "train")
    limited = list_image_folder(toy_imagenet / "train", limit=2)
    assert limited.items == [it for k, it in enumerate(full.items)
                             if sum(o.label == it.label for o in full.items[:k]) < 2]


def test_flat_folder_with_label_lines_csv_and_indices(flat_val, tmp_path):
    flat, truth = flat_val
    names = sorted(truth)
    classes = sorted(set(truth.values()))
    expected = [classes.index(truth[n]) for n in names]

    (tmp_path / "names.txt").write_text("".join(f"{truth[n]}\n" for n in names))
    source = list_flat_folder(flat, tmp_path / "names.txt")
    assert [it.label for it in source.items] == expected and source.classes == classes
    assert [it.rel for it in source.items] == names

    # CSV in another order, names without extension, a header line and extra fields.
    rows = "".join(f"{n[:-5]},{truth[n]} 1 2 3 4\n" for n in reversed(names))
    (tmp_path / "sol.csv").write_text("ImageId,PredictionString\n" + rows)
    assert [it.label for it in list_flat_folder(flat, tmp_path / "sol.csv").items] == expected

    # Integer labels against a fixed mapping with an extra first class.
    mapping = ["extra", *classes]
    (tmp_path / "ints.txt").write_text("# devkit-style\n" + "".join(f"{y + 1}\n" for y in expected))
    source = list_flat_folder(flat, tmp_path / "ints.txt", classes=mapping)
    assert [it.label for it in source.items] == [y + 1 for y in expected] and source.classes == mapping


@pytest.mark.parametrize(("content", "message"), [
    ("a\n", "has 1 labels for 16 images"),
    ("{first},x\n", "class 'x' is not in the class mapping"),
    ("{first},99\n", "label 99 out of range"),
    ("{first},{cls}\n", "has no label for"),
    ("{first},{cls}\nnope.JPEG,{cls}\n", "no image 'nope.JPEG'"),
])
def test_bad_labels_files_name_the_problem(flat_val, tmp_path, content, message):
    flat, truth = flat_val
    first = sorted(truth)[0]
    path = tmp_path / "labels.txt"
    path.write_text(content.format(first=first, cls=truth[first]))
    classes = sorted(set(truth.values()))
    with pytest.raises(ConversionError, match=message) as e:
        list_flat_folder(flat, path, classes=classes)
    assert "\n" not in str(e.value)


def test_mixed_label_kinds_are_refused(flat_val, tmp_path):
    flat, truth = flat_val
    lines = [truth[n] if k % 2 else "0" for k, n in enumerate(sorted(truth))]
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConversionError, match="mixes class indices and class names"):
        list_flat_folder(flat, tmp_path / "l.txt")


def test_file_list_keeps_the_listed_order(toy_imagenet, tmp_path):
    paths = sorted((toy_imagenet / "val").rglob("*.JPEG"), reverse=True)
    lines = [f"{p.relative_to(toy_imagenet)} {p.parent.name}" for p in paths]
    (tmp_path / "list.txt").write_text("\n".join([*lines, "val/readme.md n0"]) + "\n")
    source = list_file_list(tmp_path / "list.txt", root=toy_imagenet)
    assert [it.path for it in source.items] == [str(p) for p in paths]
    assert [source.classes[it.label] for it in source.items] == [p.parent.name for p in paths]
    assert [rel for rel, _ in source.rejected] == ["val/readme.md"]
    (tmp_path / "bad.txt").write_text("only_a_path.jpg\n")
    with pytest.raises(ConversionError, match=r"bad\.txt:1: expected 'path label'"):
        list_file_list(tmp_path / "bad.txt")


def test_check_image_reasons(bad_tree):
    root, bad = bad_tree
    from PIL import Image

    good = next(p for p in sorted((root / bad["truncated"]).parent.iterdir()) if p.name.endswith("_0.JPEG"))
    with Image.open(good) as im:
        assert check_image(str(good)) == (None, im.size)
    assert check_image(str(root / bad["truncated"]))[0].startswith("corrupt or truncated image")
    assert check_image(str(root / bad["empty"]))[0] == "empty file (0 bytes)"
    assert check_image(str(root / bad["garbage"]))[0] == "not an image (unrecognised format)"
    assert check_image(str(root / "missing.JPEG"))[0].startswith("cannot read")


def test_classes_json_formats(tmp_path):
    write_classes(tmp_path / "c.json", ["b", "a"])
    assert json.loads((tmp_path / "c.json").read_text()) == {"classes": ["b", "a"], "class_to_idx": {"b": 0, "a": 1}}
    assert read_classes(tmp_path / "c.json") == ["b", "a"]
    (tmp_path / "l.json").write_text('["x", "y"]')
    assert read_classes(tmp_path / "l.json") == ["x", "y"]
    (tmp_path / "d.json").write_text('{"y": 1, "x": 0}')  # torchvision's class_to_idx
    assert read_classes(tmp_path / "d.json") == ["x", "y"]
    for text, message in [('{"y": 1}', "values must be 0..0"), ("[1]", "list of class names"),
                          ('["a", "a"]', "must be unique"), ("{", "not readable JSON")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ConversionError, match=message):
            read_classes(tmp_path / "bad.json")


def _square_or_fail(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative {x}")
    return x * x


def test_parallel_map_keeps_order_and_raises():
    items = list(range(50))
    assert list(parallel_map(_square_or_fail, items, workers=2, chunksize=3, window=2)) == [x * x for x in items]
    assert list(parallel_map(functools.partial(pow, 2), items, workers=1)) == [2**x for x in items]
    with pytest.raises(ValueError, match="negative -1"):
        list(parallel_map(_square_or_fail, [1, 2, -1, 3], workers=2, chunksize=1))


def test_parallel_map_spawns_while_other_threads_run():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert start_method() == "spawn"  # forking now could deadlock the workers
        assert list(parallel_map(_square_or_fail, range(20), workers=2, chunksize=4)) == [x * x for x in range(20)]
    finally:
        stop.set()
        thread.join()
    assert start_method() == ("fork" if threading.active_count() == 1 else "spawn")


def test_psnr_and_verify_indices_hand_computed():
    a = np.zeros((4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 1) == pytest.approx(10 * math.log10(255**2))  # MSE 1: 48.13 dB
    assert verify_indices(5, 10) == [0, 1, 2, 3, 4]
    assert verify_indices(101, 5) == [0, 25, 50, 75, 100]
