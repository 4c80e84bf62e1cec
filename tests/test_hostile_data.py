"""Hostile data: damaged shards, .betons and image folders (issue 14, "nothing silently wrong").

Every case starts from files the project's converters wrote (data_prep/to_dali.py,
data_prep/to_ffcv.py) and damages them the way disks, copies and hostile runs do: bytes flipped
inside one JPEG's payload, a Huffman table destroyed, a truncated or replaced file, absurd
image metadata. The promises proven here:

- at open, a truncated or replaced shard and an implausible .beton are one-line errors naming
  the file (checks that cost O(files), not O(bytes));
- ``fastsiam verify PATH`` recomputes every checksum (and with ``--decode`` decodes every sample)
  and names each damaged file and sample, exit status 0 only when clean;
- a sample that does not decode is named (file and key/index) and follows
  ``data.on_corrupt``: ``stop`` raises :class:`~fastsiam.data.CorruptDataError`, ``skip``
  replaces it by a black image of its label (batch shapes unchanged), counts it in
  ``loader.corrupt_count`` and warns once per sample;
- nothing hangs: a consumer that stops early ends the loader's threads at once.
"""

from __future__ import annotations

import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_helpers import SIZE, write_beton, write_shards

from fastsiam.data import CorruptDataError, build_loader
from fastsiam.data.shards import read_index

pytestmark = [
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities"),
    # FFCV's numba dispatchers raise a KeyError in their finalizer (see test_loader_ffcv.py).
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.timeout(120),  # nothing hangs: each case takes seconds
]

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
try:
    import ffcv  # noqa: F401

    HAVE_FFCV = True
except ImportError:
    HAVE_FFCV = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="DALI is not installed")
needs_ffcv = pytest.mark.skipif(not HAVE_FFCV, reason="ffcv is not installed")

B = 8
BAD = 3  # the damaged sample: key 00000003, the fourth member of shard-000000.tar


# ----------------------------------------------------------------------------- damage


def _segments(jpeg: bytes) -> list[tuple[int, int, int]]:
    """(marker, position, length) of a JPEG's header segments up to the start of scan."""
    pos, out = 2, []
    while pos + 4 <= len(jpeg):
        marker = jpeg[pos + 1]
        (length,) = struct.unpack_from(">H", jpeg, pos + 2)
        out.append((marker, pos, length))
        if marker == 0xDA:
            break
        pos += 2 + length
    return out


def damage(jpeg: bytes, how: str) -> bytes:
    """The same number of bytes, damaged.

    ``flip400``: 400 bytes of the entropy-coded payload inverted (the hostile run's case:
    libjpeg-turbo reports "corrupt data" and carries on; DALI's decoder shows an image).
    ``huffman``: the first Huffman table inverted (every decoder refuses the file).
    ``soi``: the start-of-image marker zeroed (not a JPEG at all).
    """
    data = bytearray(jpeg)
    if how == "flip400":
        rng = np.random.default_rng(0)
        for p in rng.choice(np.arange(len(data) // 4, len(data) - 2), 400, replace=False):
            data[p] ^= 0xFF
    elif how == "huffman":
        _, pos, length = next(s for s in _segments(jpeg) if s[0] == 0xC4)
        for p in range(pos + 5, pos + 2 + length):
            data[p] ^= 0xFF
    elif how == "soi":
        data[0:2] = b"\0\0"
    else:
        raise ValueError(how)
    return bytes(data)


def damage_shard_sample(root: Path, how: str, sample: int = BAD) -> Path:
    """Damage sample ``sample`` (of shard 0) in place; returns the tar."""
    tar = root / "shard-000000.tar"
    offset, size = read_index(root / "shard-000000.idx")[sample][1]["jpg"]
    with open(tar, "r+b") as f:
        f.seek(offset)
        jpeg = f.read(size)
        f.seek(offset)
        f.write(damage(jpeg, how))
    return tar


def beton_span(path: Path, sample: int) -> tuple[int, int]:
    """(file offset, size) of a .beton sample's image bytes."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    ptr = int(reader.metadata["f0"]["data_ptr"][sample])
    table = reader.alloc_table
    return ptr, int(table["size"][table["ptr"] == ptr][0])


def damage_beton_sample(path: Path, how: str, sample: int = BAD) -> None:
    offset, size = beton_span(path, sample)
    with open(path, "r+b") as f:
        f.seek(offset)
        jpeg = f.read(size)
        f.seek(offset)
        f.write(damage(jpeg, how))


def beton_metadata(path: Path) -> np.memmap:
    """The .beton's per-sample metadata table, writable in place."""
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    reader = Reader(str(path))
    offset = HeaderType.itemsize + reader.field_descriptors.nbytes
    return np.memmap(path, dtype=reader.metadata_type, mode="r+", offset=offset,
                     shape=(int(reader.num_samples),))


@pytest.fixture(scope="module")
def clean_shards(toy_imagenet, tmp_path_factory):
    return write_shards(toy_imagenet / "train", tmp_path_factory.mktemp("clean") / "shards")


@pytest.fixture(scope="module")
def clean_beton(toy_imagenet, tmp_path_factory):
    if not HAVE_FFCV:
        pytest.skip("ffcv is not installed")
    return write_beton(toy_imagenet / "train", tmp_path_factory.mktemp("clean") / "train.beton")


@pytest.fixture
def shards(clean_shards, tmp_path):
    return Path(shutil.copytree(clean_shards, tmp_path / "shards"))


@pytest.fixture
def beton(clean_beton, tmp_path):
    out = tmp_path / "train.beton"
    for suffix in (".beton", ".classes.json", ".beton.json"):  # the converter's files
        shutil.copyfile(clean_beton.with_name(f"train{suffix}"), tmp_path / f"train{suffix}")
    return out


def load(backend, path, **kw):
    args = dict(batch_size=B, image_size=SIZE, workers=1, device="cpu", seed=5)
    return build_loader(backend, path, **{**args, **kw})


def bad_slot(loader, sample: int = BAD) -> tuple[int, int]:
    """(batch, position) of ``sample`` in the loader's current epoch."""
    k = loader.sampler.rank_indices().tolist().index(sample)
    return divmod(k, loader.batch_size)


def check_skipped(loader, caplog, sample: int, name: str, black_max: int = 0) -> None:
    """Two epochs with on_corrupt=skip: full batches, the sample black both times, counted
    twice, one warning naming it."""
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        where = bad_slot(loader, sample)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(b.views.shape == (2 * B, 3, SIZE, SIZE) for b in batches)
        bad_batch = batches[where[0]]
        for view in (bad_batch.view1, bad_batch.view2):
            assert int(view[where[1]].max()) <= black_max
            others = torch.cat([view[:where[1]], view[where[1] + 1:]])
            assert others.float().std() > 10  # the other samples are images
    assert loader.corrupt_count == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and name in warned[0], warned


# ----------------------------------------------------------------------------- 1. cheap checks at open


@pytest.mark.parametrize("backend", ["nvjpeg", pytest.param("dali", marks=needs_dali)])
def test_truncated_or_replaced_shard_is_a_one_line_error_at_open(backend, shards):
    """Before: both loaders opened a truncated tar and a swapped index without a word (the
    truncation surfaced as a short read mid-epoch; the swapped index read wrong bytes)."""
    tar = shards / "shard-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:-20480])
    with pytest.raises(ValueError) as e:
        load(backend, shards)
    assert f"{backend} loader: {tar}: {len(data) - 20480} bytes" in str(e.value)
    assert f"manifest.json says {len(data)}" in str(e.value) and "\n" not in str(e.value)
    tar.write_bytes(data)
    shutil.copyfile(shards / "shard-000000.idx", shards / "shard-000002.idx")
    with pytest.raises(ValueError, match=r"shard-000002\.idx: sha256 .* manifest"):
        load(backend, shards)


@needs_ffcv
@pytest.mark.parametrize("record", [True, False])
def test_truncated_beton_is_a_one_line_error_at_open(beton, record):
    """Before: ffcv's Reader read a short allocation table and the loader built; the epoch
    then read past the data it had (or crashed in FFCV's thread). With the converter's
    checksum record the size is compared with it; without, the tables give it away."""
    size = beton.stat().st_size
    with open(beton, "r+b") as f:
        f.truncate(size - 100)
    if record:
        message = rf"{size - 100} bytes, train\.beton\.json says {size} \(a truncated"
    else:
        beton.with_name("train.beton.json").unlink()
        message = r"truncated: the allocation table"
    with pytest.raises(ValueError, match=rf"ffcv loader: {beton}: {message}"):
        load("ffcv", beton)


# ----------------------------------------------------------------------------- 4. .beton metadata


@needs_ffcv
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (("width", "height"), 65535, r"sample 5 is 65535x65535 pixels.*at most 16384"),
        (("width", "height"), 4000, r"sample 5 is 4000x4000 pixels stored in \d+ JPEG bytes"),
        (("data_ptr",), 1 << 40, r"sample 5: its data .* is not in the file's allocation table"),
        (("mode",), 7, r"sample 5: storage mode 7"),
    ],
)
def test_beton_metadata_is_checked_at_build(beton, field, value, message):
    """Before: 65535x65535 in one sample's metadata made the ffcv backend ask for a scratch
    buffer of batches x batch size x 65535 x 65535 x 3 bytes (~515 GB at batch 8) when the
    epoch started; a wild data pointer read outside the file."""
    meta = beton_metadata(beton)
    for name in field:
        meta["f0"][name][5] = value
    meta.flush()
    del meta
    with pytest.raises(ValueError, match=rf"ffcv loader: {beton}: {message}"):
        load("ffcv", beton)


@needs_ffcv
def test_beton_scratch_memory_is_checked_at_build(beton, monkeypatch):
    import fastsiam.data.beton as beton_module

    monkeypatch.setattr(beton_module, "physical_memory", lambda: 4 << 20)
    with pytest.raises(ValueError, match=r"need 2\.\d MB of decoding scratch memory .* "
                                         r"smaller --max-resolution"):
        load("ffcv", beton)


# ----------------------------------------------------------------------------- 2. fastsiam verify


def verify_cli(capsys, *args) -> tuple[int, list[str]]:
    from fastsiam.cli import main

    rc = main(["verify", *map(str, args)])
    return rc, capsys.readouterr().out.splitlines()


def test_verify_finds_flipped_bytes_in_a_shard(shards, capsys):
    """The hostile run's shard: 400 flipped bytes inside one JPEG, same size. Before: nothing
    read the manifest's checksums (DALI trained on it with exit 0)."""
    rc, lines = verify_cli(capsys, shards)
    assert rc == 0 and lines[-1].startswith(f"verify: {shards}: ok (3 shards")
    tar = damage_shard_sample(shards, "flip400")
    rc, lines = verify_cli(capsys, shards)
    assert rc == 1
    assert lines[0].startswith(f"{tar}: sha256 ") and "manifest.json" in lines[0]
    assert lines[-1].startswith(f"verify: {shards}: 1 problem")
    rc, lines = verify_cli(capsys, shards, "--decode")
    assert rc == 1
    assert any(line.startswith(f"{tar}: sample 00000003 (index 3): JPEG does not decode")
               for line in lines), lines
    assert lines[-1].startswith(f"verify: {shards}: 2 problems")


def test_verify_shards_names_a_missing_file(shards, capsys):
    (shards / "shard-000002.tar").unlink()
    rc, lines = verify_cli(capsys, shards)
    assert rc == 1 and lines[0] == f"{shards / 'shard-000002.tar'}: missing (listed in manifest.json)"


@needs_ffcv
def test_verify_checks_a_beton_against_its_checksum_record(beton, capsys):
    """Against data_prep/to_ffcv.py's <stem>.beton.json. Before: no check at all (200 flipped
    bytes in the hostile run: 53 of 80 samples silently different)."""
    rc, lines = verify_cli(capsys, beton)
    assert rc == 0 and lines[-1].startswith(f"verify: {beton}: ok (48 samples, ")
    assert "MB hashed against train.beton.json" in lines[-1]
    record = beton.with_name("train.beton.json")
    kept = record.read_bytes()
    record.unlink()
    rc, lines = verify_cli(capsys, beton)
    assert rc == 1 and lines[0].startswith(f"{beton}: no checksum record train.beton.json")
    record.write_bytes(kept)
    damage_beton_sample(beton, "flip400")
    rc, lines = verify_cli(capsys, beton, "--decode")
    assert rc == 1
    assert lines[0].startswith(f"{beton}: sha256 ")
    assert lines[1].startswith(f"{beton}: sample 3: JPEG does not decode"), lines
    assert lines[-1].startswith(f"verify: {beton}: 2 problems")


def test_verify_refuses_what_it_cannot_read(tmp_path, capsys):
    from fastsiam.cli import main

    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. decode errors


@pytest.mark.parametrize("resize", ["per_image", "batched"])
def test_nvjpeg_names_the_sample_and_follows_on_corrupt(resize, shards, caplog):
    """Before: RuntimeError "decode_jpeg ... Image is incomplete or truncated" from the
    decoder thread, naming neither shard nor sample."""
    tar = damage_shard_sample(shards, "flip400")
    with pytest.raises(CorruptDataError) as e:
        list(load("nvjpeg", shards, resize=resize))
    message = str(e.value)
    assert message.startswith(f"nvjpeg loader: {tar} sample 00000003 (index 3): JPEG does not decode")
    assert "data.on_corrupt=skip" in message and "\n" not in message
    caplog.set_level(logging.WARNING, logger="fastsiam")
    check_skipped(load("nvjpeg", shards, resize=resize, on_corrupt="skip"), caplog, BAD,
                  "sample 00000003")


def test_nvjpeg_device_decode_failure_is_located_on_the_cpu(shards, monkeypatch):
    """The GPU path decodes a batch in one call, which fails as a whole: the loader finds
    the bad sample by decoding the batch's samples one by one on the CPU (only then)."""
    import fastsiam.data.nvjpeg_loader as nvjpeg

    damage_shard_sample(shards, "huffman")
    loader = load("nvjpeg", shards, resize="batched", on_corrupt="skip")
    cpu_decode = nvjpeg.decode_jpeg
    calls = []

    def batched_decode(blobs, mode, device=None):  # the CUDA decoder's contract, on the CPU
        if device is None:
            return cpu_decode(blobs, mode=mode)
        calls.append(len(blobs))
        return [cpu_decode(b, mode=mode) for b in blobs]

    monkeypatch.setattr(nvjpeg, "decode_jpeg", batched_decode)
    indices = list(range(B))
    images = loader._decode_batch(indices, loader._read(indices, nvjpeg.ThreadPoolExecutor(1)),
                                  torch.device("cpu"))
    assert calls == [B, B - 1]  # the batch, then the batch without the bad sample
    assert int(images[BAD].max()) == 0 and loader.corrupt_count == 1
    assert all(im.float().std() > 10 for k, im in enumerate(images) if k != BAD)


@needs_dali
@pytest.mark.parametrize("how", ["huffman", "soi"])
def test_dali_names_the_sample_and_follows_on_corrupt(how, shards, caplog):
    """Before: "Critical error in pipeline ... Failed to decode sample #k" (huffman) or a
    JPEGHeaderError raised through DALI's pipeline (soi), naming no shard."""
    tar = damage_shard_sample(shards, how)
    with pytest.raises(CorruptDataError) as e:
        list(load("dali", shards))
    assert str(e.value).startswith(f"dali loader: {tar} sample 00000003 (index 3): ")
    assert "\n" not in str(e.value)
    caplog.set_level(logging.WARNING, logger="fastsiam")
    check_skipped(load("dali", shards, on_corrupt="skip"), caplog, BAD, "sample 00000003",
                  black_max=1)


@needs_dali
def test_dali_webdataset_reader_stops_with_a_pointer_to_verify(shards):
    damage_shard_sample(shards, "huffman")
    with pytest.raises(CorruptDataError, match=r"dali loader: .*fastsiam verify --decode"):
        list(load("dali", shards, reader="webdataset", initial_fill=16))
    with pytest.raises(ValueError, match="on_corrupt='skip' needs reader='index'"):
        load("dali", shards, reader="webdataset", on_corrupt="skip")


@needs_ffcv
@pytest.mark.parametrize("split", ["train", "val"])
def test_ffcv_names_the_sample_and_follows_on_corrupt(split, beton, caplog):
    """Before: FFCV ignores libjpeg-turbo's error code; the damaged sample went into the
    batch as whatever the decoder left in its buffer, silently."""
    damage_beton_sample(beton, "flip400")
    kw = {"split": split, "drop_last": split == "train"}
    with pytest.raises(CorruptDataError) as e:
        list(load("ffcv", beton, **kw))
    assert str(e.value).startswith(f"ffcv loader: {beton} sample 3: JPEG does not decode")
    caplog.set_level(logging.WARNING, logger="fastsiam")
    loader = load("ffcv", beton, on_corrupt="skip", **kw)
    if split == "train":
        check_skipped(loader, caplog, BAD, "sample 3")
    else:
        views = torch.cat([b.view for b in loader])
        assert views.shape[0] == 48 and int(views[BAD].max()) == 0
        assert loader.corrupt_count == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_pil_names_the_file_and_follows_on_corrupt(workers, toy_imagenet, tmp_path, caplog):
    """Before: PIL's OSError "image file is truncated" (with workers, wrapped in the
    DataLoader's multi-line "Caught OSError in DataLoader worker process 0")."""
    from torchvision.datasets import ImageFolder

    from fastsiam.config import DataConfig
    from fastsiam.data import build_loader_from_config

    root = Path(shutil.copytree(toy_imagenet / "train", tmp_path / "train"))
    samples = ImageFolder(str(root)).samples
    path = Path(samples[BAD][0])
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(CorruptDataError) as e:
        list(load("pil", root, workers=workers, augment="crop"))
    assert str(e.value).startswith(f"pil loader: {path}: does not decode")
    assert "\n" not in str(e.value)
    caplog.set_level(logging.WARNING, logger="fastsiam")
    cfg = DataConfig(backend="pil", train_path=str(root), batch_size=B, image_size=SIZE,
                     workers=workers, on_corrupt="skip", options={"augment": "crop"})
    loader = build_loader_from_config(cfg, seed=5)
    assert loader.on_corrupt == "skip"
    check_skipped(loader, caplog, BAD, path.name)


def test_pil_loader_rescales_a_sixteen_bit_image(tmp_path):
    """Before: ImageFolder's convert("RGB") clipped a 16-bit grey of 25700 (39 %) to 255."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(np.full((48, 48), 25700, np.uint16)).save(tmp_path / c / "x.png")
    batch = next(iter(load("pil", tmp_path, split="val", drop_last=False, augment="crop")))
    assert batch.view.dtype == torch.uint8 and set(batch.view.unique().tolist()) == {100}


def test_nvjpeg_threads_end_when_the_consumer_stops_during_a_read(clean_shards, monkeypatch):
    """Before: when the consumer stopped while the reader thread was inside a read, the
    reader returned without a last item and the decoder waited on its queue forever (the
    consumer's 10 s join gave up and left it running: 1 early stop in 15 to 30 in a loop
    here, and every one with a slow read)."""
    import threading
    import time

    import fastsiam.data.nvjpeg_loader as nvjpeg

    read = nvjpeg.NVJPEGLoader._read
    calls = []

    def slow_read(self, indices, pool):
        calls.append(len(indices))
        if len(calls) > 1:
            time.sleep(0.5)  # the consumer stops while this read is in flight
        return read(self, indices, pool)

    monkeypatch.setattr(nvjpeg.NVJPEGLoader, "_read", slow_read)
    it = iter(load("nvjpeg", clean_shards))
    next(it)
    begin = time.perf_counter()
    it.close()
    assert time.perf_counter() - begin < 3
    assert [t.name for t in threading.enumerate() if t.name.startswith("fastsiam-nvjpeg")] == []
