"""Training-step throughput, from the official recipe to the captured step, in one run.

Each row adds one change to the previous row (all measured in the same process, on the same
synthetic device-resident uint8 batch, so the ratios are comparable):

1. ``reference``: fp32, NCHW, eager, plain ``torch.optim.SGD`` (the official recipe's step);
2. ``+channels_last``: NHWC weights and activations;
3. ``+bf16``: autocast to bfloat16;
4. ``+fused_optimizer``: fastsiam's SGD, torch's fused kernel (foreach on the CPU);
5. ``+cuda_graph``: the whole step captured once and replayed (CUDA only);
6. ``+augmentation``: the device-side SimSiam augmentation inside the step (inside the graph
   on CUDA), when :class:`fastsiam.augment.SimSiamAugment` is available;
7. ``+online_probe``: the trainer's default where the data has labels: a linear classifier
   over 1,000 classes trained in the same step on view 1's detached features
   (:mod:`fastsiam.probe`); its cost is this row against the previous one.

Rows 1-5 turn the uint8 views into normalized floats inside the step (a cheap stand-in for
augmentation). ``--concat`` adds an informational row: row 4 with both views through the
encoder as one concatenated batch (BatchNorm statistics shared by the views: *not* the
recipe, which runs one pass per view). Images/s counts images (two views each); TFLOP/s uses
49.3 GFLOP per image for ResNet-50 at 224 px and the counted conv/linear FLOPs otherwise.

A row that fails is recorded with its error (``out of memory`` when the device ran out, e.g.
the fp32 NCHW reference at 2 x 256 views on an 80 GB GPU), its memory is released and the
next row runs; the exit status is 1 if any row failed, 3 after a SIGTERM. The JSON is
written after every row, so a run stopped by a timeout keeps the rows it measured.
``--only`` measures the named rows in the order given (the file lists them in table order):
the GPU suite takes the headline first, into its own file (``--name``).

    python benchmarks/step.py                      # ResNet-50, 224 px, batch 256 on CUDA
    python benchmarks/step.py --smoke              # ResNet-18, 64 px, tiny batch (CI, CPU)
    python benchmarks/step.py --only +cuda_graph,+augmentation,reference --name step_headline
"""

from __future__ import annotations

import argparse
import gc
import math
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the benchmarks package

import torch
from torch import Tensor, nn

from benchmarks._harness import (
    FAKE_CUDA,
    BenchmarkReport,
    error_message,
    measure,
    peak_memory_mb,
    reset_peak_memory,
    traffic_by_function,
)
from fastsiam.config import IMAGENET_MEAN, IMAGENET_STD, AugConfig, OptimConfig
from fastsiam.data.batch import TwoViewBatch
from fastsiam.model import SimSiam, simsiam_loss
from fastsiam.optim import build_optimizer
from fastsiam.probe import OnlineProbe
from fastsiam.runtime import AMP_DTYPES, memory_format, scaled_lr
from fastsiam.step import build_step

RESNET50_224_GFLOP = 49.3  # per image: two views, forward + backward (the figure)
PROBE_CLASSES = 1000        # ImageNet's, for the +online_probe row


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool
    amp: str
    impl: str
    mode: str
    augment: str = "normalize"  # normalize | simsiam
    concat: bool = False
    probe: bool = False


def variants(device: torch.device, concat: bool) -> list[Variant]:
    ref = Variant("reference", channels_last=False, amp="none", impl="torch", mode="eager")
    cl = Variant("+channels_last", True, "none", "torch", "eager")
    bf16 = Variant("+bf16", True, "bf16", "torch", "eager")
    fused = Variant("+fused_optimizer", True, "bf16", "auto", "eager")
    rows = [ref, cl, bf16, fused]
    if concat:
        rows.append(Variant("(concat views, not the recipe)", True, "bf16", "auto", "eager",
                            concat=True))
    last = fused
    if device.type == "cuda":
        last = Variant("+cuda_graph", True, "bf16", "auto", "graph")
        rows.append(last)
    rows.append(Variant("+augmentation", True, "bf16", "auto", last.mode, augment="simsiam"))
    rows.append(Variant("+online_probe", True, "bf16", "auto", last.mode, augment="simsiam", probe=True))
    return rows


class Interrupted(BaseException):
    """SIGTERM (e.g. the GPU suite's stage timeout): record the row, write, stop."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted


def release_memory(device: torch.device) -> None:
    """Between rows: a failed row's model, optimizer and graph pool must not crowd the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def select(names: str | None, device: torch.device, concat: bool,
           ) -> tuple[list[Variant], dict[str, str]]:
    """The rows to measure, in order, and the wanted ones this device cannot run (why).

    ``names``: a comma list (``--only``; ValueError for an unknown one), None for every row.
    """
    every = [v.name for v in variants(torch.device("cuda"), concat=True)]
    here = {v.name: v for v in variants(device, concat=True)}
    if names is None:
        wanted = [v.name for v in variants(torch.device("cuda"), concat)]
    else:
        wanted = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
        unknown = [n for n in wanted if n not in every]
        if unknown or not wanted:
            raise ValueError(f"--only: unknown row(s) {', '.join(unknown) or '(none given)'}; "
                             f"expected some of {', '.join(every)}")
    return [here[n] for n in wanted if n in here], {n: "needs CUDA" for n in wanted if n not in here}


class Normalize:
    """uint8 views -> ImageNet-normalized floats of ``dtype`` (layout preserved)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)
        self.dtype = dtype

    def __call__(self, batch: TwoViewBatch) -> tuple[Tensor, Tensor]:
        x = ((batch.views.float() - self.mean) * self.inv_std).to(self.dtype)
        return x.chunk(2)  # type: ignore[return-value]


class ConcatSimSiam(nn.Module):
    """The same weights, both views through the encoder as one batch (shared BN statistics)."""

    def __init__(self, model: SimSiam):
        super().__init__()
        self.inner = model

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.inner
        z = m.projector(m.backbone(torch.cat([x1, x2])))
        p = m.predictor(z)
        p1, p2 = p.chunk(2)
        z1, z2 = z.detach().chunk(2)
        return p1, p2, z1, z2


def counted_gflop_per_image(arch: str, size: int, dim: int, pred_dim: int) -> float:
    """Conv/linear FLOPs of one forward + backward on two views, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = SimSiam(arch, dim, pred_dim)
        x1, x2 = torch.empty(2, 3, size, size), torch.empty(2, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        simsiam_loss(*model(x1, x2)).backward()
    return counter.get_total_flops() / 2 / 1e9


def load_augment(dtype: torch.dtype) -> Any | None:
    try:
        from fastsiam.augment import SimSiamAugment
    except ImportError:
        return None
    return SimSiamAugment.from_config(AugConfig(), out_dtype=dtype, channels_last=True)


def run_variant(v: Variant, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = SimSiam(args.arch, args.dim, args.pred_dim).to(device)
    optimizer = build_optimizer(model, OptimConfig(impl=v.impl), lr=scaled_lr(OptimConfig().lr, args.batch_size),
                                device=device)
    dtype = AMP_DTYPES[v.amp] or torch.float32
    augment = Normalize(device, dtype) if v.augment == "normalize" else load_augment(dtype)
    if augment is None:
        return {"skipped": "fastsiam.augment.SimSiamAugment is not available yet"}
    train_module = ConcatSimSiam(model) if v.concat else model
    probe = OnlineProbe(model.feat_dim, PROBE_CLASSES, device=device, lr=0.1) if v.probe else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU run's notices are expected
        step = build_step(train_module, optimizer, augment, device=device, amp=v.amp,
                          channels_last=v.channels_last, mode=v.mode, probe=probe)
    fmt = memory_format(v.channels_last)
    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (2 * args.batch_size, 3, args.image_size, args.image_size),
                          dtype=torch.uint8, generator=g).to(device).contiguous(memory_format=fmt)
    labels = torch.randint(0, PROBE_CLASSES, (args.batch_size,), generator=g).to(device)
    batch = TwoViewBatch(views, labels)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(str(device))
    last: list[Tensor] = []

    def one_step() -> None:
        last[:] = [step(batch).loss]  # a device tensor: no host sync inside the timing

    m = measure(one_step, items_per_call=args.batch_size, iters=args.iters, repeats=args.repeats,
                warmup=args.warmup, device=str(device))
    loss = float(last[0])
    if not math.isfinite(loss):
        raise RuntimeError(f"{v.name}: non-finite loss {loss}")
    extra = {**(probe_share(probe, model, args, device, m.seconds_per_call) if probe is not None else {}),
        "amp": v.amp, "channels_last": v.channels_last, "mode": step.mode,
        "optimizer": type(optimizer).__module__.split(".")[0] + "." + type(optimizer).__name__
        + (f"({optimizer.impl})" if hasattr(optimizer, "impl") else ""),
        "augment": v.augment, "final_loss": round(loss, 4),
        "peak_memory_mb": peak_memory_mb(str(device)),
        "tflops": m.items_per_s * args.gflop_per_image / 1000,
    }
    return {"measurement": m, **extra}


def probe_share(probe: OnlineProbe, model: SimSiam, args: argparse.Namespace, device: torch.device,
                step_seconds: float) -> dict[str, float]:
    """The probe's own work timed alone (its loss, backward and update on features of the
    step's shape), and its share of the step it rides in: steadier than the difference of two
    step rows, which is within their run-to-run noise."""
    feats = torch.randn(args.batch_size, model.feat_dim, device=device)
    labels = torch.randint(0, PROBE_CLASSES, (args.batch_size,), device=device)

    def update() -> None:
        probe.zero_grad()
        probe.loss(feats, labels).backward()
        probe.step()

    alone = measure(update, items_per_call=args.batch_size, iters=args.iters * 5, repeats=args.repeats,
                    warmup=args.warmup, device=str(device))
    return {"probe_ms": alone.seconds_per_call * 1e3, "probe_share": alone.seconds_per_call / step_seconds}


#: The model's own heavy ops: what the rest of the step's traffic is compared with.
MODEL_HEAVY = ("aten.convolution", "aten.convolution_backward", "aten.mm", "aten.addmm")


def count(args: argparse.Namespace, bandwidth: float) -> BenchmarkReport:
    """Kernels and device bytes of the captured step (the ``+online_probe`` row, the trainer's
    default: bf16, channels_last, fused SGD, the device augmentation and the online probe
    inside the graph), counted on fake CUDA.

    Rows: the whole captured region, the model's convolutions and GEMMs (forward and backward),
    everything else (augmentation, BatchNorm, activations, loss, optimizer: the traffic this
    project controls), then per function that launched it (``step.py:_run`` is the backward).
    """
    from fastsiam.testing.fake_cuda import CAPTURE, fake_cuda

    with fake_cuda(callers=True) as trace:
        model = SimSiam(args.arch, args.dim, args.pred_dim).to("cuda", memory_format=torch.channels_last)
        optimizer = build_optimizer(model, OptimConfig(impl="fused"), lr=scaled_lr(OptimConfig().lr, args.batch_size),
                                    device="cuda")
        probe = OnlineProbe(model.feat_dim, PROBE_CLASSES, device="cuda", lr=0.1)
        step = build_step(model, optimizer, load_augment(torch.bfloat16), device="cuda", amp="bf16",
                          mode="graph", probe=probe)
        views = torch.empty((2 * args.batch_size, 3, args.image_size, args.image_size),
                            dtype=torch.uint8, device="cuda", memory_format=torch.channels_last)
        step(TwoViewBatch(views, torch.zeros(args.batch_size, dtype=torch.long, device="cuda")))
    trace.assert_clean(CAPTURE)
    ops = trace.select(CAPTURE, "kernel")
    def is_heavy(op: Any) -> bool:  # the blur's depthwise convolutions are augmentation, the probe's GEMM its own
        where = op.where or ""
        return op.name.rsplit(".", 1)[0] in MODEL_HEAVY and "augment" not in where and "probe.py" not in where

    heavy = [op for op in ops if is_heavy(op)]
    rest = [op for op in ops if not is_heavy(op)]
    settings = {"arch": args.arch, "batch_size": args.batch_size, "resolution": args.image_size,
                "amp": "bf16", "optimizer": "fused SGD", "mode": "graph", "online_probe_classes": PROBE_CLASSES,
                "bandwidth_GBps": bandwidth / 1e9,
                "fused_sgd": "no fake kernel: counted as one kernel reading and writing its tensors"}
    report = BenchmarkReport("step_count", FAKE_CUDA, settings)
    for name, group in (("captured step", ops), ("model convolutions and GEMMs", heavy),
                        ("everything else", rest)):
        report.add_count(name, len(group), sum(op.nbytes for op in group), bandwidth)
    for name, (kernels, nbytes) in traffic_by_function(rest).items():
        report.add_count(f"else in {name}", kernels, nbytes, bandwidth)
    return report


def record_row(v: Variant, args: argparse.Namespace, device: torch.device,
               report: BenchmarkReport) -> bool:
    """Measure ``v`` into ``report`` (a row, a failed row or a skip); False if it failed."""
    try:
        result = run_variant(v, args, device)
    except Exception as e:  # one row failing (out of memory...) must not lose the others
        report.add_error(v.name, error_message(e))
        print(f"{v.name}: failed: {report.rows[-1]['error']}", file=sys.stderr)
        return False
    finally:
        release_memory(device)
    if "skipped" in result:
        report.settings["skipped"][v.name] = result["skipped"]
        print(f"{v.name}: skipped ({result['skipped']})", file=sys.stderr)
    else:
        row = report.add(v.name, result.pop("measurement"), **result)
        print(f"{v.name}: {row['items_per_s']:.1f} images/s", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--arch", default=None, help="resnet50 (default), resnet18, resnet34")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (64 with --smoke)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 256)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--pred-dim", type=int, default=512)
    p.add_argument("--iters", type=int, default=None, help="steps per timed repeat (default 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    p.add_argument("--concat", action="store_true", help="also time one concatenated pass")
    p.add_argument("--only", default=None, help="comma list of rows to measure, in this order "
                   "(default: all), e.g. +cuda_graph,+augmentation,reference")
    p.add_argument("--smoke", action="store_true",
                   help="small settings for CI/CPU: resnet18, 64 px, batch 8, 2 iters")
    p.add_argument("--name", default="step", help="result file name stem (default step)")
    p.add_argument("--out", default=None, help="results directory ($OUT or benchmarks/results)")
    p.add_argument("--note", default=None, help="a remark stored with the results (machine load...)")
    p.add_argument("--count", action="store_true",
                   help="count kernels and device bytes of the captured step on fake CUDA (no GPU "
                        "needed) instead of timing; writes step_count-fakecuda.json")
    p.add_argument("--bandwidth", type=float, default=3.35e12,
                   help="device bytes/s for --count's implied time (default: H100 SXM, 3.35 TB/s)")
    args = p.parse_args(argv)
    smoke = dict(arch="resnet18", image_size=64, batch_size=8, iters=2, warmup=1)
    full = dict(arch="resnet50", image_size=224, batch_size=256, iters=20, warmup=5)
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    if args.count:
        report = count(args, args.bandwidth)
        print(report.table())
        print(f"wrote {report.write(args.out)}")
        return 0
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    try:
        plan, skipped = select(args.only, device, args.concat)
    except ValueError as e:
        p.error(str(e))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every row: the step is what is compared
    counted = counted_gflop_per_image(args.arch, args.image_size, args.dim, args.pred_dim)
    nominal = args.arch == "resnet50" and args.image_size == 224 and args.dim == 2048
    args.gflop_per_image = RESNET50_224_GFLOP if nominal else round(counted, 3)
    settings = {
        "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
        "dim": args.dim, "pred_dim": args.pred_dim, "gflop_per_image": args.gflop_per_image,
        "gflop_per_image_counted": round(counted, 3), "torch_threads": torch.get_num_threads(),
        "input": "synthetic uint8 views on the device",
        **({"note": args.note} if args.note else {}),
    }
    report = BenchmarkReport("step", str(device), settings, baseline="reference")
    report.settings["skipped"] = skipped
    order = [v.name for v in variants(torch.device("cuda"), concat=True)]

    def write() -> str:
        report.rows.sort(key=lambda r: order.index(r["variant"]))  # table order
        return str(report.write(args.out, name=args.name))

    status, running, path = 0, None, None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for v in plan:
            running = v.name
            if not record_row(v, args, device, report):
                status = 1
            running = None
            path = write()
    except Interrupted:
        if running is not None and running not in {r["variant"] for r in report.rows}:
            report.add_error(running, "interrupted by SIGTERM")
        report.settings["interrupted"] = f"SIGTERM during {running or 'a write'}"
        print("step: interrupted, writing what was measured", file=sys.stderr)
        status, path = 3, write()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.table())
    print(f"wrote {path}" if path else "nothing to write")
    return status


if __name__ == "__main__":
    sys.exit(main())
