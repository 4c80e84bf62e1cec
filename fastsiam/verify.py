"""``fastsiam verify PATH``: every byte of a dataset against the checksums its converter wrote.

The loaders check what is cheap at open (sizes, tables: O(files)) and what their decoder
reports; a flipped bit inside a JPEG that libjpeg-turbo decodes without complaint, or inside
a raw .beton sample, is seen only by a checksum. This is that check, for both formats, run
before training (or after copying data to a new machine):

- a shard folder (data_prep/to_dali.py): each tar's and index's sha256 and the tar's size
  against ``manifest.json`` (``sha256``, ``index_sha256``, ``bytes`` per shard);
- a .beton (data_prep/to_ffcv.py): its tables (:func:`fastsiam.data.beton.beton_problems`),
  and its size, sample count and sha256 against the converter's checksum record
  ``<stem>.beton.json`` (:func:`fastsiam.data.beton.checksum_record`).

``decode=True`` (``--decode``) also decodes every JPEG (torchvision's libjpeg-turbo for shards,
FFCV's own decoder for a .beton), which names the damaged samples a checksum mismatch does not
locate, and checks each shard sample's ``.cls`` member against the manifest's label.

Output: one line per problem naming the file (and the sample), then a summary line; the
command's exit status is 0 only when nothing was found.

API::

    verify(path, decode=False, workers=None) -> Report  .problems, .ok, .summary()
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastsiam.data.shards import (
    MANIFEST_NAME,
    ShardEntry,
    ShardFormatError,
    read_index_and_sha256,
    read_manifest,
)
from fastsiam.files import file_sha256


@dataclass
class Report:
    """What :func:`verify` found.

    Attributes:
        path: the dataset.
        problems: one line per problem, naming the file and, where known, the sample.
        files, samples: what the dataset holds (shards or 1 file; samples in all).
        hashed: bytes whose sha256 was compared with a recorded one.
        against: where the recorded checksums come from.
        decoded: JPEGs decoded (``decode=True``).
        seconds: wall time.
    """

    path: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0
    samples: int = 0
    hashed: int = 0
    against: str = ""
    decoded: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        files = f"{self.files} shards, " if self.against == MANIFEST_NAME else ""
        what = (f"{files}{self.samples} samples, {self.hashed / 1e6:.1f} MB hashed against "
                f"{self.against or 'nothing'}"
                + (f", {self.decoded} JPEGs decoded" if self.decoded else "")
                + f" in {self.seconds:.1f} s")
        if self.ok:
            return f"verify: {self.path}: ok ({what})"
        n = len(self.problems)
        return f"verify: {self.path}: {n} problem{'s' if n > 1 else ''} ({what})"


def verify(path: str | os.PathLike[str], *, decode: bool = False, workers: int | None = None) -> Report:
    """Check a shard folder or a .beton (see the module docstring) with ``workers`` threads
    (default: one per core).

    Raises ``FileNotFoundError`` / ``ValueError`` (one line) when ``path`` is neither, or
    unreadable as a whole (no manifest, no FFCV header); damage inside is reported, not raised.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"verify: {path} does not exist")
    begin = time.perf_counter()
    threads = max(workers or os.cpu_count() or 1, 1)
    report = (_verify_shards if path.is_dir() else _verify_beton)(path, decode, threads)
    report.seconds = time.perf_counter() - begin
    return report


# ----------------------------------------------------------------------------- shard folders


def _verify_shards(root: Path, decode: bool, workers: int) -> Report:
    try:
        manifest = read_manifest(root)
    except ShardFormatError as e:
        raise ValueError(f"verify: {e}") from None
    report = Report(root, files=len(manifest.shards), samples=manifest.num_samples,
                    against=MANIFEST_NAME)
    starts = np.cumsum([0] + [s.samples for s in manifest.shards]).tolist()
    with ThreadPoolExecutor(workers) as pool:  # hashlib and the decoder release the GIL
        for problems, hashed, decoded in pool.map(
            lambda a: _verify_shard(root, *a, decode), zip(manifest.shards, starts)
        ):
            report.problems += problems
            report.hashed += hashed
            report.decoded += decoded
    return report


def _verify_shard(root: Path, entry: ShardEntry, start: int, decode: bool) -> tuple[list[str], int, int]:
    """One shard's problems, bytes hashed, JPEGs decoded."""
    tar, index_path = root / entry.tar, root / entry.index
    problems, hashed = [], 0
    if not tar.is_file():
        problems.append(f"{tar}: missing (listed in {MANIFEST_NAME})")
    elif (size := tar.stat().st_size) != entry.bytes:
        problems.append(f"{tar}: {size} bytes, {MANIFEST_NAME} says {entry.bytes} (truncated or replaced)")
    else:
        got = file_sha256(tar)
        hashed += entry.bytes
        if got != entry.sha256:
            problems.append(f"{tar}: sha256 {got[:16]}... does not match {MANIFEST_NAME}'s "
                            f"{entry.sha256[:16]}... (bytes changed since the conversion; "
                            "--decode names the samples that no longer decode)")
    try:
        index, index_sha = read_index_and_sha256(index_path)
    except ShardFormatError as e:
        return [*problems, str(e)], hashed, 0
    hashed += index_path.stat().st_size
    if index_sha != entry.index_sha256:
        problems.append(f"{index_path}: sha256 {index_sha[:16]}... does not match "
                        f"{MANIFEST_NAME}'s {entry.index_sha256[:16]}...")
    if len(index) != entry.samples:
        problems.append(f"{index_path}: {len(index)} samples, {MANIFEST_NAME} says {entry.samples}")
    if not decode or not tar.is_file():
        return problems, hashed, 0
    from fastsiam.data.jpeg import jpeg_problem

    decoded = 0
    with open(tar, "rb") as f:
        for j, (key, comps) in enumerate(index):
            where = f"{tar}: sample {key} (index {start + j})"
            if "jpg" not in comps or "cls" not in comps:
                problems.append(f"{where}: no jpg or cls member in {index_path.name}")
                continue
            jpeg = os.pread(f.fileno(), comps["jpg"][1], comps["jpg"][0])
            cls = os.pread(f.fileno(), comps["cls"][1], comps["cls"][0])
            why = jpeg_problem(jpeg)
            decoded += 1
            if why is not None:
                problems.append(f"{where}: JPEG does not decode: {why}")
            if j < len(entry.labels) and cls.strip() != str(entry.labels[j]).encode():
                problems.append(f"{where}: its .cls member holds {cls[:20]!r}, {MANIFEST_NAME} "
                                f"says label {entry.labels[j]}")
    return problems, hashed, decoded


# ----------------------------------------------------------------------------- .beton files


def _verify_beton(path: Path, decode: bool, workers: int) -> Report:
    from fastsiam.data.beton import beton_problems, checksum_path, checksum_record, read_beton

    reader = read_beton(path, "image", "label", "verify")
    report = Report(path, files=1, samples=int(reader.num_samples))
    try:
        record = checksum_record(path)
    except ValueError as e:
        record = None
        report.problems.append(f"{e}: the bytes of {path} cannot be verified")
    else:
        if record is None:
            report.problems.append(
                f"{path}: no checksum record {checksum_path(path).name} (data_prep/to_ffcv.py "
                "writes one beside each .beton): its bytes cannot be verified")
    if record is not None:
        report.against = checksum_path(path).name
        size = path.stat().st_size
        if size != record["bytes"]:
            report.problems.append(f"{path}: {size} bytes, {report.against} says "
                                   f"{record['bytes']} (truncated or replaced)")
        else:
            got = file_sha256(path)
            report.hashed = size
            if got != record["sha256"]:
                report.problems.append(
                    f"{path}: sha256 {got[:16]}... does not match {report.against}'s "
                    f"{record['sha256'][:16]}... (bytes changed since the conversion; --decode "
                    "names the JPEG samples that no longer decode)")
        if record["num_samples"] != report.samples:
            report.problems.append(f"{path}: {report.samples} samples, {report.against} says "
                                   f"{record['num_samples']}")
    tables = beton_problems(reader, path, "image")
    report.problems += [f"{path}: {p}" for p in tables]
    if decode and not tables:  # damaged tables address the wrong bytes: nothing to decode
        bad, report.decoded = _decode_beton(reader, path, workers)
        report.problems += [f"{path}: sample {i}: JPEG does not decode (libjpeg-turbo reports an "
                            "error or corrupt data)" for i in bad]
    return report


def _decode_beton(reader, path: Path, workers: int) -> tuple[list[int], int]:
    """Every JPEG sample decoded by FFCV's decoder (the loader's): the failures, the count."""
    from ffcv.libffcv import imdecode

    from fastsiam.data.beton import stored_images

    jpegs = [(i, data, h, w) for i, (data, h, w, jpeg) in
             enumerate(stored_images(reader, path, "image")) if jpeg]

    def fails(sample: tuple[int, np.ndarray, int, int]) -> bool:
        _, data, h, w = sample
        out = np.empty(h * w * 3, dtype=np.uint8)
        return imdecode(data, out, h, w, h, w, 0, 0, 1, 1, False, False) != 0

    with ThreadPoolExecutor(workers) as pool:  # the decoder releases the GIL (ctypes)
        failed = list(pool.map(fails, jpegs))
    return [s[0] for s, f in zip(jpegs, failed) if f], len(jpegs)


__all__ = ["Report", "verify"]
