"""data_prep/to_ffcv.py: round trips through ffcv's stock Loader and byte equality with its writer."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.images import VERIFY_MIN_PSNR, psnr
from data_prep.parallel import TEST_DELAY_ENV
from data_prep.to_ffcv import main
from tests.convert_data import imagefolder_reference, plant_bad_files

pytest.importorskip("ffcv", reason="ffcv is not installed")

REPO = Path(__file__).resolve().parents[1]
SIZE = ["--max-resolution", "128"]  # the toy images are 64-160 px: some get shrunk


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*map(str, args), "--quiet"])
    return rc, out.getvalue(), err.getvalue()


def image_modes(path: Path) -> np.ndarray:
    """ffcv's per-sample storage mode (0 jpg, 1 raw) read with ffcv's Reader."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    return reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]["mode"]


def center_crop(image: np.ndarray, max_resolution: int, size: int) -> np.ndarray:
    """ffcv's semantics, restated: longest side shrunk to max_resolution with cv2 INTER_AREA
    (sizes floored), largest centered square, resized to ``size`` with INTER_AREA."""
    import cv2

    h, w = image.shape[:2]
    if max(h, w) > max_resolution:
        r = max_resolution / max(h, w)
        image = cv2.resize(image, (int(r * w), int(r * h)), interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    c = min(h, w)
    crop = np.ascontiguousarray(image[(h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c])
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


class _Images:
    """A stock-ffcv dataset: PIL-decoded RGB arrays, as ffcv-imagenet's ImageFolder gives."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return np.asarray(Image.open(path).convert("RGB")), label


@pytest.fixture(scope="module")
def bad_tree(toy_imagenet, tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv_src") / "train"
    return root, plant_bad_files(toy_imagenet, root)


@pytest.fixture(scope="module")
def converted(bad_tree, tmp_path_factory):
    """One conversion (defaults: proportion mode; 2 workers; --verify) shared by several tests."""
    root, _ = bad_tree
    out = tmp_path_factory.mktemp("ffcv_out") / "train.beton"
    rc, stdout, stderr = run("--src", root, "--out", out, *SIZE, "--workers", "2", "--verify")
    assert rc == 0, stderr
    return out, stdout


def test_stock_loader_reads_every_sample_with_imagefolder_labels(bad_tree, converted):
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    root, bad = bad_tree
    out, stdout = converted
    expected, class_to_idx = imagefolder_reference(root, bad)
    loader = Loader(str(out), batch_size=16, num_workers=2, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((64, 64), 1.0)], "label": [IntDecoder()]})
    images, labels = zip(*[(np.asarray(x), np.asarray(y).reshape(-1)) for x, y in loader])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert labels.tolist() == [y for _, y in expected] and len(expected) == 48
    modes = image_modes(out)
    assert 0 < (modes == 0).sum() < len(modes)  # proportion mode: both JPEG and raw samples
    for got, mode, (path, _) in zip(images, modes, expected):
        ref = center_crop(np.asarray(Image.open(path).convert("RGB")), 128, 64)
        quality = psnr(got, ref)
        assert quality == np.inf if mode == 1 else quality >= VERIFY_MIN_PSNR

    assert json.loads(out.with_name("train.classes.json").read_text())["class_to_idx"] == class_to_idx
    report = out.with_name("train.skipped.tsv").read_text()
    assert {line.split("\t")[0] for line in report.splitlines() if not line.startswith("#")} == set(bad.values())
    assert "skipped 4 files" in stdout and "verify: ok" in stdout


@pytest.mark.parametrize("mode", ["jpg", "raw"])
def test_file_is_byte_identical_to_ffcvs_own_writer(toy_imagenet, tmp_path, mode):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    src = toy_imagenet / "train"  # with the grayscale, CMYK and PNG-named-.JPEG files
    rc, _, err = run("--src", src, "--out", tmp_path / "ours.beton", "--write-mode", mode, *SIZE,
                     "--workers", "2")
    assert rc == 0, err
    samples, _ = imagefolder_reference(src, {})
    writer = DatasetWriter(str(tmp_path / "stock.beton"), {
        "image": RGBImageField(write_mode=mode, max_resolution=128, jpeg_quality=90),
        "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset(_Images(samples), chunksize=100)
    assert (tmp_path / "ours.beton").read_bytes() == (tmp_path / "stock.beton").read_bytes()


def test_output_does_not_depend_on_workers_or_chunks(bad_tree, converted, tmp_path):
    root, _ = bad_tree
    rc, _, err = run("--src", root, "--out", tmp_path / "train.beton", *SIZE, "--workers", "1",
                     "--chunk-size", "7")
    assert rc == 0, err
    for name in ("train.beton", "train.beton.json", "train.classes.json", "train.skipped.tsv"):
        assert (tmp_path / name).read_bytes() == converted[0].with_name(name).read_bytes()


def test_smart_mode_compresses_images_above_the_threshold(toy_imagenet, tmp_path):
    src = toy_imagenet / "val"
    threshold = 100 * 100 * 3
    rc, _, err = run("--src", src, "--out", tmp_path / "v.beton", "--write-mode", "smart",
                     "--smart-threshold", threshold, *SIZE)
    assert rc == 0, err
    samples, _ = imagefolder_reference(src, {})
    sizes = [Image.open(p).size for p, _ in samples]
    stored = [min(1.0, 128 / max(s)) for s in sizes]
    expected = [0 if int(r * w) * int(r * h) * 3 > threshold else 1 for r, (w, h) in zip(stored, sizes)]
    assert image_modes(tmp_path / "v.beton").tolist() == expected and 0 in expected and 1 in expected


def test_killed_run_leaves_no_output_and_a_rerun_replaces_the_leftovers(bad_tree, converted, tmp_path):
    root, _ = bad_tree
    out = tmp_path / "train.beton"
    cmd = [sys.executable, "data_prep/to_ffcv.py", "--src", str(root), "--out", str(out), *SIZE,
           "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, TEST_DELAY_ENV: "0.2"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:  # wait until ffcv's writer has started filling the temporary file
        while not any(p.stat().st_size > 0 for p in tmp_path.glob(".train.beton.*.partial")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the writer never started"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    rc, _, err = run("--src", root, "--out", out, *SIZE, "--workers", "2")
    assert rc == 0, err
    assert "left by an interrupted run" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train.beton.lock", "train.beton", "train.beton.json",
                                                          "train.classes.json", "train.skipped.tsv"]
    assert out.read_bytes() == converted[0].read_bytes()


@pytest.mark.parametrize("found_by", ["header", "decode"])
def test_strict_stops_at_the_first_bad_file(bad_tree, tmp_path, found_by):
    # The header pass finds the empty file; a truncated file, whose header is good, is found
    # only when the writing pass decodes it.
    root, bad = bad_tree
    kept = "empty" if found_by == "header" else "truncated"
    moved = [k for k in bad if k != kept and (k == "text" or found_by == "decode")]
    for k in moved:
        (root / bad[k]).rename(tmp_path / k)
    try:
        rc, _, err = run("--src", root, "--out", tmp_path / "x.beton", "--strict", "--workers", "2")
    finally:
        for k in moved:
            (tmp_path / k).rename(root / bad[k])
    # One line, after ffcv's progress bar when the writing pass found it.
    last = err.rstrip("\n").split("\n")[-1]
    assert rc == 1 and last.startswith(f"error: bad input {root / bad[kept]}: ") and err.count("error") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name not in moved] == [".x.beton.lock"]


@pytest.mark.parametrize(("args", "message"), [
    (["--write-mode", "smart"], "--write-mode smart needs --smart-threshold"),
    (["--compress-probability", "1.5"], "--compress-probability must be in [0, 1], got 1.5"),
    (["--max-resolution", "8"], "--max-resolution must be >= 16, got 8"),
    (["--out", "{tmp}/x.ffcv"], "expected a file name ending in .beton"),
    (["--out", "{existing}"], "already exists; pass --overwrite"),
    (["--src", "{tmp}/nothing"], "is not a folder"),
])
def test_bad_arguments_are_one_line_errors(args, message, toy_imagenet, tmp_path):
    (tmp_path / "e.beton").write_bytes(b"")
    args = [a.format(tmp=tmp_path, existing=tmp_path / "e.beton") for a in args]
    if "--src" not in args:
        args = ["--src", str(toy_imagenet / "val"), *args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "o.beton")]
    rc, _, err = run(*args)
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o.beton").exists()


def test_help_epilog_prints_percent_once() -> None:
    out = subprocess.run([sys.executable, "data_prep/to_ffcv.py", "--help"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    assert "50% JPEG" in " ".join(out.split()) and "%%" not in out
