"""Hostile and unlucky inputs for the offline converters (issue 14's converter cases).

A full disk (a real tmpfs), symbolic link loops, file names that are not UTF-8 or hold tabs
and newlines, 16-bit and float images, a FIFO named ``.JPEG``, unreadable sub-folders, two
conversions to one output, and the checksum a finished ``.beton`` carries. Each case failed
before its fix: to_ffcv hung forever on a full disk (to_dali printed a traceback), a loop
multiplied a class, a non-UTF-8 name crashed the report after all the work, 16-bit images
became white, a FIFO hung both converters, an unreadable folder vanished silently, a second
to_ffcv deleted the first one's live partial file and a .beton had no checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.images import BadImage, check_image, decode_image, load_rgb, read_file, to_rgb
from data_prep.listing import list_image_folder
from data_prep.parallel import TEST_DELAY_ENV
from data_prep.reports import Skipped, read_skip_report
from tests.hostile_helpers import small_disk

REPO = Path(__file__).resolve().parents[1]


def run(module: str, *args: object) -> tuple[int, str, str]:
    """A converter's ``main`` in this process: (exit code, stdout, stderr)."""
    main = __import__(f"data_prep.{module}", fromlist=["main"]).main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*map(str, args), "--quiet"])
    return rc, out.getvalue(), err.getvalue()


def run_script(module: str, *args: object, timeout: float = 90,
               env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """A converter as a command, killed (and the test failed) if it outlives ``timeout``."""
    proc = _start(module, *args, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{module}.py hung for {timeout} s; stderr: {err[-2000:]}")
    return proc.returncode, out, err


def _start(module: str, *args: object, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, f"data_prep/{module}.py", *map(str, args), "--quiet"],
                            cwd=REPO, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def val_copy(toy_imagenet, tmp_path) -> Path:
    """A writable copy of the toy val split (4 classes x 4 images)."""
    src = tmp_path / "src"
    shutil.copytree(toy_imagenet / "val", src)
    return src


@pytest.fixture(scope="module")
def big_images(tmp_path_factory) -> Path:
    """32 images of 300-500 px: ~15 MB of raw pixels, two of ffcv's 8 MiB pages."""
    from data_prep.make_toy_imagenet import make_toy_imagenet

    root = tmp_path_factory.mktemp("big")
    make_toy_imagenet(root, num_classes=2, train_per_class=16, val_per_class=1, seed=0,
                      min_side=300, max_side=500, quirks=False)
    return root / "train"


def _first_class(src: Path) -> Path:
    return sorted(p for p in src.iterdir() if p.is_dir())[0]


# ----------------------------------------------------------------------------- 1. a full disk


@pytest.mark.parametrize("mode", ["jpg", "raw"])
def test_ffcv_full_disk_is_one_line_and_removes_the_partial(big_images, tmp_path, mode):
    # jpg: everything fits one page, written by the final flush while ffcv's parent waits
    # in a queue; raw: a page flush in mid-run fails while the writer's own pool is alive.
    with small_disk(tmp_path / "disk", 8192) as disk:
        out = disk / "D" / "x.beton"
        begin = time.monotonic()
        rc, _, err = run_script("to_ffcv", "--src", big_images, "--out", out,
                                "--write-mode", mode, "--workers", "2")
        seconds = time.monotonic() - begin
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
        assert rc == 1, err
        assert "Traceback" not in err and "leaked" not in err, err
        assert lines[-1].startswith("error: ") and "no space left on device" in lines[-1], err
        assert str(out) in lines[-1] and sum("error" in line for line in lines) == 1, err
        assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")] == []
        assert seconds < 60


def test_dali_full_disk_keeps_complete_shards_and_resume_finishes(toy_imagenet, tmp_path):
    src = toy_imagenet / "train"
    rc, _, err = run("to_dali", "--src", src, "--out", tmp_path / "reference", "--shard-size", "8")
    assert rc == 0, err
    with small_disk(tmp_path / "disk", 192) as disk:
        out = disk / "shards"
        rc, _, err = run("to_dali", "--src", src, "--out", out, "--shard-size", "8", "--workers", "2")
        assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "no space left on device" in err and "--resume" in err
        staging = disk / ".shards.partial"
        assert not list(staging.glob("*.partial")) and not out.exists()  # the partial shard is gone
        records = sorted(staging.glob("shard-*.json"))
        assert records, "no complete shard before the disk filled: make the disk larger"
        for record in records:
            entry = json.loads(record.read_text())["entry"]
            assert sha256(staging / entry["tar"]) == entry["sha256"]
        subprocess.run(["mount", "-o", "remount,size=8192k", str(disk)], check=True)
        rc, _, err = run("to_dali", "--src", src, "--out", out, "--shard-size", "8", "--resume")
        assert rc == 0, err
        assert f"resume: {len(records)} shards" in err
        assert files(out) == files(tmp_path / "reference")


# ----------------------------------------------------------------------------- 2. symlink loops


def test_symlink_loops_and_aliases_are_listed_once_and_reported(val_copy):
    cls = _first_class(val_copy)
    before = [it.rel for it in list_image_folder(val_copy).items]
    moved = sorted(cls.iterdir())[0]
    (cls / "sub").mkdir()
    moved.rename(cls / "sub" / moved.name)
    expected = sorted(before)  # the same files, one of them one level deeper
    os.symlink(".", cls / "loop")  # c/loop -> c: os.walk followed it ~40 levels deep
    os.symlink("sub", cls / "zalias")  # a second name for c/sub
    source = list_image_folder(val_copy)
    rels = [it.rel for it in source.items]
    assert len(rels) == len(set(rels)) == len(before)
    assert sorted(os.path.basename(r) for r in rels) == sorted(os.path.basename(r) for r in expected)
    rejected = dict(source.rejected)
    assert "loop" in rejected[f"{cls.name}/loop"]
    assert f"{cls.name}/sub" in rejected[f"{cls.name}/zalias"]


def test_symlink_loop_appears_in_the_converters_report(val_copy, tmp_path):
    cls = _first_class(val_copy)
    os.symlink("..", cls / "up")  # c/up -> the root: every class again, inside c
    rc, _, err = run("to_dali", "--src", val_copy, "--out", tmp_path / "s")
    assert rc == 0, err
    from fastsiam.data.shards import read_manifest

    assert read_manifest(tmp_path / "s").num_samples == 16
    assert [rel for rel, _ in read_skip_report(tmp_path / "s" / "skipped.tsv")] == [f"{cls.name}/up"]


# ----------------------------------------------------------------------------- 3. odd file names

ODD_NAMES = [os.fsdecode(b"caf\xe9\xff.JPEG"), "tab\there.JPEG", "new\nline.JPEG",
             "back\\slash.JPEG", "cr\rx.JPEG", "\u00fcn\u00efcode \u56fe.JPEG", "bell\x07.JPEG"]


def test_skip_report_round_trips_any_name(tmp_path):
    report = Skipped([(name, f"reason\twith {name}") for name in ODD_NAMES])
    report.write(tmp_path / "r.tsv", os.fsdecode(b"/root\xfe\n"))
    text = (tmp_path / "r.tsv").read_bytes().decode("utf-8")  # valid UTF-8
    assert len(text.splitlines()) == 2 + len(ODD_NAMES)
    assert read_skip_report(tmp_path / "r.tsv") == report.entries
    plain = Skipped([("n01/a.JPEG", "empty file (0 bytes)")])
    plain.write(tmp_path / "p.tsv", "/data")  # ordinary names are written as they are
    assert (tmp_path / "p.tsv").read_text().splitlines()[2] == "n01/a.JPEG\tempty file (0 bytes)"


@pytest.mark.parametrize("module", ["to_dali", "to_ffcv"])
def test_bad_files_with_odd_names_are_reported_exactly(val_copy, tmp_path, module):
    if module == "to_ffcv":
        pytest.importorskip("ffcv")
    cls = _first_class(val_copy)
    for name in ODD_NAMES:
        (cls / name).write_bytes(b"not a JPEG " * 8)
    out = tmp_path / ("x.beton" if module == "to_ffcv" else "s")
    rc, _, err = run(module, "--src", val_copy, "--out", out, "--workers", "2")
    assert rc == 0, err
    report = out.with_name("x.skipped.tsv") if module == "to_ffcv" else out / "skipped.tsv"
    assert sorted(rel for rel, _ in read_skip_report(report)) == sorted(f"{cls.name}/{n}" for n in ODD_NAMES)


def test_resume_reports_odd_names_from_the_journal_exactly(val_copy, tmp_path):
    cls = _first_class(val_copy)
    for name in ODD_NAMES:  # they sort after the class's 4 images: the third shard's record
        (cls / name).write_bytes(b"not a JPEG " * 8)
    out = tmp_path / "s"
    args = ["--src", val_copy, "--out", out, "--shard-size", "2"]
    first = _start("to_dali", *args, env={TEST_DELAY_ENV: "0.1"})
    try:
        _wait_for(first, lambda: (tmp_path / ".s.partial" / "shard-000002.json").exists(),
                  "the third shard")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    rc, _, err = run("to_dali", *args, "--resume")
    assert rc == 0, err
    assert sorted(rel for rel, _ in read_skip_report(out / "skipped.tsv")) == \
           sorted(f"{cls.name}/{n}" for n in ODD_NAMES)


# ----------------------------------------------------------------------------- 4. deep images


def _saved(tmp_path: Path, array: np.ndarray, fmt: str) -> Image.Image:
    path = tmp_path / f"ramp.{fmt.lower()}"
    Image.fromarray(array).save(path, fmt)
    return decode_image(read_file(str(path)))


def _gray(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    return rgb[..., 0].astype(np.int64)


def test_sixteen_bit_and_float_images_are_rescaled_not_clipped(tmp_path):
    ramp16 = np.linspace(0, 65535, 300).round().astype(np.uint16)[None].repeat(3, 0)
    image = _saved(tmp_path, ramp16, "PNG")
    assert image.mode == "I;16"
    assert (_gray(image) == np.rint(ramp16 / 257)).all()  # was 255 from the second pixel on

    ramp_i = (np.arange(256, dtype=np.int32) * 257)[None].repeat(3, 0)
    image = _saved(tmp_path, ramp_i, "TIFF")
    assert image.mode == "I" and (_gray(image) == np.arange(256)).all()  # 0..65535: /257
    signed = (np.arange(256, dtype=np.int32) * 1000 - 100_000)[None].repeat(3, 0)
    assert (_gray(_saved(tmp_path, signed, "TIFF")) == np.arange(256)).all()  # min-max

    unit = np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(3, 0)
    image = _saved(tmp_path, unit, "TIFF")
    assert image.mode == "F" and (_gray(image) == np.rint(unit * 255)).all()  # was all black
    wide = np.linspace(-2, 6, 256, dtype=np.float32)[None].repeat(3, 0)
    assert (_gray(_saved(tmp_path, wide, "TIFF")) == np.rint((wide + 2) / 8 * 255)).all()

    bad = unit.copy()
    bad[0, 5] = np.nan
    with pytest.raises(BadImage, match="NaN or infinite"):
        to_rgb(_saved(tmp_path, bad, "TIFF"))


def test_converters_store_a_sixteen_bit_ramp_as_its_eight_bit_values(val_copy, tmp_path):
    ramp16 = (np.arange(64, dtype=np.uint16) * 1000)[None].repeat(64, 0)
    path = _first_class(val_copy) / "ramp16.png"
    Image.fromarray(ramp16).save(path)
    expected = np.rint(ramp16 / 257)
    assert check_image(str(path))[0] is None
    assert (load_rgb(str(path))[..., 0] == expected).all()  # what to_ffcv stores
    rc, _, err = run("to_dali", "--src", val_copy, "--out", tmp_path / "s")
    assert rc == 0, err
    from fastsiam.data.shards import ShardReader

    reader = ShardReader(tmp_path / "s")
    index = sorted(str(p.relative_to(val_copy)) for p in val_copy.rglob("*") if p.is_file()).index(
        str(path.relative_to(val_copy)))
    stored = np.asarray(Image.open(io.BytesIO(reader.read(index)[0])).convert("L"), np.float64)
    assert np.abs(stored - expected).mean() < 2  # a q90 JPEG of the ramp, not white


# ----------------------------------------------------------------------------- 5. FIFOs


def test_a_fifo_named_jpeg_is_skipped_not_read(val_copy, tmp_path):
    cls = _first_class(val_copy)
    fifo = cls / "zz_fifo.JPEG"
    os.mkfifo(fifo)
    source = list_image_folder(val_copy)
    assert str(fifo) not in [it.path for it in source.items]
    assert dict(source.rejected)[f"{cls.name}/zz_fifo.JPEG"] == "not a regular file (a FIFO)"

    # A file list names files directly: reading must not wait for a FIFO's writer.
    result: list = []
    reader = threading.Thread(target=lambda: result.append(check_image(str(fifo))), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # unblocks the reader
        pytest.fail("check_image blocked opening a FIFO")
    assert result[0][0] == "not a regular file (a FIFO)"

    rc, _, err = run_script("to_dali", "--src", val_copy, "--out", tmp_path / "s", "--workers", "2")
    assert rc == 0, err
    assert read_skip_report(tmp_path / "s" / "skipped.tsv") == [(f"{cls.name}/zz_fifo.JPEG",
                                                                 "not a regular file (a FIFO)")]


# ----------------------------------------------------------------------------- 6. unreadable folders


def test_unreadable_folders_are_reported_and_stop_strict(val_copy, tmp_path, monkeypatch):
    cls = _first_class(val_copy)
    sub = cls / "sub"
    sub.mkdir()
    hidden = sorted(cls.glob("*.JPEG"))[0]
    hidden.rename(sub / hidden.name)
    real_scandir = os.scandir

    def scandir(path="."):  # root ignores chmod 000: refuse this one folder instead
        if os.fspath(path) == str(sub):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    source = list_image_folder(val_copy)
    assert len(source.items) == 15
    assert dict(source.rejected)[f"{cls.name}/sub"] == "folder not readable (Permission denied)"

    rc, _, err = run("to_dali", "--src", val_copy, "--out", tmp_path / "s", "--strict")
    assert rc == 1 and err.count("\n") == 1 and str(sub) in err and "Permission denied" in err
    rc, _, err = run("to_dali", "--src", val_copy, "--out", tmp_path / "s")
    assert rc == 0, err
    assert [rel for rel, _ in read_skip_report(tmp_path / "s" / "skipped.tsv")] == [f"{cls.name}/sub"]


# ----------------------------------------------------------------------------- 7. two runs, one output


def _wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


def test_a_second_ffcv_run_to_the_same_output_is_refused(toy_imagenet, tmp_path):
    pytest.importorskip("ffcv")
    out = tmp_path / "train.beton"
    args = ["--src", toy_imagenet / "train", "--out", out, "--max-resolution", "128"]
    first = _start("to_ffcv", *args, "--workers", "2", env={TEST_DELAY_ENV: "0.05"})
    try:
        _wait_for(first, lambda: any(p.stat().st_size for p in tmp_path.glob(".train.beton.*.partial")),
                  "ffcv's writer filling its partial file")
        rc, _, err = run("to_ffcv", *args, "--overwrite")
        assert rc == 1 and err.count("\n") == 1 and "in use by another process" in err, err
        assert f"PID {first.pid}" in err and str(out) in err
        _, first_err = first.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, first_err
    assert json.loads(out.with_name("train.beton.json").read_text())["sha256"] == sha256(out)


def test_a_second_dali_run_to_the_same_output_is_refused(toy_imagenet, tmp_path):
    out = tmp_path / "shards"
    args = ["--src", toy_imagenet / "train", "--out", out, "--shard-size", "8"]
    first = _start("to_dali", *args, env={TEST_DELAY_ENV: "0.05"})
    try:
        _wait_for(first, lambda: (tmp_path / ".shards.partial" / "shard-000000.json").exists(),
                  "the first shard")
        rc, _, err = run("to_dali", *args, "--overwrite")  # would have deleted its staging folder
        assert rc == 1 and err.count("\n") == 1 and f"PID {first.pid}" in err, err
        _, first_err = first.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0, first_err
    rc, _, err = run("to_dali", *args[:2], "--out", tmp_path / "reference", *args[4:])
    assert rc == 0, err
    assert files(out) == files(tmp_path / "reference")


# ----------------------------------------------------------------------------- 8. checksums


def test_finished_outputs_carry_checksums(val_copy, tmp_path):
    pytest.importorskip("ffcv")
    rc, _, err = run("to_ffcv", "--src", val_copy, "--out", tmp_path / "v.beton")
    assert rc == 0, err
    beton = tmp_path / "v.beton"
    assert json.loads((tmp_path / "v.beton.json").read_text()) == {
        "format": "fastsiam-beton-checksum", "version": 1, "file": "v.beton",
        "bytes": beton.stat().st_size, "sha256": sha256(beton), "num_samples": 16}

    rc, _, err = run("to_dali", "--src", val_copy, "--out", tmp_path / "s", "--shard-size", "5")
    assert rc == 0, err
    shards = json.loads((tmp_path / "s" / "manifest.json").read_text())["shards"]
    for entry in shards:
        tar, index = tmp_path / "s" / entry["tar"], tmp_path / "s" / entry["index"]
        assert (entry["bytes"], entry["sha256"], entry["index_sha256"]) == \
               (tar.stat().st_size, sha256(tar), sha256(index))
