"""End-to-end training throughput: ``fastsiam train``'s own code path, loader x step variant.

Every combination runs :class:`fastsiam.trainer.Trainer` itself (``train.max_steps``,
``train.log_every`` = one timing window) and reads the images/s and data-wait fraction the
trainer logs per window in ``metrics.jsonl``; the first ``--warmup-windows`` windows (loader
start-up, cudnn autotuning, CUDA-graph capture) are dropped. The two ceilings are measured in
the same run, from the same pieces:

- *step alone*: the trainer's own step (built by ``Trainer``: augmentation, step variant,
  optimizer, LR schedule) replayed on one device-resident batch, uint8 views as the fast
  loaders deliver them, or float32 views for ``pil_full``, which augments on the CPU;
- *loader alone*: the trainer's loader (``build_loader_from_config`` with the same config)
  iterated with no model.

Each combination's row says which ceiling bounds it (the lower one), the share of that
ceiling it reaches, and the overlap of loading and stepping: (t_loader + t_step - t_e2e) /
min(t_loader, t_step) per image: 1 when one fully hides the other, 0 when they run in series
(on a 2-core machine they share the cores, so below 1 is expected); left out when one time
is under a tenth of the other (the synthetic loader), where it would only amplify noise.

Loader backends (those not installed are skipped with the reason): ``pil_full`` (the official
recipe's loader), ``pil_crop`` (PIL crops only, augmentation on the device), ``ffcv``,
``dali``, ``nvjpeg``, ``synthetic`` (device-generated, no input cost). Step variants:
``reference`` (the official recipe: fp32, NCHW, eager, torch.optim.SGD) and ``fast``
(bf16, channels_last, fused SGD, CUDA graph on CUDA). The official recipe, ``pil_full +
reference``, is always a row and the baseline of the ratios.

    python benchmarks/end_to_end.py                     # CUDA: ResNet-50, 224 px, batch 256
    python benchmarks/end_to_end.py --device cpu        # ResNet-18, 64 px (the toy demo config)
    python benchmarks/end_to_end.py --smoke --out /tmp  # seconds, for CI
    python benchmarks/end_to_end.py --backends nvjpeg,synthetic --variants fast

Data: the toy ImageNet (ImageNet-like image sizes), repeated so that one epoch holds the
timed steps, converted to a .beton and tar shards as the backends need (benchmarks/_data.py);
``--data-cache DIR`` keeps them between runs, ``--data DIR`` uses an ImageFolder train folder.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import importlib.util
import io
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import _data  # noqa: E402
from benchmarks._harness import (  # noqa: E402
    BenchmarkReport,
    Measurement,
    measure,
    peak_memory_mb,
    reset_peak_memory,
    summarize,
)
from fastsiam.augment import DRAW_COLUMNS  # noqa: E402
from fastsiam.config import AugConfig, Config, load_config  # noqa: E402
from fastsiam.data import TwoViewBatch, build_loader_from_config  # noqa: E402
from fastsiam.run_log import read_metrics  # noqa: E402
from fastsiam.trainer import Trainer  # noqa: E402


@dataclass(frozen=True)
class Backend:
    backend: str                 # the registered loader backend
    options: dict[str, Any]      # data.options
    fmt: str | None              # the data format it reads (benchmarks/_data.py)
    needs: str | None            # a module that must be importable
    float_views: bool = False    # delivers augmented float32 views (no device augmentation)


BACKENDS = {
    "pil_full": Backend("pil", {"augment": "full"}, "imagefolder", None, float_views=True),
    "pil_crop": Backend("pil", {"augment": "crop"}, "imagefolder", None),
    "ffcv": Backend("ffcv", {}, "beton", "ffcv"),
    "dali": Backend("dali", {}, "shards", "nvidia.dali"),
    "nvjpeg": Backend("nvjpeg", {}, "shards", "fastsiam.data.nvjpeg_loader"),
    "synthetic": Backend("synthetic", {}, None, None),
}
OFFICIAL = ("pil_full", "reference")


def variant_overrides(name: str, cuda: bool) -> dict[str, Any]:
    """Config overrides of a step variant (the graph falls back to eager off CUDA)."""
    if name == "reference":
        return {"train.amp": "none", "train.channels_last": False, "train.step": "eager",
                "optim.impl": "torch"}
    if name == "fast":
        return {"train.amp": "bf16", "train.channels_last": True,
                "train.step": "graph" if cuda else "eager", "optim.impl": "auto"}
    raise ValueError(f"unknown step variant {name!r}; expected reference or fast")


class Interrupted(BaseException):
    """SIGTERM (e.g. the GPU suite's stage timeout): write what was measured, then stop."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted


class Skip(Exception):
    """A measurement that cannot run here; the reason goes into settings.skipped."""


class Run:
    """One benchmark run: shared settings, the data, the ceilings measured so far."""

    def __init__(self, args: argparse.Namespace, device: torch.device, data: _data.BenchData,
                 work: Path, threads: int):
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"
        self.data = data
        self.work = work
        self.threads = threads  # restored before every measurement
        self.runs = 0

    def config(self, backend: str, variant: str, extra: dict[str, Any] | None = None) -> Config:
        a, b = self.args, BACKENDS[backend]
        path = self.data.path_for(b.fmt)
        over = {
            "data.backend": b.backend, "data.train_path": str(path), "data.options": b.options,
            "data.batch_size": a.batch_size, "data.image_size": a.image_size,
            "data.workers": a.workers, "model.backbone": a.arch, "train.device": str(self.device),
            "train.epochs": 1, "train.log_every": a.iters, "eval.knn_every": 0,
            "output.keep_last": 1, **variant_overrides(variant, self.cuda), **(extra or {}),
        }
        if a.dim:
            over["model.dim"] = a.dim
        if a.pred_dim:
            over["model.pred_dim"] = a.pred_dim
        # Every row runs the official recipe's sigma range, the one pil_full can run (the demo
        # config's scaled blur would be refused there), so the rows compare like with like.
        over["aug.blur_sigma"] = list(AugConfig().blur_sigma)
        if a.image_size != 224:  # the recipe's kernel is 10% of the side, odd (23 at 224 px)
            over["aug.blur_kernel_size"] = max(3, int(a.image_size * 0.1) // 2 * 2 + 1)
        return load_config(a.config, [f"{k}={_yaml(v)}" for k, v in over.items()])

    def _settle(self) -> None:
        """Between measurements: free memory, undo loaders' thread changes (FFCV sets them)."""
        gc.collect()
        torch.set_num_threads(self.threads)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        reset_peak_memory(str(self.device))

    def step_alone(self, variant: str, float_views: bool) -> tuple[Measurement, dict[str, Any]]:
        a = self.args
        self._settle()
        trainer = Trainer(self.config("synthetic", variant), work_dir=self.work / "unused")
        batch = next(iter(trainer.loader))  # uint8, channels_last, on the device
        if float_views:  # what pil_full delivers: normalized float32, augmented on the CPU
            mean = torch.tensor(trainer.cfg.aug.mean, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(trainer.cfg.aug.std, device=self.device).view(1, 3, 1, 1)
            views = (batch.views.float() / 255 - mean) / std
            batch = TwoViewBatch(views.contiguous(memory_format=torch.channels_last), batch.label)
        step = [0]
        last: list[torch.Tensor] = []

        def one() -> None:
            trainer.schedule.set(step[0])  # as Trainer._run_epoch does before each step
            last[:] = [trainer.step_fn(batch).loss]
            step[0] += 1

        m = measure(one, items_per_call=a.batch_size, iters=a.iters, repeats=a.repeats,
                    warmup=a.iters * a.warmup_windows, device=str(self.device))
        return m, {**_step_facts(trainer), "torch_threads": torch.get_num_threads(),
                   "final_loss": round(float(last[0]), 4),
                   "peak_memory_mb": peak_memory_mb(str(self.device))}

    def loader_alone(self, backend: str) -> tuple[Measurement, dict[str, Any]]:
        a = self.args
        self._settle()
        cfg = self.config(backend, "fast")
        # as the trainer builds it: the batches carry the augmentation's draws
        loader = build_loader_from_config(cfg.data, split="train", device=self.device,
                                          seed=cfg.train.seed, view_draws=DRAW_COLUMNS)
        need = a.iters * (a.warmup_windows + a.repeats)
        if len(loader) < need:
            raise Skip(f"an epoch has {len(loader)} batches, the measurement needs {need}")
        it = iter(loader)
        try:
            m = measure(lambda: next(it), items_per_call=a.batch_size, iters=a.iters,
                        repeats=a.repeats, warmup=a.iters * a.warmup_windows, device=str(self.device))
        finally:
            if hasattr(it, "close"):  # a generator: stop the backend's threads/workers mid-epoch
                it.close()
        return m, {"workers": a.workers}

    def end_to_end(self, backend: str, variant: str) -> tuple[Measurement, dict[str, Any]]:
        a = self.args
        self._settle()
        steps = a.iters * (a.warmup_windows + a.repeats)
        self.runs += 1
        work_dir = self.work / f"run{self.runs}"
        trainer = Trainer(self.config(backend, variant, {"train.max_steps": steps}), work_dir=work_dir)
        if trainer.steps_per_epoch < steps:
            raise Skip(f"an epoch has {trainer.steps_per_epoch} steps, the measurement needs {steps}")
        facts = _step_facts(trainer)
        quiet = contextlib.nullcontext() if a.verbose else contextlib.redirect_stderr(io.StringIO())
        try:
            with quiet:
                result = trainer.fit()
            if result.stopped_by == "signal":  # the trainer took our SIGTERM between steps
                raise Interrupted
            windows = [r for r in read_metrics(work_dir) if "images_per_s" in r]
        finally:
            del trainer
            shutil.rmtree(work_dir, ignore_errors=True)  # checkpoints: hundreds of MB at R50
        timed = windows[a.warmup_windows:]
        if len(timed) != a.repeats:
            raise RuntimeError(f"expected {a.warmup_windows + a.repeats} logged windows, got {len(windows)}")
        m = summarize([r["images_per_s"] for r in timed], items_per_call=a.batch_size, iters=a.iters,
                      warmup=a.iters * a.warmup_windows)
        waits = sorted(r["data_wait"] for r in timed)
        # Threads as the run ended: the trainer's choice, or what a loader (FFCV) set meanwhile.
        extra = {**facts, "torch_threads": torch.get_num_threads(),
                 "data_wait": round(waits[len(waits) // 2], 4),
                 "final_loss": round(result.last_loss, 4) if result.last_loss is not None else None,
                 "peak_memory_mb": peak_memory_mb(str(self.device))}
        return m, extra


def _step_facts(trainer: Trainer) -> dict[str, Any]:
    """What the trainer actually built (after any fallback): mode, dtype, layout, optimizer."""
    step, opt = trainer.step_fn, trainer.optimizer
    impl = getattr(opt, "impl", None)
    return {
        "mode": step.mode, "amp": step.amp, "channels_last": step.channels_last,
        "optimizer": f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__}"
        + (f"({impl})" if impl else ""),
    }


def _yaml(value: Any) -> str:
    """A value as a YAML flow scalar/mapping for a ``key=value`` override."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def available(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None."""
    needs = BACKENDS[name].needs
    try:
        if needs and importlib.util.find_spec(needs) is None:
            return f"{needs} is not installed"
    except ModuleNotFoundError as e:  # a missing parent package
        return f"{e.name} is not installed"
    return None


def add_bounds(report: BenchmarkReport) -> None:
    """Fill each end-to-end row's ceilings, its bound, share of the ceiling and overlap."""
    rows = {r["variant"]: r for r in report.rows}
    for r in report.rows:
        if r["kind"] != "end_to_end":
            continue
        step = rows.get(step_name(r["step"], BACKENDS[r["backend"]].float_views))
        loader = rows.get(loader_name(r["backend"]))
        r["step_alone"] = step and round(step["items_per_s"], 2)
        r["loader_alone"] = loader and round(loader["items_per_s"], 2)
        if not (step and loader):
            continue
        s, ld, e = step["items_per_s"], loader["items_per_s"], r["items_per_s"]
        r["bound"] = "loader" if ld < s else "step"
        r["of_ceiling"] = round(e / min(s, ld), 3)
        t_load, t_step, t_e2e = 1 / ld, 1 / s, 1 / e
        if min(t_load, t_step) >= 0.1 * max(t_load, t_step):  # else one side is noise-sized
            r["overlap"] = round((t_load + t_step - t_e2e) / min(t_load, t_step), 3)


def _kind_of(name: str) -> str:
    return ("step_alone" if name.startswith("step alone:") else
            "loader_alone" if name.startswith("loader alone:") else "end_to_end")


def step_name(variant: str, float_views: bool) -> str:
    return f"step alone: {variant}" + (" (float32 views)" if float_views else "")


def loader_name(backend: str) -> str:
    return f"loader alone: {backend}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--config", default=None, help="base config (default: the ResNet-50 ImageNet "
                   "recipe on CUDA, the ResNet-18 toy demo on the CPU)")
    p.add_argument("--backends", default=None, help=f"comma list of {', '.join(BACKENDS)} "
                   "(default: all; smoke: pil_full,synthetic)")
    p.add_argument("--variants", default="reference,fast", help="comma list of reference, fast")
    p.add_argument("--arch", default=None, help="default resnet50 on CUDA, resnet18 on the CPU")
    p.add_argument("--image-size", type=int, default=None, help="default 224 on CUDA, 64 on the CPU")
    p.add_argument("--batch-size", type=int, default=None, help="per step; default 256 on CUDA, 16 on the CPU")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: every core "
                   "on CUDA, the config's on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: "
                   "torch's; smoke: 1, which a busy machine runs far more steadily)")
    p.add_argument("--dim", type=int, default=None, help="projector dim (default: the config's)")
    p.add_argument("--pred-dim", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="steps per timed window (default 10 on CUDA, 4 on the CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows")
    p.add_argument("--warmup-windows", type=int, default=1, help="untimed windows first")
    p.add_argument("--data", type=Path, default=None, help="an ImageFolder train folder instead of the toy data")
    p.add_argument("--data-cache", type=Path, default=None, help="keep the prepared data here (default: a temp dir)")
    p.add_argument("--toy-images", type=int, default=None, help="distinct toy images (default 512 on CUDA, 128 on the CPU)")
    p.add_argument("--only", default=None, help="comma list of end_to_end, step_alone, "
                   "loader_alone: measure only these kinds (e.g. loader_alone at 224 px on a CPU)")
    p.add_argument("--name", default="end_to_end", help="result file name stem (default end_to_end)")
    p.add_argument("--prepare-only", action="store_true", help="prepare the data in --data-cache and exit")
    p.add_argument("--time-budget", type=float, default=None, help="seconds; later measurements are skipped past it")
    p.add_argument("--smoke", action="store_true", help="tiny settings, seconds on the CPU (CI)")
    p.add_argument("--verbose", action="store_true", help="show the trainer's progress bars")
    p.add_argument("--note", default=None, help="recorded in the settings (e.g. 'contended')")
    p.add_argument("--out", default=None, help="results directory ($OUT or benchmarks/results; smoke: only when given)")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    """``--device``: ``auto`` is CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """The settings left unset, by run kind (smoke, GPU, CPU); the config the run trains
    (the ImageNet ResNet-50 recipe on a GPU, the toy demo's otherwise); torch's threads; and
    the counts checked."""
    cuda = device.type == "cuda"
    if args.smoke:
        defaults = dict(arch="resnet18", image_size=64, batch_size=4, iters=1, workers=1, dim=256,
                        pred_dim=64, toy_images=32, backends="pil_full,synthetic", threads=1)
        args.repeats = min(args.repeats, 2)
    elif cuda:
        defaults = dict(arch="resnet50", image_size=224, batch_size=256, iters=10, toy_images=512,
                        workers=min(16, _cores()))
    else:
        defaults = dict(arch="resnet18", image_size=64, batch_size=16, iters=4, toy_images=128)
    defaults.setdefault("backends", ",".join(BACKENDS))
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.config is None:
        name = ("simsiam_resnet50_8xb32-coslr-100e_in1k.yaml" if cuda and not args.smoke
                else "simsiam_resnet18_toy-demo.yaml")
        args.config = str(ROOT / "configs" / name)
    if args.workers is None:
        args.workers = load_config(args.config).data.workers
    if args.threads:
        torch.set_num_threads(args.threads)
    for key in ("iters", "repeats", "batch_size"):
        if getattr(args, key) < 1:
            raise SystemExit(f"end_to_end: --{key.replace('_', '-')} must be >= 1")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


Plan = list[tuple[str, Callable[[], tuple[str, dict[str, Any], tuple[Measurement, dict[str, Any]]]]]]


def make_plan(run: Run, backends: list[str], variants: list[str]) -> Plan:
    """Named measurements in order: step ceilings, loader ceilings, then the combinations (the
    official recipe first, then the fast step on every loader: what a time budget keeps)."""
    plan: Plan = []
    for v in variants:
        for fv in sorted({BACKENDS[b].float_views for b in backends}):
            plan.append((step_name(v, fv),
                         lambda v=v, fv=fv: ("step_alone", {"step": v}, run.step_alone(v, fv))))
    for b in backends:
        plan.append((loader_name(b),
                     lambda b=b: ("loader_alone", {"backend": b}, run.loader_alone(b))))
    by_priority = sorted(variants, key=lambda v: v != "fast")
    combos = [OFFICIAL] + [(b, v) for v in by_priority for b in backends if (b, v) != OFFICIAL]
    for b, v in combos:
        plan.append((f"{b} + {v}", lambda b=b, v=v: ("end_to_end", {"backend": b, "step": v},
                                                     run.end_to_end(b, v))))
    return plan


def execute(plan: Plan, report: BenchmarkReport, skipped: dict[str, str],
            time_budget: float | None) -> list[str]:
    """Run the plan into ``report``; return the errors. A SIGTERM ends it early, recorded."""
    errors: list[str] = []
    t0 = time.perf_counter()
    try:
        for name, fn in plan:
            if time_budget is not None and time.perf_counter() - t0 > time_budget:
                skipped[name] = f"time budget of {time_budget:g} s spent"
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # expected notices (e.g. fp32 fallbacks)
                    kind, keys, (m, extra) = fn()
            except Skip as e:
                skipped[name] = str(e)
                print(f"{name}: skipped ({e})", file=sys.stderr)
                continue
            except Exception as e:  # one combination failing must not lose the others
                errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                print(f"{name}: failed: {errors[-1]}", file=sys.stderr)
                continue
            report.add(name, m, kind=kind, **keys, ms_per_batch=round(m.seconds_per_call * 1e3, 2),
                       **extra)
            print(f"{name}: {m.items_per_s:.1f} images/s", file=sys.stderr)
    except Interrupted:
        report.settings["interrupted"] = f"SIGTERM after {time.perf_counter() - t0:.0f} s"
        print("end_to_end: interrupted, writing what was measured", file=sys.stderr)
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    fill_defaults(args, device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"end_to_end: unknown backend {b!r}; expected some of {', '.join(BACKENDS)}")
    for v in variants:
        variant_overrides(v, False)  # validates the name
    skipped: dict[str, str] = {}
    for b in list(backends):
        why = available(b)
        if why:
            skipped[b] = why
            backends.remove(b)
    if "pil_full" not in backends:
        backends.insert(0, "pil_full")  # the official recipe is always a row
    if "reference" not in variants:
        variants.insert(0, "reference")
    formats = {BACKENDS[b].fmt for b in backends} - {None, "imagefolder"}
    need = args.batch_size * args.iters * (args.warmup_windows + args.repeats)
    cache = args.data_cache or Path(tempfile.mkdtemp(prefix="fastsiam-e2e-"))
    threads = torch.get_num_threads()  # before the converters and loaders touch it
    started = time.perf_counter()
    data = _data.prepare(cache, min_images=need, formats=formats, data=args.data,
                         distinct=args.toy_images, classes=4 if args.smoke else 8,
                         min_side=64 if args.smoke else 200, max_side=160 if args.smoke else 600,
                         workers=_cores())
    prep_seconds = time.perf_counter() - started
    torch.set_num_threads(threads)
    print(f"data: {data.images} images per epoch ({data.distinct} distinct) in {cache} "
          f"({prep_seconds:.1f} s)", file=sys.stderr)
    if args.prepare_only:
        print(f"imagefolder={data.imagefolder}\nbeton={data.beton or ''}\nshards={data.shards or ''}")
        return 0

    settings = {
        "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
        "workers": args.workers, "config": str(Path(args.config).resolve().relative_to(ROOT))
        if Path(args.config).resolve().is_relative_to(ROOT) else args.config,
        "steps_per_window": args.iters, "timed_windows": args.repeats,
        "warmup_windows": args.warmup_windows,
        "variants": {v: variant_overrides(v, device.type == "cuda") for v in variants},
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "data": data.info,
        "data_prep_seconds": round(prep_seconds, 1),
    }
    if args.note:
        settings["note"] = args.note
    report = BenchmarkReport("end_to_end", str(device), settings, baseline=" + ".join(OFFICIAL))
    work = Path(tempfile.mkdtemp(prefix="runs-", dir=cache))
    run = Run(args, device, data, work, threads)
    plan = make_plan(run, backends, variants)
    if args.only:
        kinds = {k.strip() for k in args.only.split(",")}
        plan = [(n, fn) for n, fn in plan if _kind_of(n) in kinds]
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where is it stuck
    try:
        errors = execute(plan, report, skipped, args.time_budget)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)
        if args.data_cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    report.settings["skipped"] = skipped
    if errors:
        report.settings["errors"] = errors
    if report.baseline not in {r["variant"] for r in report.rows}:
        report.baseline = None  # the official row failed or was skipped: no ratios
    add_bounds(report)
    order = {"end_to_end": 0, "step_alone": 1, "loader_alone": 2}
    report.rows.sort(key=lambda r: order[r["kind"]])  # stable: the official row stays first
    print(report.table())
    if report.rows and (not args.smoke or args.out):
        print(f"wrote {report.write(args.out, name=args.name)}")
    return 3 if "interrupted" in report.settings else 0


if __name__ == "__main__":
    sys.exit(main())
