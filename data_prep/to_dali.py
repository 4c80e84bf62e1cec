"""Convert an ImageNet-style dataset to webdataset tar shards with DALI index files.

Usage::

    python data_prep/to_dali.py --src /data/imagenet/train --out /data/shards/train
    python data_prep/to_dali.py --src /data/imagenet/val --labels val_labels.txt \\
        --classes /data/shards/train/classes.json --out /data/shards/val

Output (``--out`` is a folder; the format is :mod:`fastsiam.data.shards`)::

    shard-000000.tar, shard-000000.idx, ...   <key>.jpg + <key>.cls per sample, DALI indices
    manifest.json                             shards, counts, labels, options, sha256 per file
    classes.json                              the class mapping (reuse it for val: --classes)
    skipped.tsv                               files left out, with the reason

Images are stored as they are: a file that is already an RGB (YCbCr) JPEG keeps its original
bytes, so the common case costs one read and one checking decode. Everything else becomes an
RGB JPEG at ``--jpeg-quality`` once: CMYK and grayscale JPEGs, PNG or other formats (ImageNet
has a PNG named ``.JPEG``), and, with ``--max-resolution N``, images whose longer side exceeds N.
Every loader then gets three channels from any decoder (DALI, nvjpeg, torchvision).

The folder appears under its final name only when complete: shards are written into
``.<out>.partial/`` and a journal record (``shard-NNNNNN.json``) follows each finished shard
with its checksums, so after a crash or kill ``--resume`` re-checks the finished shards and
continues after the last good one;
the result is byte-identical to an uninterrupted run (keys, shard boundaries and tar metadata do
not depend on timing or on ``--workers``). A failed write (a full disk) is one line that keeps
the complete shards for ``--resume``; a second conversion to the same ``--out`` is refused
while the first runs (the lock ``.<out>.lock`` beside the folder).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `data_prep` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from data_prep.converter import (
    DefaultsHelpFormatter,
    add_source_arguments,
    check_options,
    make_readable,
    nothing_decodable,
    output_lock,
    source_from_args,
)
from data_prep.errors import BadFileError, ConversionError, os_error_reason
from data_prep.images import (
    VERIFY_MIN_PSNR,
    BadImage,
    decode_image,
    psnr,
    read_file,
    to_rgb,
    verify_indices,
)
from data_prep.listing import Item, Source, write_classes
from data_prep.parallel import injected_delay, parallel_map, progress
from data_prep.reports import Skipped, shown, skipped_line

# fastsiam.data.shards is imported inside functions: `fastsiam.data` imports torch, which
# spawned workers (they re-import this module) should not pay for.

DEFAULT_SHARD_SIZE = 2000  # ~220 MB of ImageNet JPEGs per tar
CLASSES = "classes.json"
REPORT = "skipped.tsv"


# ----------------------------------------------------------------------------- per image


def resize_longest(image: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the longer side is ``max_side`` (aspect kept, Lanczos filter)."""
    w, h = image.size
    if w >= h:
        size = (max_side, max(1, round(h * max_side / w)))
    else:
        size = (max(1, round(w * max_side / h)), max_side)
    return image.resize(size, Image.Resampling.LANCZOS)


def prepare_jpeg(path: str, max_resolution: int | None, quality: int) -> tuple[bytes | None, str]:
    """Check one file and return ``(bytes to store, note)``, or ``(None, reason)`` if bad.

    ``note`` says why the image was re-encoded (``""``: original bytes kept).
    Runs in worker processes.
    """
    try:
        data = read_file(path)
        image = decode_image(data)
        too_big = max_resolution is not None and max(image.size) > max_resolution
        if image.format == "JPEG" and image.mode == "RGB" and not too_big:
            return data, ""
        rgb = to_rgb(image)
    except BadImage as e:
        return None, str(e)
    if too_big:
        note = "resized"
    elif image.format != "JPEG":
        note = (image.format or "unknown").lower()
    else:
        note = {"L": "grayscale", "CMYK": "cmyk"}.get(image.mode, image.mode.lower())
    if too_big:
        rgb = resize_longest(rgb, max_resolution)  # type: ignore[arg-type]
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), note


def reference_image(path: str, max_resolution: int | None) -> Any:
    """What a decoder should give back for ``path``: RGB, shrunk as the converter shrinks."""
    import numpy as np

    image = to_rgb(decode_image(read_file(path)))
    if max_resolution is not None and max(image.size) > max_resolution:
        image = resize_longest(image, max_resolution)
    return np.asarray(image)


# ----------------------------------------------------------------------------- journal


def _fingerprint(source: Source, options: dict[str, Any]) -> str:
    """What a resumed run must share with the interrupted one: input listing and options."""
    blob = json.dumps({"options": options, "classes": source.classes, "root": source.root,
                       "items": [[it.rel, it.label] for it in source.items],
                       "rejected": source.rejected}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _record_name(shard: int) -> str:
    return f"shard-{shard:06d}.json"


def _load_journal(staging: Path, fingerprint: str) -> list[dict[str, Any]]:
    """The interrupted run's finished shards (one record each, in order), every one re-checked
    by its checksums; stops at the first missing, unreadable or damaged shard."""
    from fastsiam.data.shards import ShardEntry
    from fastsiam.files import file_sha256

    records: list[dict[str, Any]] = []
    while (path := staging / _record_name(len(records))).exists():
        try:
            record = json.loads(path.read_text())
        except ValueError:
            print(f"resume: {path} is unreadable; redoing that shard and what follows",
                  file=sys.stderr)
            break
        if record.get("fingerprint") != fingerprint:
            raise ConversionError(f"cannot resume {staging}: the input listing or the options "
                                  f"differ from the interrupted run; pass --overwrite to start over")
        entry = ShardEntry(**record["entry"])
        if not all((staging / name).is_file() and file_sha256(staging / name) == sha
                   for name, sha in ((entry.tar, entry.sha256), (entry.index, entry.index_sha256))):
            print(f"resume: {entry.tar} fails its checksum; redoing it and what follows",
                  file=sys.stderr)
            break
        records.append(record)
    return records


def _write_record(staging: Path, shard: int, record: dict[str, Any]) -> None:
    from fastsiam.files import atomic_open

    with atomic_open(staging / _record_name(shard), "w") as f:
        json.dump(record, f)


def _clean_staging(staging: Path, keep: set[str]) -> None:
    """Remove partial files and shards not in the journal (an interrupted run's leftovers)."""
    for p in staging.iterdir():
        if p.name not in keep:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()


def _replace_dir(new: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)


# ----------------------------------------------------------------------------- conversion


def convert(source: Source, out: str | os.PathLike[str], *, shard_size: int | None = None,
            shard_bytes: int | None = None, max_resolution: int | None = None,
            jpeg_quality: int = 90, workers: int = 1, resume: bool = False,
            overwrite: bool = False, strict: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Write ``source`` as tar shards into the folder ``out``; return a summary dict (``items``:
    the images written, in sample order).

    Args:
        source: the listed input (:mod:`data_prep.listing`).
        out: the output folder; it appears only when complete.
        shard_size: samples per shard (default 2000 unless ``shard_bytes`` is set).
        shard_bytes: maximum tar size instead (a single larger sample gets its own shard).
        max_resolution: re-encode images whose longer side exceeds this, shrunk to it.
        jpeg_quality: JPEG quality of re-encoded images.
        workers: checking/encoding processes.
        resume: continue an interrupted conversion of the same input and options.
        overwrite: replace an existing output (and discard an interrupted one).
        strict: raise :class:`BadFileError` at the first bad file instead of skipping it.
        quiet: no progress bar.
    """
    if shard_size is not None and shard_bytes is not None:
        raise ConversionError("--shard-size and --shard-bytes are alternatives; pass one")
    if shard_size is None and shard_bytes is None:
        shard_size = DEFAULT_SHARD_SIZE
    out = Path(out)
    check_options(out, overwrite=overwrite, jpeg_quality=jpeg_quality, minimums=(
        ("--shard-size", shard_size, 1), ("--shard-bytes", shard_bytes, 4096),
        ("--max-resolution", max_resolution, 16), ("--workers", workers, 1)))
    options = {"shard_size": shard_size, "shard_bytes": shard_bytes,
               "max_resolution": max_resolution, "jpeg_quality": jpeg_quality}
    with output_lock(out):
        try:
            return _write_shards(source, out, options, workers=workers, resume=resume,
                                 overwrite=overwrite, strict=strict, quiet=quiet)
        except OSError as e:
            staging = _staging(out)
            kept = len(list(staging.glob("shard-*.json"))) if staging.is_dir() else 0
            raise ConversionError(f"cannot write {shown(out)}: {os_error_reason(e)}; the {kept} "
                                  f"complete shards in {shown(staging)} are kept: free space, "
                                  f"then rerun with --resume to continue") from None


def _staging(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _write_shards(source: Source, out: Path, options: dict[str, Any], *, workers: int,
                  resume: bool, overwrite: bool, strict: bool, quiet: bool) -> dict[str, Any]:
    """:func:`convert` once the output is locked (the staging folder is this run's alone).

    A failed write (a full disk) raises OSError once the shard being written is removed;
    the complete ones stay journaled in the staging folder for ``--resume``.
    """
    from fastsiam.data.shards import Manifest, ShardEntry, ShardWriter, write_manifest

    shard_size, shard_bytes = options["shard_size"], options["shard_bytes"]
    staging = _staging(out)
    fingerprint = _fingerprint(source, options)
    if staging.exists() and not (resume or overwrite):
        raise ConversionError(f"an interrupted conversion is in {staging}: pass --resume to "
                              f"continue it or --overwrite to start over")
    if staging.exists() and overwrite and not resume:
        shutil.rmtree(staging)
    records = _load_journal(staging, fingerprint) if staging.exists() else []
    staging.mkdir(parents=True, exist_ok=True)
    done = [ShardEntry(**r["entry"]) for r in records]
    _clean_staging(staging, {name for k, e in enumerate(done)
                             for name in (e.tar, e.index, _record_name(k))})

    items = source.items
    key_digits = max(8, len(str(len(items))))
    start = records[-1]["next_candidate"] if records else 0
    stats: Counter[str] = Counter(records[-1]["stats"] if records else {})
    skipped: list[list[Any]] = [s for r in records for s in r["skipped"]]
    num_samples = sum(e.samples for e in done)
    if start:
        print(f"resume: {len(done)} shards ({num_samples} samples) verified; continuing at input "
              f"{start} of {len(items)}", file=sys.stderr)
    delay = injected_delay()
    begin = time.perf_counter()

    writer: ShardWriter | None = None
    labels: list[int] = []
    last_pos = start - 1
    recorded = len(skipped)  # skipped files already in a journal record

    def finish_shard() -> None:
        # The shard's files are complete and renamed before its journal record appears.
        nonlocal writer, labels, recorded
        assert writer is not None
        entry = ShardEntry(**{**asdict(writer.close()), "labels": labels})
        _write_record(staging, len(done), {
            "fingerprint": fingerprint, "entry": asdict(entry), "next_candidate": last_pos + 1,
            "stats": dict(stats), "skipped": [s for s in skipped[recorded:] if s[0] <= last_pos]})
        recorded = sum(1 for s in skipped if s[0] <= last_pos)
        done.append(entry)
        writer, labels = None, []

    work = functools.partial(prepare_jpeg, max_resolution=options["max_resolution"],
                             quality=options["jpeg_quality"])
    results = parallel_map(work, (it.path for it in items[start:]), workers=workers, chunksize=32)
    bar = progress(len(items) - start, "to_dali", quiet)
    try:
        with contextlib.closing(results):
            for pos, item, (payload, note) in zip(range(start, len(items)), items[start:], results):
                bar.update(1)
                if payload is None:
                    if strict:
                        raise BadFileError(item.path, note)
                    skipped.append([pos, item.rel, note])
                    continue
                stats[note or "original"] += 1
                cls = str(item.label).encode()
                size = 3 * 512 + len(payload) + len(cls)  # headers + data, before padding
                if (writer is not None and shard_bytes is not None
                        and writer.bytes_written + size + 1024 > shard_bytes):
                    finish_shard()
                if writer is None:
                    name = f"shard-{len(done):06d}"
                    writer = ShardWriter(staging / f"{name}.tar", staging / f"{name}.idx")
                writer.add(f"{num_samples:0{key_digits}d}", {"jpg": payload, "cls": cls})
                labels.append(item.label)
                num_samples += 1
                last_pos = pos
                if delay:
                    time.sleep(delay)
                if shard_size is not None and len(writer) == shard_size:
                    finish_shard()
            if writer is not None:
                finish_shard()
    except BadFileError:
        if writer is not None:
            writer.abort()
        shutil.rmtree(staging, ignore_errors=True)  # the input must change: nothing to resume
        raise
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if num_samples == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise nothing_decodable(source)

    report = Skipped([(rel, reason) for _, rel, reason in skipped] + list(source.rejected))
    report.entries.sort()
    report.write(staging / REPORT, source.root)
    write_classes(staging / CLASSES, source.classes)
    manifest = Manifest(
        num_samples=num_samples, classes=source.classes, shards=done, key_digits=key_digits,
        source=source.describe(), options=options,
        stats={"skipped": len(report), "stored": dict(sorted(stats.items()))})
    write_manifest(staging, manifest)
    for k in range(len(done)):
        (staging / _record_name(k)).unlink()
    make_readable(staging.iterdir())
    _replace_dir(staging, out)
    seconds = time.perf_counter() - begin
    bad = {pos for pos, _, _ in skipped}
    return {"out": str(out), "samples": num_samples, "shards": len(done),
            "bytes": sum(e.bytes for e in done), "skipped": len(report),
            "stored": dict(sorted(stats.items())), "seconds": seconds,
            "images_per_s": (len(items) - start) / max(seconds, 1e-9),
            "items": [it for pos, it in enumerate(items) if pos not in bad]}


# ----------------------------------------------------------------------------- verification


def verify(out: str | os.PathLike[str], items: list[Item], *, samples: int = 64,
           threads: int = 2) -> dict[str, Any]:
    """Read ``out`` back with tarfile and with DALI's reader (CPU) and compare with ``items``.

    ``items`` are the input images expected in the output, in sample order (``convert``
    returns them).

    Checks every shard's checksum, tar members against the index, the sample count and every
    label (tar, DALI and manifest against the input), and that ``samples`` evenly spread
    images decoded by DALI match their source above ``VERIFY_MIN_PSNR`` dB.
    """
    import tarfile

    import numpy as np

    from fastsiam.data.shards import read_index, read_manifest
    from fastsiam.files import file_sha256

    out = Path(out)
    manifest = read_manifest(out)
    expected = [it.label for it in items]
    if manifest.num_samples != len(items):
        raise ConversionError(f"verify: {out} holds {manifest.num_samples} samples, the input "
                              f"has {len(items)} good images")
    if manifest.labels.tolist() != expected:
        raise ConversionError(f"verify: manifest labels of {out} differ from the input's")

    # tarfile: checksums, member names/offsets/sizes against the index, every .cls label.
    tar_labels: list[int] = []
    for entry in manifest.shards:
        for name, sha in ((entry.tar, entry.sha256), (entry.index, entry.index_sha256)):
            if file_sha256(out / name) != sha:
                raise ConversionError(f"verify: {out / name} does not match its manifest checksum")
        index = read_index(out / entry.index)
        with tarfile.open(out / entry.tar) as tar:
            members = tar.getmembers()
            listed = [(f"{key}.{ext}", off, size) for key, comps in index
                      for ext, (off, size) in comps.items()]
            found = [(m.name, m.offset_data, m.size) for m in members]
            if found != listed:
                raise ConversionError(f"verify: {out / entry.tar} members differ from {entry.index}")
            for m in members:
                if m.name.endswith(".cls"):
                    tar_labels.append(int(tar.extractfile(m).read()))  # type: ignore[union-attr]
    if tar_labels != expected:
        raise ConversionError(f"verify: .cls members of {out} differ from the input's labels")

    # DALI: the stock webdataset reader (CPU) over all shards, then decode a spread sample.
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise ConversionError("--verify needs NVIDIA DALI: pip install 'fastsiam[dali]' "
                              "(nvidia-dali-cuda120)") from None
    batch = 32

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=1)
    def read_all():
        jpg, cls = fn.readers.webdataset(paths=manifest.tar_paths(out),
                                         index_paths=manifest.index_paths(out), ext=["jpg", "cls"],
                                         missing_component_behavior="error", name="reader")
        return jpg, cls

    wanted = verify_indices(len(items), samples)
    encoded: dict[int, np.ndarray] = {}
    dali_labels: list[int] = []
    pipe = read_all()
    pipe.build()
    if pipe.epoch_size("reader") != len(items):
        raise ConversionError(f"verify: DALI sees {pipe.epoch_size('reader')} samples in {out}, "
                              f"expected {len(items)}")
    wanted_set = set(wanted)
    while len(dali_labels) < len(items):
        jpgs, clss = pipe.run()
        for j in range(min(batch, len(items) - len(dali_labels))):
            i = len(dali_labels)
            dali_labels.append(int(bytes(np.asarray(clss.at(j))).decode()))
            if i in wanted_set:
                encoded[i] = np.array(jpgs.at(j))
    del pipe
    if dali_labels != expected:
        first = next(i for i, (a, b) in enumerate(zip(dali_labels, expected)) if a != b)
        raise ConversionError(f"verify: DALI reads label {dali_labels[first]} for sample {first} "
                              f"({items[first].rel}), expected {expected[first]}")

    @pipeline_def(batch_size=len(wanted), num_threads=threads, device_id=None,
                  prefetch_queue_depth=1)
    def decode():
        # adjust_orientation=False: PIL/torchvision (the reference) ignore EXIF orientation.
        return fn.decoders.image(fn.external_source(name="jpg"), device="cpu",
                                 output_type=types.RGB, adjust_orientation=False)

    pipe = decode()
    pipe.build()
    pipe.feed_input("jpg", [encoded[i] for i in wanted])
    (images,) = pipe.run()
    max_res = manifest.options.get("max_resolution")
    worst = float("inf")
    for j, i in enumerate(wanted):
        got, ref = np.asarray(images.at(j)), reference_image(items[i].path, max_res)
        if got.shape != ref.shape:
            raise ConversionError(f"verify: sample {i} ({items[i].rel}) decodes to {got.shape}, "
                                  f"source is {ref.shape}")
        quality = psnr(got, ref)
        if quality < VERIFY_MIN_PSNR:
            raise ConversionError(f"verify: sample {i} ({items[i].rel}) differs from its source "
                                  f"(PSNR {quality:.1f} dB < {VERIFY_MIN_PSNR} dB)")
        worst = min(worst, quality)
    return {"samples": len(items), "labels_checked": len(items), "images_checked": len(wanted),
            "min_psnr_db": worst}


# ----------------------------------------------------------------------------- command line


def parse_size(text: str) -> int:
    """``"512MB"``, ``"1GiB"``, ``"1e9"`` -> bytes."""
    units = {"": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "kib": 2**10, "mib": 2**20, "gib": 2**30}
    s = text.strip().lower()
    number = s.rstrip("kmgib")
    try:
        return int(float(number) * units[s[len(number):]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB, 1GiB, 1e9)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="to_dali.py", description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
        epilog="Readers: DALI fn.readers.webdataset(paths=manifest.tar_paths(out), index_paths="
               "manifest.index_paths(out), ext=['jpg','cls']); fastsiam.data.shards.ShardReader; "
               "the webdataset package; tarfile.")
    add_source_arguments(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (appears only when complete)")
    size = g.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=int, help=f"samples per shard (default {DEFAULT_SHARD_SIZE})")
    size.add_argument("--shard-bytes", type=parse_size, help="maximum shard size instead, e.g. 1GB")
    g.add_argument("--max-resolution", type=int, default=None,
                   help="re-encode images whose longer side exceeds N, shrunk to N "
                        "(others keep their original bytes)")
    g.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded images")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted conversion after its last complete shard")
    g.add_argument("--verify", action="store_true",
                   help="read the result back (tarfile, DALI CPU reader) and compare with the input")
    g.add_argument("--verify-samples", type=int, default=64,
                   help=f"images decoded and compared with their source (PSNR >= {VERIFY_MIN_PSNR} dB)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = source_from_args(args)
        summary = convert(
            source, args.out, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
            max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
            workers=args.workers, resume=args.resume, overwrite=args.overwrite,
            strict=args.strict, quiet=args.quiet)
        stored = ", ".join(f"{k} {v}" for k, v in summary["stored"].items())
        print(f"wrote {summary['samples']} samples in {summary['shards']} shards "
              f"({summary['bytes'] / 1e6:.1f} MB) to {args.out} in {summary['seconds']:.1f} s "
              f"({summary['images_per_s']:.0f} images/s); stored: {stored}")
        print(skipped_line(summary["skipped"], Path(args.out) / REPORT))
        if args.verify:
            result = verify(args.out, summary["items"], samples=args.verify_samples,
                            threads=args.workers)
            print(f"verify: ok ({result['samples']} samples and labels via tarfile and DALI; "
                  f"{result['images_checked']} images decoded by DALI, min PSNR "
                  f"{result['min_psnr_db']:.1f} dB >= {VERIFY_MIN_PSNR} dB)")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
