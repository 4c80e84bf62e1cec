"""The .beton checks ffcv's reader does not make, shared by the ffcv backend and ``fastsiam verify``.

FFCV trusts a .beton's tables: each sample's image metadata (storage mode, width, height, data
pointer) sizes the decoder's buffers and addresses the bytes it reads, and the allocation
table at the end of the file maps data pointers to sizes. One damaged number there is an
absurd allocation (65535x65535 in one sample's metadata makes FFCV's decoders ask for
``(batches_ahead + 2) x batch_size x 65535 x 65535 x 3`` bytes when the epoch starts) or a read
outside the file. :func:`beton_problems` checks those tables against each other and against
the file's size; it costs O(samples) over tables ffcv's Reader already holds in memory, never
a read of the image bytes. When the converter's checksum record ``<stem>.beton.json`` is
there, the file's size and sample count are checked against it too (a truncated or replaced
file). Flipped bytes inside an image are the checksum's job (``fastsiam verify``) and the
decoder's (the ffcv backend checks libjpeg-turbo's status).

API::

    open_beton(path, image_field, label_field) -> ffcv Reader   one-line ValueError otherwise
    read_beton(path, image_field, label_field, who)             the same without the table checks
    checksum_record(path) -> {"bytes", "sha256", "num_samples", ...} | None
    make_checksum_record(path, name, num_samples) -> bytes   (what to_ffcv.py writes)
    beton_problems(reader, path, image_field) -> [message]       empty when consistent
    check_scratch(reader, path, image_field, batch_size, batches_ahead)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fastsiam.files import file_sha256

# The largest image side accepted (pixels). FFCV's metadata holds 16 bits; data_prep/to_ffcv.py
# stores at most --max-resolution (500 by default), and a decoder's scratch buffer grows with
# the square of the largest side, per batch slot.
MAX_IMAGE_SIDE = 16384
# The densest a JPEG of ffcv's can be, in pixels per byte: ffcv stores RGB images as 3-component
# baseline JPEGs (OpenCV), whose every 8x8 block costs at least 2 bits (a DC and an end-of-block
# code), 6 blocks per 16x16 pixels in 4:2:0, so at most ~170 pixels per byte; OpenCV's standard
# tables (4 bytes per 16x16 pixels at the least) stay under 64.
MAX_JPEG_PIXELS_PER_BYTE = 256
RAW = 1  # ffcv's IMAGE_MODES: jpg 0, raw 1
MODES = {0: "jpg", RAW: "raw"}
EXPECTED = "an FFCV .beton file (data_prep/to_ffcv.py)"
CHECKSUM_FORMAT = "fastsiam-beton-checksum"  # written by data_prep/to_ffcv.py
CHECKSUM_VERSION = 1


def side_file(path: Path, suffix: str) -> Path:
    """``train.beton`` -> ``train.<suffix>``: the files data_prep/to_ffcv.py writes beside a
    .beton (``classes.json``, ``skipped.tsv``, ``beton.json``); betons of one folder keep their own."""
    return path.with_name(f"{path.stem}.{suffix}")


def checksum_path(path: Path) -> Path:
    """``train.beton`` -> ``train.beton.json``, the converter's checksum record."""
    return side_file(path, "beton.json")


def classes_path(path: Path) -> Path:
    """``train.beton`` -> ``train.classes.json``, the class names in label order."""
    return side_file(path, "classes.json")


def make_checksum_record(path: Path, name: str, num_samples: int) -> bytes:
    """The record :func:`checksum_record` reads, of the finished file ``path`` that will be
    called ``name``: ``{"format", "version", "file", "bytes", "sha256", "num_samples"}``,
    deterministic (no timestamps). Hashing reads the file once more (~1 GB/s)."""
    return (json.dumps({"format": CHECKSUM_FORMAT, "version": CHECKSUM_VERSION, "file": name,
                        "bytes": path.stat().st_size, "sha256": file_sha256(path),
                        "num_samples": num_samples}, indent=1) + "\n").encode()


def checksum_record(path: Path) -> dict[str, Any] | None:
    """The converter's record of ``path`` (``{"format": "fastsiam-beton-checksum", "version":
    1, "file", "bytes", "sha256", "num_samples"}``), None when there is none (a .beton written
    by stock ffcv or an older converter), a one-line ``ValueError`` when it is unreadable."""
    record_path = checksum_path(path)
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{record_path}: not a readable checksum record ({e})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKSUM_FORMAT:
        raise ValueError(f"{record_path}: not a {CHECKSUM_FORMAT} record")
    if record.get("version") != CHECKSUM_VERSION:
        raise ValueError(f"{record_path}: record version {record.get('version')!r}, this code "
                         f"reads version {CHECKSUM_VERSION}")
    kinds = {"bytes": int, "sha256": str, "num_samples": int}
    for key, kind in kinds.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(f"{record_path}: key {key!r} must be {kind.__name__}, got {record.get(key)!r}")
    return record


def open_beton(path: Path, image_field: str, label_field: str) -> Any:
    """:func:`read_beton` for the ffcv loader, refusing (one line, the first problem) a file
    whose size or sample count differs from its checksum record, or whose tables
    :func:`beton_problems` finds inconsistent."""
    who = "ffcv loader"
    try:
        record = None if path.is_dir() else checksum_record(path)
    except ValueError as e:
        raise ValueError(f"{who}: {e}") from None
    if record is not None and (size := path.stat().st_size) != record["bytes"]:
        raise ValueError(f"{who}: {path}: {size} bytes, {checksum_path(path).name} says "
                         f"{record['bytes']} (a truncated or replaced .beton; restore it or "
                         "re-run data_prep/to_ffcv.py)")
    reader = read_beton(path, image_field, label_field, who)
    if record is not None and int(reader.num_samples) != record["num_samples"]:
        raise ValueError(f"{who}: {path}: {int(reader.num_samples)} samples, "
                         f"{checksum_path(path).name} says {record['num_samples']}")
    problems = beton_problems(reader, path, image_field)
    if problems:
        more = f" (and {len(problems) - 1} more; `fastsiam verify {path}` lists them)"
        raise ValueError(f"{who}: {path}: {problems[0]}{more if len(problems) > 1 else ''}")
    return reader


def read_beton(path: Path, image_field: str, label_field: str, who: str) -> Any:
    """FFCV's reader for ``path``, or a one-line ``ValueError`` (``who: path ...``) saying
    what was expected instead."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.types import CURRENT_VERSION, HeaderType

    if path.is_dir():
        raise ValueError(
            f"{who}: {path} is a directory; expected {EXPECTED} "
            "(a shards folder is read by the dali or nvjpeg backend)"
        )
    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) == 0 or header[0]["version"] != CURRENT_VERSION:
        raise ValueError(f"{who}: {path} is not {EXPECTED} (no FFCV v{CURRENT_VERSION} header)")
    try:
        reader = Reader(str(path))
    except Exception as e:  # FFCV raises assorted errors on a damaged file
        raise ValueError(
            f"{who}: {path} is not a readable FFCV .beton: {type(e).__name__}: {e}"
        ) from None
    fields = {name: type(h).__name__ for name, h in reader.handlers.items()}
    if not isinstance(reader.handlers.get(image_field), RGBImageField) or not isinstance(
        reader.handlers.get(label_field), IntField
    ):
        raise ValueError(
            f"{who}: {path} has fields {fields}; expected an RGBImageField "
            f"{image_field!r} and an IntField {label_field!r}"
        )
    return reader


def image_metadata(reader: Any, image_field: str) -> np.ndarray:
    """The image field's column of the metadata table (mode, width, height, data_ptr)."""
    return reader.metadata[reader.metadata.dtype.names[reader.field_names.index(image_field)]]


def stored_images(reader: Any, path: Path, image_field: str) -> Iterator[tuple[np.ndarray, int, int, bool]]:
    """Every sample's stored image as ``(bytes, height, width, is_jpeg)``, in sample order:
    views of the file (memory-mapped) found through its allocation table, as FFCV's loader
    reads them (the raw samples' bytes are ``height x width x 3`` pixels)."""
    meta = image_metadata(reader, image_field)
    table = reader.alloc_table
    size_of = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for ptr, h, w, mode in zip(meta["data_ptr"].tolist(), meta["height"].tolist(),
                               meta["width"].tolist(), meta["mode"].tolist()):
        yield data[ptr:ptr + size_of[ptr]], h, w, mode != RAW


def beton_problems(reader: Any, path: Path, image_field: str) -> list[str]:
    """What is inconsistent in the .beton's tables (one message per problem kind, naming the
    first sample it concerns); empty when the tables agree with each other and the file."""
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    size = path.stat().st_size
    n = int(reader.num_samples)
    page = int(reader.page_size)
    data_start = HeaderType.itemsize + reader.field_descriptors.nbytes + n * reader.metadata_type.itemsize
    table_at = int(reader.header["alloc_table_ptr"])
    problems = []
    if page <= 0 or page & (page - 1):
        problems.append(f"page size {page} in the header is not a power of two")
    if len(reader.metadata) != n or not data_start <= table_at <= size:
        return [*problems, f"truncated or damaged: the header promises {n} samples and an "
                           f"allocation table at byte {table_at}, the file has {size} bytes"]
    if (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        problems.append(
            f"truncated: the allocation table (byte {table_at} to the end) is not a whole number "
            f"of {ALLOC_TABLE_TYPE.itemsize}-byte entries"
        )
    table = reader.alloc_table
    ends = table["ptr"] + table["size"]
    outside = np.flatnonzero((table["ptr"] < data_start) | (ends > table_at) | (table["sample_id"] >= n))
    if len(outside):
        k = int(outside[0])
        problems.append(
            f"allocation {k} (sample {int(table['sample_id'][k])}, bytes {int(table['ptr'][k])} to "
            f"{int(ends[k])}) lies outside the data region {data_start} to {table_at}"
        )
    problems += _image_problems(image_metadata(reader, image_field), table)
    return problems


def _image_problems(meta: np.ndarray, table: np.ndarray) -> list[str]:
    problems = []
    mode = meta["mode"]
    width = meta["width"].astype(np.int64)
    height = meta["height"].astype(np.int64)

    def first(mask: np.ndarray, message: Callable[[int], str]) -> None:
        bad = np.flatnonzero(mask)
        if len(bad):
            problems.append(message(int(bad[0])) + (f" ({len(bad)} samples)" if len(bad) > 1 else ""))

    first(~np.isin(mode, list(MODES)),
          lambda i: f"sample {i}: storage mode {int(mode[i])}, expected 0 (jpg) or 1 (raw)")
    first((width < 1) | (height < 1) | (width > MAX_IMAGE_SIDE) | (height > MAX_IMAGE_SIDE),
          lambda i: f"sample {i} is {width[i]}x{height[i]} pixels; expected sides of 1 to at most "
                    f"{MAX_IMAGE_SIDE} (re-convert with a smaller --max-resolution if that is real)")
    order = np.argsort(table["ptr"])
    ptrs, sizes = table["ptr"][order], table["size"][order]
    at = np.minimum(np.searchsorted(ptrs, meta["data_ptr"]), max(len(ptrs) - 1, 0))
    found = (ptrs[at] == meta["data_ptr"]) if len(ptrs) else np.zeros(len(meta), bool)
    first(~found, lambda i: f"sample {i}: its data pointer {int(meta['data_ptr'][i])} is not in "
                            "the file's allocation table")
    stored = np.where(found, sizes[at] if len(ptrs) else 0, 0).astype(np.int64)
    pixels = width * height
    first(found & (mode == RAW) & (stored != 3 * pixels),
          lambda i: f"sample {i}: raw {width[i]}x{height[i]} pixels need {3 * pixels[i]} bytes, "
                    f"{stored[i]} are stored")
    first(found & (mode == 0) & (pixels > MAX_JPEG_PIXELS_PER_BYTE * stored),
          lambda i: f"sample {i} is {width[i]}x{height[i]} pixels stored in {stored[i]} JPEG bytes, "
                    f"more than {MAX_JPEG_PIXELS_PER_BYTE} pixels per byte (damaged metadata)")
    return problems


def physical_memory() -> int:
    """This machine's RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_scratch(reader: Any, path: Path, image_field: str, batch_size: int, batches_ahead: int) -> None:
    """FFCV's decoders hold, per batch slot, a scratch image as large as the largest height
    times the largest width in the file, for ``batches_ahead + 2`` batches: refuse (one line)
    what would take more than half of this machine's memory, before FFCV tries."""
    meta = image_metadata(reader, image_field)
    h, w = int(meta["height"].max()), int(meta["width"].max())
    need = (batches_ahead + 2) * batch_size * h * w * 3
    have = physical_memory()
    if need > have // 2:
        tallest, widest = int(meta["height"].argmax()), int(meta["width"].argmax())
        raise ValueError(
            f"ffcv loader: {path}: batches of {batch_size} need {_size(need)} of decoding "
            f"scratch memory ({batches_ahead + 2} batches x {batch_size} x {h} x {w} x 3: the "
            f"tallest image is sample {tallest}, the widest sample {widest}), more than half of "
            f"this machine's {_size(have)}; re-convert with a smaller --max-resolution, or "
            "lower the batch size or batches_ahead"
        )


__all__ = ["MAX_IMAGE_SIDE", "MAX_JPEG_PIXELS_PER_BYTE", "beton_problems", "check_scratch",
           "checksum_path", "checksum_record", "image_metadata", "make_checksum_record",
           "open_beton", "physical_memory", "read_beton", "stored_images"]
