"""Two-view loader throughput: every installed backend on the same images, side by side.

Each variant delivers SimSiam's two views of a batch on the device (uint8 crops, or the PIL
reference's augmented float views) and is timed in images/s (an image = both its views):

- ``pil_full``: the official SimSiam loader, full augmentation in PIL on worker processes
  (the baseline of the table);
- ``pil_crop``: the same loader with RandomResizedCrop only (uint8), apples to apples with
  the loaders below, whose flip and colour work happen on the device;
- ``ffcv_stock``: stock FFCV the usual way, two ``RandomResizedCropRGBImageDecoder`` pipelines
  on the image field (scale 0.2-1) plus ``RandomHorizontalFlip``: each JPEG decoded twice;
- ``ffcv``: fastsiam's FFCV backend (decode once, crop twice; flip on the device), handing
  out copies of FFCV's recycled buffers; ``ffcv_views``: the buffers themselves, as stock FFCV
  does (``copy=False``); both rows carry ``vs_ffcv_stock`` (goal: >= 2);
- ``dali_once`` / ``dali_twice``: DALI, one decode and two ROI resizes, or two ROI decodes
  (fastsiam's sampler and crops); ``dali_webdataset``: DALI's own reader and crops;
- ``nvjpeg``: torchvision's decoder (nvJPEG on a GPU, libjpeg-turbo threads on the CPU);
- ``synthetic``: random batches made on the device (the no-loader ceiling).

All read the same samples: photo-like JPEGs at ImageNet's size (``--style photo``, the
default: dead-leaves images of 340-500 px, ~0.18 MP and ~90 KB each, which decode as slowly as
photographs; data_prep/dead_leaves.py) or the toy ImageNet's flat shapes (``--style shapes``,
200-600 px), repeated by links to fill the epochs (benchmarks/_data.py), or ``--data``. The
.beton is all-JPEG at 256 px (``to_ffcv.py --write-mode jpg --max-resolution 256``) or, with
``--beton imagenet``, the README's ImageNet setting (``proportion``, 500 px); the shards keep
the original JPEGs (``to_dali.py``). Every variant uses ``--workers`` processes or threads.

Beside the loaders, each backend's ceiling is measured in the same run
(benchmarks/_ceilings.py): its per-image kernels alone (decode once + two crop-resizes) on one
thread, times ``--workers``; every loader row carries ``of_ceiling``, its share of it (on the
CPU: on a GPU the loaders decode there, and these CPU kernels bound nothing).

Variants run one after another: a warm-up (compilation, worker start-up, and the
batches prefetched meanwhile), then ``--repeats`` timed windows of ``--iters`` batches back to
back, so no window gets batches made while the loader idled; the loader is then closed.

A variant that fails is recorded with its error (``out of memory`` for a device OOM) and the
next one runs; the exit status is 1 if any failed. The JSON is written after every variant,
so a run stopped by a timeout keeps what it measured. ``--data`` with ``--shards`` reads data
prepared elsewhere (the GPU suite's data stage, ``end_to_end.py --prepare-only``) as it is.

    python benchmarks/loaders.py                        # all installed backends, photo-like data
    python benchmarks/loaders.py --style shapes         # the toy ImageNet's flat shapes
    python benchmarks/loaders.py --backends ffcv_stock,ffcv --workers 8 --batch-size 256
    python benchmarks/loaders.py --smoke                # tiny, one variant per code path (CI)
    python benchmarks/loaders.py --backends nvjpeg --data DIR/train --shards DIR/shards
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import _ceilings as ceilings  # noqa: E402
from benchmarks import _data  # noqa: E402
from benchmarks._harness import (  # noqa: E402
    BenchmarkReport,
    Measurement,
    error_message,
    measure,
)
from fastsiam.data import build_loader  # noqa: E402

# variant -> (library it needs, data format, loader backend or None, backend options)
VARIANTS: dict[str, tuple[str | None, str, str | None, dict[str, Any]]] = {
    "pil_full": (None, "imagefolder", "pil", {"augment": "full"}),
    "pil_crop": (None, "imagefolder", "pil", {"augment": "crop"}),
    "ffcv_stock": ("ffcv", "beton", None, {}),
    "ffcv": ("ffcv", "beton", "ffcv", {}),
    "ffcv_views": ("ffcv", "beton", "ffcv", {"copy": False}),
    "dali_once": ("nvidia.dali", "shards", "dali", {"decode": "once"}),
    "dali_twice": ("nvidia.dali", "shards", "dali", {"decode": "twice"}),
    "dali_webdataset": ("nvidia.dali", "shards", "dali", {"reader": "webdataset"}),
    "nvjpeg": (None, "shards", "nvjpeg", {}),
    "synthetic": (None, "none", "synthetic", {}),
}


SMOKE_VARIANTS = ("pil_full", "ffcv_stock", "ffcv", "dali_once", "nvjpeg", "synthetic")
# --beton: (what the result says, to_ffcv.convert's settings)
BETON_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "jpg256": ("to_ffcv.py --write-mode jpg --max-resolution 256",
               {"write_mode": "jpg", "max_resolution": 256}),
    "imagenet": ("to_ffcv.py defaults, the README's ImageNet setting (--write-mode proportion "
                 "--max-resolution 500)", {}),
}


def installed(library: str | None) -> bool:
    if library is None:
        return True
    try:
        return importlib.util.find_spec(library) is not None
    except ModuleNotFoundError:
        return False


def stock_ffcv(
    path: Path, *, batch_size: int, image_size: int, workers: int, device: torch.device, seed: int
) -> Any:
    """Stock FFCV's two views: two decoder pipelines on one field, flips on the CPU."""
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    def view() -> list[Any]:
        to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
        return [RandomHorizontalFlip(), ToTensor(), *to_device, ToTorchImage()]

    def decoder() -> Any:
        return RandomResizedCropRGBImageDecoder((image_size, image_size), scale=(0.2, 1.0))

    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    pipelines = {
        "image": PipelineSpec("image", decoder=decoder(), transforms=view()),
        "image2": PipelineSpec("image", decoder=decoder(), transforms=view()),
        "label": PipelineSpec("label", decoder=IntDecoder(), transforms=[ToTensor(), *to_device]),
    }
    return Loader(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.RANDOM,
        seed=seed,
        pipelines=pipelines,
        drop_last=True,
    )


def drain_count(name: str, workers: int) -> int:
    """Batches a variant prepares ahead of the consumer (consumed by the warm-up)."""
    backend = VARIANTS[name][2]
    return {
        "pil": 4 * max(workers, 1) + 1,
        "ffcv": 4,
        None: 4,
        "dali": 3,
        "nvjpeg": 5,
        "synthetic": 0,
    }[backend]


def endless(loader: Any, is_fastsiam: bool) -> Iterator[Any]:
    """Batches over consecutive epochs."""
    epoch = 0
    while True:
        if is_fastsiam:
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def prepare(
    args: argparse.Namespace, names: list[str], cache: Path
) -> tuple[dict[str, Path], dict]:
    formats = {VARIANTS[n][1] for n in names}
    need = args.batch_size * max(
        24, 2 * (args.iters + max(drain_count(n, args.workers) for n in names))
    )
    if args.shards is not None:  # prepared elsewhere: nothing to convert or repeat
        files = _data.list_images(args.data)
        if len(files) < need:
            raise SystemExit(
                f"loaders: {args.data} holds {len(files)} images, one epoch of this run needs "
                f"{need}; prepare more or lower --iters/--batch-size"
            )
        # A repeated toy folder holds links: count the images behind them.
        data = _data.BenchData(
            args.data, len(files), len({f.resolve() for f in files}), shards=args.shards
        )
        data.info = _data.describe(data)
    else:
        data = _data.prepare(
            cache,
            min_images=need,
            formats={"shards"} & formats,
            data=args.data,
            classes=args.classes,
            distinct=args.distinct,
            min_side=args.min_side,
            max_side=args.max_side,
            workers=args.workers,
            style=args.style,
        )
    paths = {"imagefolder": data.imagefolder, "none": data.imagefolder}
    if data.shards is not None:
        paths["shards"] = data.shards
    if "beton" in formats:
        from data_prep.listing import list_image_folder
        from data_prep.to_ffcv import convert

        beton = cache / f"{data.imagefolder.name}_{args.beton}.beton"
        if not beton.exists():
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                convert(
                    list_image_folder(data.imagefolder),
                    beton,
                    **BETON_SETTINGS[args.beton][1],
                    workers=max(1, args.workers),
                    quiet=True,
                )
        paths["beton"] = beton
    return paths, data.info | {"images_per_epoch": data.images}


def measure_variant(
    name: str, path: Path, args: argparse.Namespace, common: dict[str, Any]
) -> Measurement:
    """One variant's images/s: warm-up, timed windows back to back, then the loader closed."""
    _, _, backend, options = VARIANTS[name]
    if backend is None:
        loader = stock_ffcv(path, **common)
    else:
        loader = build_loader(backend, path, **common, **options)
    batches = endless(loader, backend is not None)
    try:
        # Warm-up: compilation and worker start-up, then the batches prefetched meanwhile;
        # the timed windows follow back to back, so the loader never idles ahead of them.
        for _ in range(drain_count(name, args.workers) + 2):
            next(batches)
        return measure(
            batches.__next__,
            items_per_call=args.batch_size,
            iters=args.iters,
            repeats=args.repeats,
            warmup=0,
            device=str(common["device"]),
        )
    finally:
        batches.close()  # stops the backend's workers/threads mid-epoch


def add_ceilings(report: BenchmarkReport, paths: dict[str, Path], args: argparse.Namespace) -> bool:
    """Measure the kernels-alone ceiling of each backend the rows used (one thread, times
    ``--workers``), add a row for it, and give each loader row its ``of_ceiling``; False if
    a ceiling failed (recorded as its row's error)."""
    wanted = {ceilings.KERNELS_OF[r["variant"]] for r in report.rows
              if ceilings.KERNELS_OF.get(r["variant"]) and "error" not in r}
    rates: dict[str, float] = {}
    ok = True
    for backend in sorted(wanted):
        fmt = ceilings.KERNELS[backend][0]
        try:
            jpegs = (ceilings.beton_images(paths["beton"], args.ceiling_images) if fmt == "beton"
                     else ceilings.file_jpegs(_data.list_images(paths["imagefolder"]),
                                              args.ceiling_images))
            m = ceilings.single_thread(backend, jpegs, args.image_size, args.repeats)
        except Exception as e:  # a ceiling that fails must not lose the loaders' rows
            report.add_error(f"ceiling: {backend}", error_message(e), workers=args.workers)
            print(f"ceiling: {backend}: failed: {report.rows[-1]['error']}", file=sys.stderr)
            ok = False
            continue
        w = args.workers
        scaled = Measurement(m.items_per_s * w, m.items_per_s_min * w, m.items_per_s_max * w,
                             m.seconds_per_call, m.repeats, m.iters, m.warmup,
                             [x * w for x in m.samples])
        report.add(f"ceiling: {backend}", scaled, workers=w, data_format=fmt,
                   single_thread_images_per_s=round(m.items_per_s, 1),
                   megapixels=ceilings.megapixels(jpegs))
        rates[backend] = scaled.items_per_s
        print(f"ceiling: {backend}: {scaled.items_per_s:.1f} images/s", file=sys.stderr)
    for r in report.rows:
        backend = ceilings.KERNELS_OF.get(r["variant"])
        if backend in rates and "error" not in r:
            r["of_ceiling"] = round(r["items_per_s"] / rates[backend], 3)
    return ok


def add_stock_ratios(report: BenchmarkReport) -> None:
    """``vs_ffcv_stock`` on the ffcv rows, once stock FFCV is measured (any order of rows)."""
    stock = next(
        (r for r in report.rows if r["variant"] == "ffcv_stock" and "error" not in r), None
    )
    for r in report.rows:
        if stock and r["variant"] in ("ffcv", "ffcv_views") and "error" not in r:
            r["vs_ffcv_stock"] = round(r["items_per_s"] / stock["items_per_s"], 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--backends",
        default="all",
        help=f"comma-separated variants (default: every installed one of {', '.join(VARIANTS)})",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--batch-size", type=int, default=None, help="default 256 on a GPU, 64 on the CPU"
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--iters", type=int, default=10, help="batches per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per variant")
    p.add_argument("--data", type=Path, help="an ImageFolder train folder instead of generated images")
    p.add_argument(
        "--shards",
        type=Path,
        help="tar shards of --data made already (to_dali.py, end_to_end.py --prepare-only): "
        "no conversion",
    )
    p.add_argument(
        "--data-cache", type=Path, help="keep the prepared data here (default: a temp dir)"
    )
    p.add_argument("--style", choices=list(_data.STYLE_SIDES), default="photo",
                   help="generated images: photo-like (dead leaves) or the toy's flat shapes")
    p.add_argument("--beton", choices=list(BETON_SETTINGS), default="jpg256",
                   help="how the .beton is written: jpg 256 px, or the README's ImageNet setting")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--distinct", type=int, default=300, help="distinct generated images")
    p.add_argument("--min-side", type=int, help="default 340 (photo), 200 (shapes)")
    p.add_argument("--max-side", type=int, help="default 500 (photo), 600 (shapes)")
    p.add_argument("--ceiling-images", type=int, default=128,
                   help="distinct images the kernels-alone ceilings run over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny data and settings; writes a result only with --out or $OUT",
    )
    p.add_argument("--out", help="folder for the JSON (default: $OUT, else benchmarks/results)")
    p.add_argument(
        "--note", help="free text stored with the result (e.g. how loaded the machine was)"
    )
    args = p.parse_args(argv)
    if args.shards is not None and (args.data is None or not args.shards.is_dir()):
        p.error("--shards needs --data (the images the shards hold) and an existing folder")
    device = torch.device(args.device)
    if args.smoke:
        args.batch_size = args.batch_size or 8
        args.image_size, args.iters, args.repeats = 64, 2, 1
        args.classes, args.distinct, args.min_side, args.max_side = 4, 32, 64, 160
        args.workers, args.ceiling_images = 1, 8
        if args.backends == "all":  # one variant per code path: CI checks the script, fast
            args.backends = ",".join(SMOKE_VARIANTS)
    args.batch_size = args.batch_size or (256 if device.type == "cuda" else 64)
    low, high = _data.STYLE_SIDES[args.style]
    args.min_side = args.min_side or low
    args.max_side = args.max_side or high
    wanted = list(VARIANTS) if args.backends == "all" else args.backends.split(",")
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; expected {', '.join(VARIANTS)}")
    names = [n for n in wanted if installed(VARIANTS[n][0])]
    skipped = [n for n in wanted if n not in names]
    if skipped:
        print(f"skipping {', '.join(skipped)}: library not installed", file=sys.stderr)

    out = args.out or os.environ.get("OUT")  # None: benchmarks/results
    keep = bool(out) or not args.smoke
    if not keep:
        print("smoke run: no result written (pass --out to keep it)")
    failed = False
    # One result file per kind of data and .beton, so the photo-like and shapes runs sit side by side.
    result_name = "loaders" if args.data else "_".join(
        ["loaders", args.style, *([] if args.beton == "jpg256" else [args.beton])])
    with contextlib.ExitStack() as stack:
        cache = args.data_cache or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="loaders-bench-"))
        )
        paths, data_info = prepare(args, names, cache)
        settings = {
            "batch_size": args.batch_size,
            "image_size": args.image_size,
            "workers": args.workers,
            "iters": args.iters,
            "repeats": args.repeats,
            "scale": [0.2, 1.0],
            "smoke": args.smoke,
            "data": str(args.data)
            if args.data
            else f"{_data.STYLE_NAMES[args.style]}, "
            f"{args.distinct} distinct images, {args.min_side}-{args.max_side} px",
            "beton": BETON_SETTINGS[args.beton][0],
            "shards": str(args.shards) if args.shards else "to_dali.py defaults (original JPEG bytes)",
            **data_info,
        }
        if args.note:
            settings["note"] = args.note
        report = BenchmarkReport(
            "loaders", str(device), settings, baseline="pil_full" if "pil_full" in names else None
        )
        common = dict(
            batch_size=args.batch_size,
            image_size=args.image_size,
            workers=args.workers,
            device=device,
            seed=args.seed,
        )
        for name in names:
            _, fmt, _, options = VARIANTS[name]
            extra: dict[str, Any] = {
                "workers": args.workers,
                "data_format": fmt,
                "options": options or None,
            }
            try:
                m = measure_variant(name, paths[fmt], args, common)
            except Exception as e:  # one variant failing must not lose the others
                report.add_error(name, error_message(e), **extra)
                failed = True
                print(f"{name}: failed: {report.rows[-1]['error']}", file=sys.stderr)
            else:
                report.add(name, m, **extra)
                print(f"{name}: {m.items_per_s:.1f} images/s", file=sys.stderr)
            gc.collect()  # the loader's buffers and a failed variant's state, before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
            add_stock_ratios(report)
            report.settings["load_average"] = round(os.getloadavg()[0], 2)
            if keep:
                path = report.write(out, result_name)
        if device.type == "cpu":  # the kernels measured are the CPU paths'
            failed |= not add_ceilings(report, paths, args)
            if keep:
                path = report.write(out, result_name)
    print(report.table())
    if keep and report.rows:
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
