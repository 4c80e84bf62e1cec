"""Throughput of the device-side SimSiam augmentation (fastsiam.augment.SimSiamAugment).

On a GPU: milliseconds per batch of 2 x B views (default 2 x 256 at 224 px) for the whole
module, eagerly and replayed as a CUDA graph (the way the training step runs it), and the
share of each stage. The goal is <= 5% of a training step at the same batch (about 3.5 ms on
an H100 at 3,600 images/s). Beside the default (the fused colour kernels of
fastsiam.augment.fused) the same rows for the plain torch ops (``fused_color=False``), and with
--compile (default on cuda) for ``SimSiamAugment(compile=True)``. ``--count`` counts kernels and
bytes of both on fake CUDA instead (no GPU needed), and of the step before it on a GPU, the
nvjpeg backend's crop-resize of the batch (crop_resize_count-fakecuda.json).

On the CPU: views/s of the same module next to the official recipe's PIL colour pipeline
(ColorJitter p=0.8, RandomGrayscale p=0.2, PIL GaussianBlur p=0.5, flip, ToTensor, Normalize)
on the same uint8 crops, one thread each (per core). For the record only: PIL's uint8 C
kernels beat float tensor ops on a CPU; the CPU path exists for tests, not speed.

    python benchmarks/augment.py                 # cuda when available, else cpu
    python benchmarks/augment.py --smoke         # a few seconds, for CI
    python benchmarks/augment.py --device cpu --batch 16 --note "contended"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._data import imagenet_crop_batch
from benchmarks._harness import FAKE_CUDA, BenchmarkReport, measure, traffic_by_function
from fastsiam.augment import SimSiamAugment
from fastsiam.data import TwoViewBatch


def synthetic_crops(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 crops ``[n, 3, size, size]`` with smooth, image-like content (upsampled noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(2, size // 8), max(2, size // 8), generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return img.mul(255).round().to(torch.uint8)


def stages(aug: SimSiamAugment, batch: TwoViewBatch) -> dict[str, Callable[[], Any]]:
    """The module's steps, each on a prepared input, in pipeline order."""
    views = batch.views
    device = views.device
    p = aug.sample_params(views.shape[0], device)
    x = aug._to_planar(views, p)
    consts = aug._constants(device)
    plain = {"flip_to_float": lambda: aug._to_planar(views, p), "color_jitter": lambda: aug._color_jitter(x, p)}
    if aug._use_fused(views):  # what the module runs instead of those two
        plain = {"fused_flip_to_float_and_jitter": lambda: aug._fused_planar(views, p)}
    return {
        "sample_params": lambda: aug.sample_params(views.shape[0], device),
        **plain,
        "jitter_and_blur": lambda: aug._jitter_and_blur(views, p),
        "whole_pipeline": lambda: aug._pipeline(views, p, consts),
    }


def count(batch_size: int, size: int, out_dtype: torch.dtype, bandwidth: float,
          fused_color: bool = True) -> BenchmarkReport:
    """Kernels and device bytes of one call, counted on fake CUDA tensors, per function.

    The traffic model (fastsiam.testing.fake_cuda): every CUDA operand of every non-view op is
    read once in full and every result written once, no caches and no fusion, so the time at
    ``bandwidth`` is what a memory-bound GPU would need, a floor for eager mode.
    """
    from fastsiam.testing.fake_cuda import fake_cuda

    with fake_cuda(callers=True) as trace:
        aug = SimSiamAugment(out_dtype=out_dtype, fused_color=fused_color)
        views = torch.empty((2 * batch_size, 3, size, size), dtype=torch.uint8, device="cuda",
                            memory_format=torch.channels_last)
        batch = TwoViewBatch(views, torch.empty(batch_size, dtype=torch.long, device="cuda"))
        aug(batch)  # the first call builds the constants on the device
        with trace.region("call"):
            aug(batch)
    trace.assert_clean("call")
    ops = trace.select("call", "kernel")
    floor = views.numel() * (1 + torch.finfo(out_dtype).bits // 8)  # read uint8 once, write once
    settings = {"batch_per_view": batch_size, "views_per_call": 2 * batch_size, "resolution": size,
                "out_dtype": str(out_dtype).replace("torch.", ""), "bandwidth_GBps": bandwidth / 1e9,
                "floor_bytes": floor, "fused_color": fused_color, "compute_dtype": str(aug._working_dtype(views.device)).replace("torch.", "")}
    report = BenchmarkReport("augment_count", FAKE_CUDA, settings)
    report.add_count("simsiam_augment (one call)", len(ops), sum(op.nbytes for op in ops), bandwidth)
    for name, (kernels, nbytes) in traffic_by_function(ops).items():
        report.add_count(f"in {name}", kernels, nbytes, bandwidth)
    return report


def count_crop_resize(images_per_batch: int, size: int, bandwidth: float) -> BenchmarkReport:
    """The nvjpeg backend's device crop-resize of one batch (two crops per ImageNet-sized image),
    counted like :func:`count`: the kernel of fastsiam.data.resample_kernel (the default on a
    GPU) and the batched torch ops of fastsiam.data.resample (its fallback), against the output's
    bytes. The kernel's row is pessimistic: its images are counted whole (it reads only the
    crops) and its output as read and written (an out argument; it only writes it)."""
    from fastsiam.data.resample import crop_resize
    from fastsiam.data.resample_kernel import crop_resize_kernel
    from fastsiam.testing.fake_cuda import fake_cuda

    sizes, source, boxes = imagenet_crop_batch(images_per_batch, size)
    output = len(boxes) * size * size * 3
    settings = {"images_per_batch": images_per_batch, "crops": len(boxes), "resolution": size,
                "image_sizes": "ImageNet's commonest (long side 500)", "crop_scale": "0.2-1",
                "image_bytes": sum(3 * h * w for h, w in sizes), "output_bytes": output,
                "bandwidth_GBps": bandwidth / 1e9}
    report = BenchmarkReport("crop_resize_count", FAKE_CUDA, settings)
    for name, resize in (("crop_resize_kernel (resize: kernel, the GPU default)", crop_resize_kernel),
                         ("crop_resize (resize: batched, the fallback)", crop_resize)):
        with fake_cuda() as trace:
            images = [torch.empty((3, h, w), dtype=torch.uint8, device="cuda") for h, w in sizes]
            with trace.region("call"):
                resize(images, source, boxes, size)
        ops = trace.select("call", "kernel")
        nbytes = trace.nbytes("call")
        report.add_count(name, len(ops), nbytes, bandwidth, times_output=nbytes / output)
    return report


def graphed(aug: SimSiamAugment, batch: TwoViewBatch) -> Callable[[], Any]:
    """The module captured once as a CUDA graph; each replay draws new parameters."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            aug(batch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        aug(batch)
    return graph.replay


def pil_colour_pipeline(crops: torch.Tensor) -> Callable[[], Any]:
    """The official recipe's steps after RandomResizedCrop, per image in PIL (pil_loader's)."""
    from torchvision import transforms

    from fastsiam.config import IMAGENET_MEAN, IMAGENET_STD
    from fastsiam.data.pil_loader import RandomGaussianBlurPIL

    tf = transforms.Compose([
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([RandomGaussianBlurPIL((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    pil = [transforms.functional.to_pil_image(c) for c in crops]
    return lambda: [tf(im) for im in pil]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per view (default: 256 on cuda, 16 on cpu)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: per core, like the PIL row)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, no JSON unless --out")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time SimSiamAugment(compile=True) (default: on for cuda, off for cpu)")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    ap.add_argument("--note", default=None, help="recorded in the settings (e.g. 'contended')")
    ap.add_argument("--count", action="store_true",
                    help="count kernels and device bytes of one call on fake CUDA (no GPU needed) "
                         "instead of timing; writes augment_count- and crop_resize_count-fakecuda.json")
    ap.add_argument("--bandwidth", type=float, default=3.35e12,
                    help="device bytes/s for --count's implied time (default: H100 SXM, 3.35 TB/s)")
    ap.add_argument("--out", default=None, help="directory for the JSON ($OUT or benchmarks/results)")
    args = ap.parse_args(argv)

    if args.count:
        shape = (args.batch or (4 if args.smoke else 256), 64 if args.smoke else args.size,
                 getattr(torch, args.out_dtype), args.bandwidth)
        report = count(*shape)
        plain_row = count(*shape, fused_color=False).rows[0]  # the baseline, same count
        report.add_count("plain torch ops, one call (aug.fused_color: false)", plain_row["kernels"],
                         plain_row["device_bytes"], args.bandwidth)
        resize = count_crop_resize(shape[0], shape[1], args.bandwidth)
        for r in (report, resize):
            print(r.table())
            if not args.smoke or args.out:
                print(f"wrote {r.write(args.out)}")
        return
    device = args.device
    cuda = device.startswith("cuda")
    if args.compile is None:
        args.compile = cuda and not args.smoke
    if not cuda:
        torch.set_num_threads(args.threads)
    size = 64 if args.smoke else args.size
    batch_size = args.batch or (4 if args.smoke else 256 if cuda else 16)
    iters = args.iters or (1 if args.smoke else 20 if cuda else 2)
    repeats = args.repeats or (1 if args.smoke else 5 if cuda else 3)
    warmup = 1 if args.smoke else 3 if cuda else 1
    views = 2 * batch_size

    crops = synthetic_crops(views, size, seed=0)
    batch = TwoViewBatch(crops, torch.zeros(batch_size, dtype=torch.int64))
    batch = batch.to(device)
    aug = SimSiamAugment(out_dtype=getattr(torch, args.out_dtype))  # the SimSiam recipe

    settings = {"batch_per_view": batch_size, "views_per_call": views, "resolution": size,
                "out_dtype": args.out_dtype, "blur_kernel_size": aug.blur_kernel_size}
    if not cuda:
        settings["threads"] = args.threads
    if args.note:
        settings["note"] = args.note
    report = BenchmarkReport("augment", device, settings, baseline=None if cuda else "pil_colour_pipeline")
    timing = dict(items_per_call=views, iters=iters, repeats=repeats, warmup=warmup, device=device)

    errors: list[str] = []

    def add(name: str, make: Callable[[], Callable[[], Any]], **extra: Any) -> float | None:
        try:  # one variant failing (e.g. torch.compile on an odd setup) must not lose the rest
            m = measure(make(), **timing)
        except Exception as e:  # recorded in the JSON and printed
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return None
        report.add(name, m, ms_per_batch=m.seconds_per_call * 1e3, **extra)
        return m.seconds_per_call

    total = add("simsiam_augment", lambda: lambda: aug(batch))
    if cuda:
        add("simsiam_augment_cuda_graph", lambda: graphed(aug, batch))
        plain = SimSiamAugment(out_dtype=aug.out_dtype, fused_color=False)
        add("simsiam_augment_plain_ops", lambda: lambda: plain(batch))
        add("simsiam_augment_plain_ops_cuda_graph", lambda: graphed(plain, batch))
    else:
        add("pil_colour_pipeline", lambda: pil_colour_pipeline(crops))
    if args.compile:
        compiled = SimSiamAugment(out_dtype=aug.out_dtype, compile=True)
        add("simsiam_augment_compiled", lambda: lambda: compiled(batch))
        if cuda:
            add("simsiam_augment_compiled_cuda_graph", lambda: graphed(compiled, batch))
    if not args.no_stages and total:
        for name, fn in stages(aug, batch).items():
            m = measure(fn, **timing)
            report.add(f"stage {name}", m, ms_per_batch=m.seconds_per_call * 1e3,
                       share=m.seconds_per_call / total)

    if errors:
        report.settings["errors"] = errors
        print("\n".join(f"failed: {e}" for e in errors), file=sys.stderr)
    print(report.table())
    if not args.smoke or args.out:
        print(f"wrote {report.write(args.out)}")


if __name__ == "__main__":
    main()
