"""Convert an ImageNet-style dataset to an FFCV ``.beton`` file (ffcv's DatasetWriter).

Usage::

    python data_prep/to_ffcv.py --src /data/imagenet/train --out /data/ffcv/train.beton
    python data_prep/to_ffcv.py --src /data/imagenet/val --labels val_labels.txt \\
        --classes /data/ffcv/train.classes.json --out /data/ffcv/val.beton

Fields: ``image`` (ffcv ``RGBImageField``) and ``label`` (``IntField``), as ffcv-imagenet
writes them. Defaults are ffcv-imagenet's ResNet-50 settings (``write_imagenet.sh 500 0.50
90``): longest side at most 500 px, half of the images JPEG-compressed at quality 90 and half
stored as raw pixels (``--write-mode proportion``).

Disk and quality for SimSiam's 224 px crops (RandomResizedCrop, scale 0.2-1): a crop covers
20-100% of the image area, so from a 500 px image it is 224-500 px wide and is only ever
shrunk; at ``--max-resolution 256`` small crops are ~115 px and get upsampled (softer views)
while the file shrinks ~4x. Raw pixels decode for free but take ~10x the bytes of a q90 JPEG
(ImageNet at 500 px: ~340 GB raw-heavy vs ~60 GB all-JPEG); ``jpg`` mode moves that cost to
the loader's CPU (a JPEG decode per view), ``proportion`` splits it, ``smart`` stores raw only
images smaller than ``--smart-threshold`` bytes.

How it works: every image is decoded once. A parallel pass reads the headers (the sample count
and the largest image must be known before ffcv allocates the file; empty files and non-images
are skipped here). A second pass runs in the writer: worker processes decode, resize (ffcv's
``resizer``: cv2 INTER_AREA) and JPEG-encode (ffcv's ``encode_jpeg``) in order, and ffcv's
DatasetWriter, with one writer process, places the results into the file. A file whose header
is good but whose data does not decode (truncated, corrupt: rare) stops that pass; the files
after it are then decoded once to find every such file, and the pass runs again without them.
With one writer process the file holds exactly the bytes of ffcv's own single-process writer;
ffcv's multi-process writing gives a different page layout on every run, while this way the
same input and options give a byte-identical ``.beton`` whatever ``--workers`` is.
Beside the output: ``<name>.classes.json``, ``<name>.skipped.tsv`` (bad files and why) and
``<name>.beton.json`` (its size and sha256: :func:`fastsiam.data.beton.make_checksum_record`),
all written under temporary names and renamed once the file is complete, the ``.beton`` last.

Failures: a second conversion to the same ``--out`` is refused while the first runs (the lock
``.<name>.beton.lock``); when ffcv's writer process fails (a full disk, a bad sample) or dies,
the conversion stops within a second with one line and removes its temporary file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the `data_prep` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

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
    check_image,
    decode_image,
    probe_image,
    psnr,
    read_file,
    read_header,
    to_rgb,
    verify_indices,
)
from data_prep.listing import Item, Source, classes_json
from data_prep.parallel import injected_delay, parallel_map, progress
from data_prep.reports import Skipped, shown, skipped_line
from fastsiam.data.beton import side_file
from fastsiam.files import remove_partials

FFCV_HINT = ("ffcv is not installed: pip install 'fastsiam[ffcv]' (needs the apt packages "
             "pkg-config libopencv-dev libturbojpeg0-dev)")
WRITE_MODES = ("raw", "jpg", "smart", "proportion")
MIN_PAGE_SIZE = 1 << 21  # ffcv.writer.MIN_PAGE_SIZE
VERIFY_SIZE = 96  # side of the center crops compared in --verify


# ----------------------------------------------------------------------------- per image


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise ConversionError(FFCV_HINT) from None
    cv2.setNumThreads(1)  # one image per process; parallelism comes from the worker pool
    return cv2


def stored_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """(width, height) ffcv 1.0.2's ``fields.rgb_image.resizer`` gives an image: the longest
    side shrunk to ``max_resolution``, never enlarged."""
    ratio = max_resolution / max(width, height) if max_resolution else 1.0
    if ratio >= 1:
        return width, height
    new_w, new_h = (ratio * np.array([width, height])).astype(int)
    return int(new_w), int(new_h)


def stored_pixels(path: str, max_resolution: int | None) -> np.ndarray:
    """``path`` as the .beton stores it: ``uint8 [h, w, 3]`` in OpenCV's BGR order, at
    :func:`stored_size` (raises BadImage).

    8-bit RGB and greyscale JPEGs decode with OpenCV's libjpeg-turbo: pixel for pixel what PIL
    gives (tested), without PIL's copies, and truncated files fail as in PIL; every other file,
    and any JPEG OpenCV refuses, decodes with PIL, which then gives the reason a bad file is
    skipped. Always at full size, then ffcv's INTER_AREA resize: libjpeg's DCT scaling (PIL's
    ``draft``) was measured on photo-like JPEGs 2-14x the stored size at only 1.3-1.4x faster
    and 1-9 dB further from a Lanczos reference than the full decode, so it is not offered.
    """
    cv2 = _import_cv2()
    data = read_file(path)
    header = read_header(data)
    size = stored_size(header.width, header.height, max_resolution)
    image = None
    if header.format == "JPEG" and header.mode in ("RGB", "L"):
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # PIL ignores EXIF rotation too
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        image = cv2.cvtColor(np.asarray(to_rgb(decode_image(data))), cv2.COLOR_RGB2BGR)
    if (image.shape[1], image.shape[0]) != size:
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


def prepare_image(task: tuple[int, str], *, max_resolution: int | None, write_mode: str,
                  jpeg_quality: int, compress_probability: float, smart_threshold: int | None,
                  seed: int) -> tuple[str, int, int, np.ndarray] | tuple[str, str]:
    """What ``RGBImageField.encode`` computes for sample ``index``: ``(mode, h, w, bytes)``.

    Decides raw vs JPEG as ffcv does, except ``proportion``: ffcv draws from the global numpy
    RNG in whichever process handles the sample; here the draw is seeded by (seed, index),
    so the choice is reproducible. JPEGs are encoded as ffcv's ``encode_jpeg`` does (OpenCV,
    BGR in). Returns ``("error", reason)`` on failure. Runs in workers.
    """
    index, path = task
    try:
        cv2 = _import_cv2()
        image = stored_pixels(path, max_resolution)
        if write_mode == "smart":
            as_jpg = smart_threshold is not None and image.nbytes > smart_threshold
        elif write_mode == "proportion":
            as_jpg = np.random.default_rng([seed, index]).random() < compress_probability
        else:
            as_jpg = write_mode == "jpg"
        if as_jpg:
            ok, payload = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), jpeg_quality])
            if not ok:
                raise BadImage("cv2 could not JPEG-encode the image")
        else:
            payload = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    except (BadImage, ConversionError) as e:
        return "error", str(e)
    return ("jpg" if as_jpg else "raw"), image.shape[0], image.shape[1], payload.reshape(-1)


def place_prepared(destination: Any, prepared: tuple[str, int, int, np.ndarray], malloc: Any) -> None:
    """The end of ``RGBImageField.encode``: store a prepared image's metadata and bytes."""
    from ffcv.fields.rgb_image import IMAGE_MODES

    mode, height, width, payload = prepared
    destination["mode"] = IMAGE_MODES[mode]
    destination["height"], destination["width"] = height, width
    destination["data_ptr"], storage = malloc(payload.nbytes)
    storage[:] = payload


class UndecodableSample(Exception):
    """Sample ``index``'s file passed the header check but does not decode (``reason``)."""

    def __init__(self, index: int, reason: str):
        super().__init__(reason)
        self.index = index


class PreparedImages:
    """The indexable dataset ffcv's DatasetWriter reads: sample ``i`` is (prepared image, label).

    It lives in ffcv's writer process, which asks for samples in order (one writer process,
    chunks in order). With ``workers`` W > 1, a pool of W processes prepares the samples ahead,
    in order, and this process only places them: writing the pages is the one serial part, so
    it is kept free of decoding (on 2 cores, photo-like images, no slower than a writer that
    also prepares every W-th sample, within run-to-run noise). A failure (a bad sample, a full disk) is recorded in ``failure``, shared
    memory the parent reads (a file on a full disk could not be written), by :func:`_writer_job`;
    a sample whose file does not decode also leaves its index in ``undecodable``.
    """

    def __init__(self, items: list[Item], prepare: Any, workers: int, delay: float = 0.0):
        self.items, self.prepare, self.workers, self.delay = items, prepare, workers, delay
        self.failure: Any = multiprocessing.Array("c", 1024)  # a char array: .value is bytes
        self.writer_pid = multiprocessing.Value("i", 0)
        self.undecodable = multiprocessing.Value("q", -1)
        self._results: Any = None
        self._next = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[tuple[str, int, int, np.ndarray], int]:
        w = self.workers
        if self._results is None and w > 1:
            tasks = ((k, it.path) for k, it in enumerate(self.items))
            self._results = parallel_map(self.prepare, tasks, workers=w, chunksize=8,
                                         inline=False)
        if i != self._next:
            raise RuntimeError(f"samples requested out of order ({i} after {self._next - 1})")
        self._next += 1
        prepared = next(self._results) if w > 1 else self.prepare((i, self.items[i].path))
        if i == len(self.items) - 1:
            self.close()  # shuts the pool down before ffcv's process exits
        if prepared[0] == "error":
            raise UndecodableSample(i, prepared[1])
        if self.delay:
            time.sleep(self.delay)
        return prepared, self.items[i].label  # type: ignore[return-value]

    def close(self) -> None:
        if self._results is not None:
            self._results.close()

    def fail(self, e: BaseException) -> None:
        """Stop the pool, whose live workers would keep the writer process from exiting
        (multiprocessing joins them first), and record why the writer fails."""
        self.close()
        if isinstance(e, UndecodableSample):
            self.undecodable.value = e.index
        reason = os_error_reason(e) if isinstance(e, OSError) else str(e) or type(e).__name__
        self.failure.value = shown(reason).encode("utf-8")[:1023]

    def writer_failure(self) -> str | None:
        """Why the writer process failed (seen from its parent), or None while it has not.

        A dead writer is found without reaping it (``waitid`` with ``WNOWAIT``), so that it is
        found however short its life was, and multiprocessing still reaps it as usual.
        """
        if self.failure.value:
            return self.failure.value.decode()
        pid = self.writer_pid.value
        if not pid:
            return None
        try:
            status = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            status = None  # reaped: multiprocessing does that only after ffcv stopped waiting
        if status is None or (status.si_code == os.CLD_EXITED and status.si_status == 0):
            return None
        if status.si_code == os.CLD_EXITED:
            return f"ffcv's writer process died (exit code {status.si_status})"
        return f"ffcv's writer process was killed (signal {status.si_status})"


def _writer_job(*args: Any) -> None:
    """ffcv's writer process (``worker_job_indexed_dataset``), which on any failure records it
    in the dataset and exits at once: no traceback, no wait for the pool's workers."""
    from ffcv.writer import worker_job_indexed_dataset

    dataset: PreparedImages = args[-1]
    dataset.writer_pid.value = os.getpid()
    try:
        worker_job_indexed_dataset(*args)
    except BaseException as e:
        dataset.fail(e)
        os._exit(1)


def _write_beton(writer: Any, dataset: PreparedImages, chunk_size: int) -> None:
    """``writer.from_indexed_dataset(dataset, chunksize=chunk_size)`` with :func:`_writer_job`
    as the writer process: what ffcv 1.0.2's method does (pinned), through its ``_write_common``."""
    from ffcv.utils import chunks

    indices = list(enumerate(np.arange(len(dataset))))
    writer._write_common(len(indices), chunks(indices, chunk_size), _writer_job, (dataset,))


@contextlib.contextmanager
def _no_tqdm_monitor():
    """ffcv's writer shows a plain tqdm bar; keep tqdm from starting its monitor thread, which
    outlives the bar and would make later worker pools spawn instead of fork. A write that
    fails leaves the bar open: close it, so that the error starts on its own line."""
    from tqdm import tqdm

    saved, tqdm.monitor_interval = tqdm.monitor_interval, 0
    try:
        yield
    except BaseException:
        for bar in list(tqdm._instances):
            bar.close()
        raise
    finally:
        tqdm.monitor_interval = saved


@contextlib.contextmanager
def _stop_if_writer_dies(out: Path, dataset: PreparedImages, writer: Any):
    """End ffcv's wait for a writer process that died, with the recorded reason in one line.

    ffcv's parent waits forever for a dead writer: in a polling loop, then in a blocking
    ``Queue.get`` for its allocations. A watchdog thread sends this (the main) thread a real
    SIGINT: ``_thread.interrupt_main`` only sets a flag, which a blocked read never checks,
    while a signal fails the read with EINTR and the handler's KeyboardInterrupt ends it.
    Where SIGINT is ignored (a background job), Python's handler is installed for the block.
    Also frees ffcv's shared memory, which an interrupted write leaves behind.
    """
    if threading.current_thread() is not threading.main_thread():
        raise ConversionError("to_ffcv.convert must run in the main thread (a signal ends ffcv's "
                              "wait for a writer process that died)")
    previous = signal.getsignal(signal.SIGINT)
    replaced = previous in (signal.SIG_IGN, signal.SIG_DFL)
    if replaced:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    stop, failure = threading.Event(), []
    main = threading.get_ident()

    def watch() -> None:
        while not stop.wait(0.1):
            reason = dataset.writer_failure()
            if reason is not None:
                failure.append(reason)
                signal.pthread_kill(main, signal.SIGINT)
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    except BaseException as e:
        memory = getattr(writer, "metadata_sm", None)
        if isinstance(memory, shared_memory.SharedMemory):
            memory.close()
            with contextlib.suppress(FileNotFoundError):
                memory.unlink()
        if isinstance(e, KeyboardInterrupt) and failure:
            raise ConversionError(f"cannot write {shown(out)}: {failure[0]} (the partial file "
                                  f"was removed)") from None
        raise
    finally:
        stop.set()
        thread.join()
        if replaced:
            signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- conversion


def convert(source: Source, out: str | os.PathLike[str], *, max_resolution: int | None = 500,
            write_mode: str = "proportion", compress_probability: float = 0.5,
            jpeg_quality: int = 90, smart_threshold: int | None = None, workers: int = 1,
            chunk_size: int = 100, seed: int = 0, overwrite: bool = False, strict: bool = False,
            quiet: bool = False) -> dict[str, Any]:
    """Write ``source`` to the ``.beton`` file ``out``; return a summary dict (``items``:
    the images written, in sample order).

    Args:
        source: the listed input (:mod:`data_prep.listing`).
        out: the ``.beton`` path; it appears only when complete.
        max_resolution: longest side in the file (None: keep sizes).
        write_mode: ffcv's ``raw``, ``jpg``, ``smart`` or ``proportion``.
        compress_probability: share of JPEG-compressed images in ``proportion`` mode.
        jpeg_quality: quality of the JPEGs ffcv stores.
        smart_threshold: ``smart`` mode compresses images whose raw size exceeds this (bytes).
        workers: decoding/encoding processes.
        chunk_size: samples per ffcv writer chunk.
        seed: seeds ``proportion``'s per-sample choice.
        overwrite: replace an existing output.
        strict: raise :class:`BadFileError` at the first bad file instead of skipping it.
        quiet: no progress bar for the checking pass (ffcv's writer prints its own).
    """
    if write_mode not in WRITE_MODES:
        raise ConversionError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")
    if write_mode == "smart" and smart_threshold is None:
        raise ConversionError("--write-mode smart needs --smart-threshold BYTES (ffcv stores "
                              "every image raw without one)")
    if not 0.0 <= compress_probability <= 1.0:
        raise ConversionError(f"--compress-probability must be in [0, 1], got {compress_probability}")
    out = Path(out)
    if out.suffix != ".beton":
        raise ConversionError(f"--out {out}: expected a file name ending in .beton")
    check_options(out, overwrite=overwrite, jpeg_quality=jpeg_quality, minimums=(
        ("--max-resolution", max_resolution, 16), ("--workers", workers, 1),
        ("--chunk-size", chunk_size, 1)))
    if out.is_dir():
        raise ConversionError(f"--out {out} is a folder; expected a .beton file name")
    try:
        from ffcv.fields import IntField, RGBImageField
    except ImportError:
        raise ConversionError(FFCV_HINT) from None
    with output_lock(out):
        for stale in remove_partials(out.parent, out.name):  # left by a killed run
            print(f"removed {stale} (left by an interrupted run)", file=sys.stderr)
        begin = time.perf_counter()
        items, sizes, skipped = _screen(source.items, probe_image, "read headers", workers,
                                        strict, quiet)
        skipped.entries = sorted(skipped.entries + list(source.rejected))
        field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                              smart_threshold=smart_threshold, jpeg_quality=jpeg_quality,
                              compress_probability=compress_probability)
        # ffcv's writer process calls field.encode; the pool already did its work (same resize
        # and JPEG encoder), so the writer only places bytes. The field stays a stock
        # RGBImageField, so the file's field table is ffcv's own.
        field.encode = place_prepared  # type: ignore[method-assign]
        prepare = functools.partial(
            prepare_image, max_resolution=max_resolution, write_mode=write_mode,
            jpeg_quality=jpeg_quality, compress_probability=compress_probability,
            smart_threshold=smart_threshold, seed=seed)
        while True:
            if not items:
                raise nothing_decodable(source)
            dataset = PreparedImages(items, prepare, workers, injected_delay())
            try:
                _write(out, dataset, {"image": field, "label": IntField()},
                       _page_size(sizes, max_resolution), chunk_size, {
                           "classes.json": classes_json(source.classes).encode(),
                           "skipped.tsv": skipped.text(source.root).encode("utf-8")})
                break
            except OSError as e:
                raise ConversionError(f"cannot write {shown(out)}: {os_error_reason(e)} (the "
                                      f"partial file was removed)") from None
            except ConversionError:
                bad = dataset.undecodable.value
                if bad < 0:
                    raise
                reason = dataset.failure.value.decode()
                if strict:
                    raise BadFileError(items[bad].path, reason) from None
            # A file with a good header does not decode (rare: truncated or corrupt). The files
            # before it decoded; decode the rest once to find every such file, then write again.
            rest, rest_sizes, rest_skipped = _screen(items[bad:], check_image, "check", workers,
                                                     strict, quiet)
            if rest and rest[0] is items[bad]:  # it decodes: what failed was not the file
                raise ConversionError(f"{shown(items[bad].path)} decodes but could not be "
                                      f"prepared for the .beton: {reason}")
            items, sizes = items[:bad] + rest, sizes[:bad] + rest_sizes
            skipped.entries = sorted(skipped.entries + rest_skipped.entries)
    seconds = time.perf_counter() - begin
    stored = _stored_modes(out)
    return {"out": str(out), "samples": len(items), "skipped": len(skipped), "stored": stored,
            "bytes": out.stat().st_size, "seconds": seconds,
            "images_per_s": len(source.items) / max(seconds, 1e-9), "items": items}


def _screen(items: list[Item], screen: Any, desc: str, workers: int, strict: bool, quiet: bool
            ) -> tuple[list[Item], list[tuple[int, int]], Skipped]:
    """Run ``screen`` (:func:`probe_image` or :func:`check_image`) over ``items`` in parallel:
    the good items, their (width, height) and the report of the others. The count must be
    known before ffcv allocates the file."""
    good, sizes, skipped = [], [], Skipped()
    results = parallel_map(screen, (it.path for it in items), workers=workers, chunksize=32)
    bar = progress(len(items), desc, quiet)
    with contextlib.closing(results):
        for item, (reason, size) in zip(items, results):
            bar.update(1)
            if reason is None:
                good.append(item)
                sizes.append(size)
            elif strict:
                bar.close()
                raise BadFileError(item.path, reason)
            else:
                skipped.add(item.rel, reason)
    bar.close()
    return good, sizes, skipped


def _page_size(sizes: list[tuple[int, int]], max_resolution: int | None) -> int:
    """ffcv's page size for these images: a sample must fit in one page, the largest raw."""
    largest = max((min(1.0, max_resolution / max(w, h)) if max_resolution else 1.0) ** 2
                  * w * h * 3 for w, h in sizes)
    page_size = 4 * MIN_PAGE_SIZE
    while page_size < largest + 4096:
        page_size *= 2
    return page_size


def _write(out: Path, dataset: PreparedImages, fields: dict[str, Any], page_size: int,
           chunk_size: int, sidecars: dict[str, bytes]) -> None:
    """Write the .beton and its side files under temporary names, then rename them all.

    The side files (``sidecars``: suffix -> content, and the checksum record
    ``<name>.beton.json``) are renamed first and the .beton, which marks a finished
    conversion, last; a failure anywhere (a full disk) removes every temporary file and leaves
    an earlier conversion's files as they were.
    """
    from ffcv.writer import DatasetWriter

    from fastsiam.data.beton import make_checksum_record
    from fastsiam.files import atomic_path

    with contextlib.ExitStack() as outputs:  # leaving it renames in reverse order
        tmp = outputs.enter_context(atomic_path(out))
        writer = DatasetWriter(str(tmp), fields, page_size=page_size, num_workers=1)
        with _no_tqdm_monitor(), _stop_if_writer_dies(out, dataset, writer):
            _write_beton(writer, dataset, chunk_size)
        sidecars = {**sidecars, "beton.json": make_checksum_record(tmp, out.name, len(dataset))}
        temps = [tmp]
        for suffix, data in sidecars.items():
            temps.append(outputs.enter_context(atomic_path(side_file(out, suffix))))
            temps[-1].write_bytes(data)
        make_readable(temps)


def _stored_modes(path: Path) -> dict[str, int]:
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    reader = Reader(str(path))
    # The metadata's columns are the fields in order, unnamed (f0, f1, ...).
    column = reader.metadata.dtype.names[reader.field_names.index("image")]
    modes = reader.metadata[column]["mode"]
    return {name: int((modes == IMAGE_MODES[name]).sum()) for name in ("jpg", "raw")}


# ----------------------------------------------------------------------------- verification


def reference_crop(path: str, max_resolution: int | None, size: int) -> np.ndarray:
    """What ffcv's CenterCropRGBImageDecoder((size, size), ratio=1) should give for ``path``."""
    cv2 = _import_cv2()
    image = cv2.cvtColor(stored_pixels(path, max_resolution), cv2.COLOR_BGR2RGB)
    h, w = image.shape[:2]
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    return cv2.resize(np.ascontiguousarray(image[top:top + c, left:left + c]), (size, size),
                      interpolation=cv2.INTER_AREA)


def verify(out: str | os.PathLike[str], items: list[Item], *, max_resolution: int | None,
           samples: int = 64, workers: int = 1) -> dict[str, Any]:
    """Read ``out`` back with ffcv's stock Loader and compare with the input ``items``.

    Checks the sample count and every label, then decodes ``samples`` evenly spread images
    (center crop, ``VERIFY_SIZE`` px) and compares each with the same crop of its source:
    PSNR >= ``VERIFY_MIN_PSNR`` dB.
    """
    try:
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
        from ffcv.loader import Loader, OrderOption
    except ImportError:
        raise ConversionError(FFCV_HINT) from None
    out = str(out)
    loader = Loader(out, batch_size=256, num_workers=workers, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    pipelines={"image": None, "label": [IntDecoder()]})
    labels = [int(y) for (batch,) in loader for y in np.asarray(batch).reshape(-1)]
    expected = [it.label for it in items]
    if len(labels) != len(expected):
        raise ConversionError(f"verify: ffcv reads {len(labels)} samples from {out}, expected "
                              f"{len(expected)}")
    if labels != expected:
        first = next(i for i, (a, b) in enumerate(zip(labels, expected)) if a != b)
        raise ConversionError(f"verify: ffcv reads label {labels[first]} for sample {first} "
                              f"({items[first].rel}), expected {expected[first]}")
    wanted = verify_indices(len(items), samples)
    loader = Loader(out, batch_size=len(wanted), num_workers=workers, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    indices=wanted, pipelines={
                        "image": [CenterCropRGBImageDecoder((VERIFY_SIZE, VERIFY_SIZE), 1.0)],
                        "label": None})
    images = np.concatenate([np.asarray(batch) for (batch,) in loader])
    worst = float("inf")
    for got, i in zip(images, wanted):
        quality = psnr(got, reference_crop(items[i].path, max_resolution, VERIFY_SIZE))
        if quality < VERIFY_MIN_PSNR:
            raise ConversionError(f"verify: sample {i} ({items[i].rel}) differs from its source "
                                  f"(PSNR {quality:.1f} dB < {VERIFY_MIN_PSNR} dB)")
        worst = min(worst, quality)
    return {"samples": len(items), "images_checked": len(wanted), "min_psnr_db": worst}


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="to_ffcv.py", description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
        epilog="Defaults are ffcv-imagenet's ResNet-50 settings (max resolution 500, 50% "
               "JPEG at quality 90). Smaller --max-resolution and more JPEG shrink the file "
               "(raw pixels are ~10x a q90 JPEG) at the cost of softer small crops and a JPEG "
               "decode per view in the loader.")
    add_source_arguments(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="the .beton file (appears only when complete)")
    g.add_argument("--max-resolution", type=int, default=500,
                   help="longest side stored, in pixels (0: keep every image's size)")
    g.add_argument("--write-mode", choices=WRITE_MODES, default="proportion",
                   help="raw pixels, JPEG, smart (JPEG above --smart-threshold bytes) or a "
                        "random --compress-probability share as JPEG")
    g.add_argument("--compress-probability", type=float, default=0.5,
                   help="share of JPEG images in proportion mode")
    g.add_argument("--jpeg-quality", type=int, default=90, help="quality of stored JPEGs")
    g.add_argument("--smart-threshold", type=int, help="smart mode: JPEG-compress images whose "
                                                       "raw size exceeds this many bytes")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    g.add_argument("--chunk-size", type=int, default=100, help="samples per ffcv writer chunk")
    g.add_argument("--seed", type=int, default=0, help="seed of proportion mode's choices")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g.add_argument("--verify", action="store_true",
                   help="read the result back with ffcv's Loader and compare with the input")
    g.add_argument("--verify-samples", type=int, default=64,
                   help=f"images compared with their source (PSNR >= {VERIFY_MIN_PSNR} dB)")
    g.add_argument("--quiet", action="store_true", help="no progress bar for the header pass")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    max_resolution = args.max_resolution or None
    try:
        source = source_from_args(args)
        summary = convert(
            source, args.out, max_resolution=max_resolution, write_mode=args.write_mode,
            compress_probability=args.compress_probability, jpeg_quality=args.jpeg_quality,
            smart_threshold=args.smart_threshold, workers=args.workers, chunk_size=args.chunk_size,
            seed=args.seed, overwrite=args.overwrite, strict=args.strict, quiet=args.quiet)
        out = Path(args.out)
        print(f"wrote {summary['samples']} samples ({summary['stored']['jpg']} JPEG, "
              f"{summary['stored']['raw']} raw; {summary['bytes'] / 1e6:.1f} MB) to {out} in "
              f"{summary['seconds']:.1f} s ({summary['images_per_s']:.0f} images/s)")
        print(skipped_line(summary["skipped"], side_file(out, "skipped.tsv")))
        if args.verify:
            result = verify(out, summary["items"], max_resolution=max_resolution,
                            samples=args.verify_samples, workers=args.workers)
            print(f"verify: ok ({result['samples']} samples and labels via ffcv's Loader; "
                  f"{result['images_checked']} images, min PSNR {result['min_psnr_db']:.1f} dB "
                  f">= {VERIFY_MIN_PSNR} dB)")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
