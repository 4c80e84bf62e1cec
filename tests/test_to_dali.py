"""data_prep/to_dali.py: round trips through DALI, webdataset, tarfile and the torch-only reader."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.errors import ConversionError
from data_prep.images import VERIFY_MIN_PSNR, psnr
from data_prep.parallel import TEST_DELAY_ENV
from data_prep.to_dali import main
from fastsiam.data.shards import ShardReader, read_manifest
from tests.convert_data import EMPTY_CLASS, imagefolder_reference, plant_bad_files, quirk_paths

REPO = Path(__file__).resolve().parents[1]
SHARD = ["--shard-size", "8"]


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*map(str, args), "--quiet"])
    return rc, out.getvalue(), err.getvalue()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def bad_tree(toy_imagenet, tmp_path_factory):
    root = tmp_path_factory.mktemp("dali_src") / "train"
    return root, plant_bad_files(toy_imagenet, root)


@pytest.fixture(scope="module")
def converted(bad_tree, tmp_path_factory):
    """One conversion (2 workers) shared by the read-back tests."""
    root, _ = bad_tree
    out = tmp_path_factory.mktemp("dali_out") / "shards"
    rc, stdout, stderr = run("--src", root, "--out", out, *SHARD, "--workers", "2")
    assert rc == 0, stderr
    return out, stdout


def _expected(bad_tree: tuple[Path, dict[str, str]]) -> list[tuple[str, int]]:
    return imagefolder_reference(*bad_tree)[0]


def test_labels_counts_and_report_match_imagefolder(bad_tree, converted, toy_imagenet):
    root, bad = bad_tree
    out, stdout = converted
    expected, class_to_idx = imagefolder_reference(root, bad)
    manifest = read_manifest(out)
    assert manifest.num_samples == len(expected) == 48
    assert manifest.labels.tolist() == [y for _, y in expected]
    assert class_to_idx[EMPTY_CLASS] == 0 and min(y for _, y in expected) == 1
    assert json.loads((out / "classes.json").read_text())["class_to_idx"] == class_to_idx
    assert len(manifest.shards) == 6
    report = dict(line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines()
                  if not line.startswith("#"))
    assert set(report) == set(bad.values())
    assert "truncated" in report[bad["truncated"]]
    assert report[bad["empty"]].startswith("empty file")
    assert report[bad["text"]].startswith("not an image (extension .txt")
    assert report[bad["garbage"]].startswith("not an image")
    assert "skipped 4 files" in stdout
    assert manifest.stats["stored"] == {"cmyk": 1, "grayscale": 2, "original": 44, "png": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "shard-000000.tar").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
def test_torch_only_reader_and_tarfile_read_every_sample(bad_tree, converted, toy_imagenet):
    root, _ = bad_tree
    out, _ = converted
    expected = _expected(bad_tree)
    quirky = {os.path.normpath(root / rel) for rels in quirk_paths(toy_imagenet).values() for rel in rels}

    # fastsiam's torch-only path: index offsets + torchvision's JPEG decoder.
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    reader = ShardReader(out)
    stored = []
    for i, (path, label) in enumerate(expected):
        data, y = reader.read(i)
        assert y == label
        stored.append(data)
        source = Path(path).read_bytes()
        if os.path.normpath(path) in quirky:  # CMYK, grayscale, PNG: re-encoded once as RGB JPEG
            assert data != source
            with Image.open(io.BytesIO(data)) as im:
                assert (im.format, im.mode) == ("JPEG", "RGB")
        else:
            assert data == source  # RGB JPEGs keep their original bytes
        ref = np.asarray(Image.open(path).convert("RGB"))
        got = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert psnr(got.permute(1, 2, 0).numpy(), ref) >= VERIFY_MIN_PSNR

    members = []
    for tar_path in read_manifest(out).tar_paths(out):
        with tarfile.open(tar_path) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [n for n, _ in members] == [f"{i:08d}.{e}" for i in range(len(expected)) for e in ("jpg", "cls")]
    assert [d for n, d in members if n.endswith(".jpg")] == stored
    assert [int(d) for n, d in members if n.endswith(".cls")] == [y for _, y in expected]


def test_webdataset_reads_every_sample(bad_tree, converted):
    wds = pytest.importorskip("webdataset")
    out, _ = converted
    reader = ShardReader(out)
    samples = list(wds.WebDataset(read_manifest(out).tar_paths(out), shardshuffle=False))
    assert [(s["__key__"], s["jpg"], int(s["cls"])) for s in samples] == \
           [(reader.key(i), *reader.read(i)) for i in range(len(reader))]
    assert len(samples) == len(_expected(bad_tree))


def test_dali_reads_and_decodes_every_sample(bad_tree, converted):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    from data_prep.to_dali import verify

    out, _ = converted
    expected = _expected(bad_tree)
    manifest = read_manifest(out)

    @pipeline_def(batch_size=len(expected), num_threads=2, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=manifest.tar_paths(out), index_paths=manifest.index_paths(out),
                                         ext=["jpg", "cls"], missing_component_behavior="error", name="r")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB, adjust_orientation=False), cls

    p = pipe()
    p.build()
    assert p.epoch_size("r") == len(expected)
    images, labels = p.run()
    for i, (path, label) in enumerate(expected):
        assert int(bytes(np.asarray(labels.at(i)))) == label
        ref = np.asarray(Image.open(path).convert("RGB"))
        assert psnr(np.asarray(images.at(i)), ref) >= VERIFY_MIN_PSNR

    from data_prep.listing import Item

    items = [Item(p, os.path.relpath(p, bad_tree[0]), y) for p, y in expected]
    result = verify(out, items, samples=64)
    assert result["samples"] == result["images_checked"] == 48 and result["min_psnr_db"] >= VERIFY_MIN_PSNR
    with pytest.raises(ConversionError, match="manifest labels of"):
        verify(out, [Item(it.path, it.rel, (it.label + 1) % 5) for it in items])


@pytest.mark.cuda
def test_nvjpeg_decodes_every_stored_jpeg(bad_tree, converted):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    out, _ = converted
    reader = ShardReader(out)
    for i, (path, _) in enumerate(_expected(bad_tree)):
        data = torch.frombuffer(bytearray(reader.read(i)[0]), dtype=torch.uint8)
        got = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda").permute(1, 2, 0).cpu().numpy()
        assert psnr(got, np.asarray(Image.open(path).convert("RGB"))) >= VERIFY_MIN_PSNR


def test_output_is_identical_with_one_worker(bad_tree, converted, tmp_path):
    root, _ = bad_tree
    out, _ = converted
    rc, _, err = run("--src", root, "--out", tmp_path / "one", *SHARD, "--workers", "1")
    assert rc == 0, err
    assert files(tmp_path / "one") == files(out)


def _kill_after_shards(root: Path, out: Path, shards: int) -> Path:
    """Start a slowed-down conversion, SIGKILL it once ``shards`` shards are journaled."""
    staging = out.parent / f".{out.name}.partial"
    cmd = [sys.executable, "data_prep/to_dali.py", "--src", str(root), "--out", str(out), *SHARD,
           "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, TEST_DELAY_ENV: "0.1"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not (staging / f"shard-{shards - 1:06d}.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first shards never appeared"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert not out.exists()
    assert shards <= len(list(staging.glob("shard-*.json"))) < 6
    return staging


def test_killed_run_leaves_no_output_and_resume_finishes_it(bad_tree, converted, tmp_path):
    root, _ = bad_tree
    out = tmp_path / "shards"
    # Three shards: the second one's record carries a skipped (truncated) file.
    staging = _kill_after_shards(root, out, 3)
    rc, _, err = run("--src", root, "--out", out, *SHARD)
    assert rc == 1 and "pass --resume to continue it" in err
    rc, _, err = run("--src", root, "--out", out, "--shard-size", "5", "--resume")
    assert rc == 1 and "options differ from the interrupted run" in err
    rc, _, err = run("--src", root, "--out", out, *SHARD, "--workers", "2", "--resume")
    assert rc == 0, err
    assert re.search(r"resume: [345] shards \((24|32|40) samples\) verified", err), err
    assert not staging.exists()
    assert files(out) == files(converted[0])


def test_resume_redoes_a_damaged_shard(bad_tree, converted, tmp_path):
    root, _ = bad_tree
    out = tmp_path / "shards"
    staging = _kill_after_shards(root, out, 2)
    tar = staging / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    rc, _, err = run("--src", root, "--out", out, *SHARD, "--resume")
    assert rc == 0, err
    assert "shard-000001.tar fails its checksum" in err
    assert "resume: 1 shards (8 samples) verified" in err
    assert files(out) == files(converted[0])


def test_strict_stops_at_the_first_bad_file(bad_tree, tmp_path):
    root, bad = bad_tree
    rc, _, err = run("--src", root, "--out", tmp_path / "x", "--strict")
    assert rc == 1 and str(root / bad["text"]) in err  # non-images are met while listing
    (root / bad["text"]).rename(tmp_path / "notes.txt")
    try:
        rc, _, err = run("--src", root, "--out", tmp_path / "x", "--strict", "--workers", "2")
    finally:
        (tmp_path / "notes.txt").rename(root / bad["text"])
    assert rc == 1 and str(root / bad["truncated"]) in err and "--strict" in err
    assert err.count("\n") == 1 and [p.name for p in tmp_path.glob("*x*")] == [".x.lock"]


def test_max_resolution_reencodes_only_large_images(toy_imagenet, tmp_path):
    src = toy_imagenet / "val"
    try:  # --verify reads back with DALI, which not every machine has
        import nvidia.dali  # noqa: F401

        verify = ["--verify"]
    except ImportError:
        verify = []
    rc, _, err = run("--src", src, "--out", tmp_path / "s", "--max-resolution", "100", *verify)
    assert rc == 0, err
    reader = ShardReader(tmp_path / "s")
    paths = sorted(p for p in src.rglob("*.JPEG"))
    resized = 0
    for i, path in enumerate(paths):
        data, _ = reader.read(i)
        with Image.open(path) as source, Image.open(io.BytesIO(data)) as stored:
            if max(source.size) > 100:
                resized += 1
                assert max(stored.size) == 100
                ratio = source.size[0] / source.size[1]
                assert abs(stored.size[0] / stored.size[1] - ratio) < 0.03
            elif source.mode == "RGB":
                assert data == path.read_bytes()
    assert 0 < resized < len(paths)
    assert read_manifest(tmp_path / "s").stats["stored"]["resized"] == resized


def test_shard_bytes_limits_tar_sizes(toy_imagenet, tmp_path):
    rc, _, err = run("--src", toy_imagenet / "train", "--out", tmp_path / "s", "--shard-bytes", "40KB")
    assert rc == 0, err
    manifest = read_manifest(tmp_path / "s")
    assert len(manifest.shards) > 3 and manifest.num_samples == 48
    for entry in manifest.shards:
        assert (tmp_path / "s" / entry.tar).stat().st_size == entry.bytes
        assert entry.bytes <= 40_000 + 10240 or entry.samples == 1  # + tar's end-of-archive record


def test_flat_validation_folder_with_train_classes(toy_imagenet, converted, tmp_path):
    # ImageNet's flat val layout: all files in one folder, labels in sorted file-name order.
    flat = tmp_path / "val"
    flat.mkdir()
    truth = {}
    for path in sorted((toy_imagenet / "val").rglob("*.JPEG")):
        (flat / path.name).write_bytes(path.read_bytes())
        truth[path.name] = path.parent.name
    (tmp_path / "labels.txt").write_text("".join(f"{truth[n]}\n" for n in sorted(truth)))
    classes = converted[0] / "classes.json"
    rc, _, err = run("--src", flat, "--labels", tmp_path / "labels.txt", "--classes", classes,
                     "--out", tmp_path / "s")
    assert rc == 0, err
    index = json.loads(classes.read_text())["class_to_idx"]
    assert read_manifest(tmp_path / "s").labels.tolist() == [index[truth[n]] for n in sorted(truth)]
    assert read_manifest(tmp_path / "s").classes == list(index)


@pytest.mark.parametrize(("args", "message"), [
    (["--src", "/nonexistent/x"], "--src /nonexistent/x is not a folder"),
    (["--src", "{empty}"], "has no class folders"),
    (["--src", "{no_images}"], "no images found in"),
    (["--src", "{src}", "--shard-size", "0"], "--shard-size must be >= 1, got 0"),
    (["--src", "{src}", "--jpeg-quality", "101"], "--jpeg-quality must be in 1..100, got 101"),
    (["--src", "{src}", "--out", "{existing}"], "already exists; pass --overwrite"),
    (["--src", "{src}", "--classes", "{missing}"], "--classes"),
    (["--src", "{src}", "--limit", "0"], "--limit must be >= 1, got 0"),
])
def test_bad_arguments_are_one_line_errors(args, message, toy_imagenet, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "a").mkdir(parents=True)
    (tmp_path / "no_images" / "a" / "readme.txt").write_text("x")
    (tmp_path / "existing").mkdir()
    fill = {"empty": tmp_path / "empty", "no_images": tmp_path / "no_images", "src": toy_imagenet / "val",
            "existing": tmp_path / "existing", "missing": tmp_path / "missing.json"}
    args = [a.format(**fill) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    rc, _, err = run(*args)
    assert rc == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_limit_keeps_the_first_images_of_each_class(toy_imagenet, tmp_path):
    rc, _, err = run("--src", toy_imagenet / "train", "--out", tmp_path / "s", "--limit", "3")
    assert rc == 0, err
    expected, _ = imagefolder_reference(toy_imagenet / "train", {})
    kept: dict[int, int] = {}
    firsts = []
    for path, label in expected:
        if kept.setdefault(label, 0) < 3:
            kept[label] += 1
            firsts.append((path, label))
    reader = ShardReader(tmp_path / "s")
    assert reader.labels.tolist() == [y for _, y in firsts] and len(firsts) == 12
    for i, (path, _) in enumerate(firsts):
        with Image.open(path) as im:
            if (im.format, im.mode) == ("JPEG", "RGB"):
                assert reader.read(i)[0] == Path(path).read_bytes()


def test_help_states_each_default_once() -> None:
    # --shard-size's default depends on --shard-bytes, so argparse must not add "(default: None)"
    out = subprocess.run([sys.executable, "data_prep/to_dali.py", "--help"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    flat = " ".join(out.split())
    assert "samples per shard (default 2000) --shard-bytes" in flat
    assert "(default: None)" not in flat
