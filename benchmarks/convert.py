"""Offline converter throughput: to_dali.py and to_ffcv.py against a plain parallel decode.

Checking every image for corruption costs one full decode, so the yardstick is a plain
parallel decode of the same files with the same number of worker processes (the same pool,
the same chunking). For each worker count it times, end to end (listing, checking, encoding,
writing, manifest):

- ``decode wN``: read + full PIL decode of every file, nothing written (the yardstick);
- ``to_dali wN``: ``data_prep/to_dali.py`` without re-encoding (original JPEG bytes kept);
- ``to_ffcv wN``: ``data_prep/to_ffcv.py`` with its defaults (500 px, 50% JPEG at q90);
- ``ffcv_stock wN``: for reference, ffcv-imagenet's way: ffcv's DatasetWriter with N worker
  processes on PIL-decoded images, same field settings (no check pass, no bad-file handling,
  page layout and ``proportion`` choices differ from run to run).

Goals: ``to_dali`` >= 0.8x ``decode`` at the same worker count; each converter >= 1.7x from
1 to 2 workers on a 2-core machine. Variants run round-robin (one conversion each per round)
so that load from other jobs hits all of them alike. Rows carry ``mb_per_s`` (source bytes),
``vs_decode`` and ``scaling`` (medians of per-round ratios to decode at the same worker count
and to the smallest worker count) and ``cpu_ms_per_image`` (CPU time of the whole process
tree, robust to other load). The load average before and after is recorded.

    python benchmarks/convert.py                       # photo-like JPEGs, 3,000, 340-500 px
    python benchmarks/convert.py --style shapes        # the toy ImageNet's flat shapes, 200-600 px
    python benchmarks/convert.py --src /data/imagenet/train --limit 50 --workers 1 2 4 8
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._data import STYLE_NAMES, STYLE_SIDES, make_toy, repeat_folder
from benchmarks._harness import BenchmarkReport, Measurement, measure
from data_prep import to_dali, to_ffcv
from data_prep.images import decode_image, read_file
from data_prep.listing import list_image_folder
from data_prep.parallel import parallel_map


def decode_only(path: str) -> int:
    """The yardstick's unit of work: read and fully decode one file."""
    return decode_image(read_file(path)).width


class _PilImages:
    """What ffcv-imagenet feeds ffcv's DatasetWriter: (RGB array, label) via PIL."""

    def __init__(self, items: list[Any]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import numpy as np
        from PIL import Image

        with Image.open(self.items[i].path) as im:
            return np.asarray(im.convert("RGB")), self.items[i].label


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers, ffcv's writer):
    unlike wall time, barely affected by other jobs on the machine."""
    import multiprocessing
    import resource

    multiprocessing.active_children()  # reaps finished children so that they are counted
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _quietly(fn: Any, *args: Any) -> int:
    # The converters print a summary and ffcv's writer a progress bar; keep the table readable.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = fn(*args)
    if rc != 0:
        raise RuntimeError(f"{fn.__module__} failed: {err.getvalue().strip()}")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", help="an ImageFolder to convert (default: generated images)")
    parser.add_argument("--style", choices=list(STYLE_SIDES), default="photo",
                        help="generated images: photo-like (dead leaves) or the toy's flat shapes")
    parser.add_argument("--limit", type=int, help="first N images per class of --src")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10, help="toy dataset: classes")
    parser.add_argument("--per-class", type=int, default=50, help="toy dataset: images per class")
    parser.add_argument("--copies", type=int, default=6,
                        help="toy dataset: links to each painted image (a run long enough that "
                             "start-up costs, ~0.4 s per conversion, do not dominate)")
    parser.add_argument("--out-dir", help="where to write the JSON (default benchmarks/results)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        tmp = Path(tmp)
        if args.src:
            src, dataset = Path(args.src), str(args.src)
        else:
            low, high = STYLE_SIDES[args.style]
            painted = make_toy(tmp, classes=args.classes, distinct=args.classes * args.per_class,
                               min_side=low, max_side=high, workers=max(args.workers),
                               style=args.style)
            src = repeat_folder(painted, tmp / "links", args.copies)
            dataset = (f"{STYLE_NAMES[args.style]}, {args.classes} x {args.per_class} painted "
                       f"images x {args.copies} links each, {low}-{high} px")
        limit = ["--limit", str(args.limit)] if args.limit else []
        paths = [it.path for it in list_image_folder(src, limit=args.limit).items]
        source_mb = sum(os.path.getsize(p) for p in paths) / 1e6
        load_before = os.getloadavg()
        # One result file per kind of generated data, so photo-like and shapes sit side by side.
        result_name = "convert" if args.src else f"convert_{args.style}"
        report = BenchmarkReport("convert", "cpu", {
            "dataset": dataset, "images": len(paths), "source_mb": round(source_mb, 1),
            "workers": args.workers, "repeats": args.repeats,
            "ffcv_options": "defaults: --max-resolution 500 --write-mode proportion "
                            "--compress-probability 0.5 --jpeg-quality 90",
            "dali_options": "--shard-size 2000 (no re-encoding)",
        }, baseline=f"decode w{args.workers[0]}")

        def run_decode(w: int) -> None:
            for _ in parallel_map(decode_only, paths, workers=w, chunksize=32):  # as to_dali
                pass

        def run_dali(w: int) -> None:
            _quietly(to_dali.main, ["--src", str(src), "--out", str(tmp / "shards"), *limit,
                                    "--workers", str(w), "--overwrite", "--quiet"])

        def run_ffcv(w: int) -> None:
            _quietly(to_ffcv.main, ["--src", str(src), "--out", str(tmp / "train.beton"), *limit,
                                    "--workers", str(w), "--overwrite", "--quiet"])

        items = list_image_folder(src, limit=args.limit).items

        def run_ffcv_stock(w: int) -> None:
            from ffcv.fields import IntField, RGBImageField
            from ffcv.writer import DatasetWriter

            field = RGBImageField(write_mode="proportion", max_resolution=500, jpeg_quality=90,
                                  compress_probability=0.5)
            writer = DatasetWriter(str(tmp / "stock.beton"), {"image": field, "label": IntField()},
                                   num_workers=w)
            # tqdm's monitor thread, which ffcv's bar would start, outlives the run and makes every
            # later worker pool in this process spawn instead of fork (data_prep.parallel.start_method).
            with contextlib.redirect_stderr(io.StringIO()), to_ffcv._no_tqdm_monitor():
                writer.from_indexed_dataset(_PilImages(items), chunksize=100)

        variants = [(f"{name} w{w}", name, w, fn) for name, fn in
                    (("decode", run_decode), ("to_dali", run_dali), ("to_ffcv", run_ffcv),
                     ("ffcv_stock", run_ffcv_stock))
                    for w in args.workers]
        # Round-robin over variants, one timed conversion each per round, so that load from
        # other jobs hits every variant alike; ratios are taken within a round.
        samples: dict[str, list[float]] = {v[0]: [] for v in variants}
        cpu: dict[str, list[float]] = {v[0]: [] for v in variants}
        for round_ in range(args.repeats):
            for label, _, w, fn in variants:
                before = _cpu_seconds()
                m = measure(lambda fn=fn, w=w: fn(w), items_per_call=len(paths), iters=1,
                            repeats=1, warmup=1 if round_ == 0 else 0)
                cpu[label].append((_cpu_seconds() - before) / (2 if round_ == 0 else 1))
                samples[label].append(m.items_per_s)
                print(f"round {round_ + 1}: {label} {m.items_per_s:.1f} images/s", file=sys.stderr)
        first = args.workers[0]
        for label, name, w, _ in variants:
            rates = samples[label]
            m = Measurement(statistics.median(rates), min(rates), max(rates),
                            statistics.mean(len(paths) / r for r in rates), len(rates), 1, 1, rates)

            def ratio(to: str, rates: list[float] = rates) -> float:
                return round(statistics.median(r / b for r, b in zip(rates, samples[to])), 3)

            extra: dict[str, Any] = {
                "workers": w, "mb_per_s": round(source_mb * m.items_per_s / len(paths), 2),
                "cpu_ms_per_image": round(1000 * statistics.median(cpu[label]) / len(paths), 3),
                "scaling": ratio(f"{name} w{first}")}
            if name != "decode":
                extra["vs_decode"] = ratio(f"decode w{w}")
            report.add(label, m, **extra)
        report.settings["load_average_before_after"] = [round(x, 2) for x in (*load_before[:1], os.getloadavg()[0])]
        print(report.table())
        print(f"wrote {report.write(args.out_dir, result_name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
