"""The SimSiam training loop: epochs, per-step LR, logging, checkpoints, resume, DDP, kNN monitor.

The trainer only wires pieces that live elsewhere, each behind a factory:

- data: ``fastsiam.data.build_loader_from_config`` (any registered backend);
- device-side augmentation: ``fastsiam.augment.SimSiamAugment``;
- optimizer and LR schedule: ``fastsiam.optim.build_optimizer`` / ``build_schedule``;
- the training step (eager or CUDA graph): ``fastsiam.step.build_step``;
- checkpoints: ``fastsiam.checkpoint``; records: ``fastsiam.run_log``;
- the kNN monitor and the online linear probe: ``fastsiam.monitors`` (``fastsiam.probe``).

Host synchronization happens only every ``train.log_every`` steps: losses and the collapse
monitor stay on the device until then, so a fast step is never stalled by logging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastsiam
from fastsiam import checkpoint as ckpt
from fastsiam import dist
from fastsiam.augment import DRAW_COLUMNS, SimSiamAugment
from fastsiam.config import AugConfig, Config
from fastsiam.data import build_loader_from_config, makes_data_up
from fastsiam.files import LockedError, atomic_link, atomic_open, exclusive_lock, remove_partials
from fastsiam.model import SimSiam
from fastsiam.monitors import Monitors, online_probe
from fastsiam.optim import build_optimizer, build_schedule
from fastsiam.resume import config_changes, restart_batch
from fastsiam.run_log import CONFIG_FILE, RunLogger, progress
from fastsiam.runtime import AMP_DTYPES, default_work_dir, git_commit, memory_format, scaled_lr
from fastsiam.step import build_step
from fastsiam.sync_batchnorm import convert_sync_batchnorm
from fastsiam.weights import WeightsError, check_resumable

log = logging.getLogger("fastsiam")
LOCK_FILE = ".fastsiam.lock"


class TrainingError(RuntimeError):
    """The run cannot continue (non-finite loss, a work dir in the wrong state...)."""


@dataclass
class TrainResult:
    work_dir: Path
    epoch: int
    step: int
    finished: bool
    stopped_by: str | None = None          # "signal", "max_steps" or None
    last_loss: float | None = None
    last_z_std: float | None = None
    images_per_s: float | None = None      # this process's training throughput (evaluation excluded)
    knn: dict[str, float] = field(default_factory=dict)          # kNN of the final weights
    probe: dict[str, float] = field(default_factory=dict)        # the online probe's last val score
    knn_random_init: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


def _refuse_what_pretraining_would_ignore(cfg: Config) -> None:
    """Settings this run would silently not apply are one-line errors instead."""
    if cfg.train.accumulate_steps != 1:
        # Each micro-batch would normalize by its own BatchNorm statistics: not the step of
        # the larger batch, unlike linear evaluation's frozen backbone.
        raise TrainingError(f"train.accumulate_steps={cfg.train.accumulate_steps}: SimSiam pretraining "
                            f"takes no gradient accumulation (its BatchNorm sees each micro-batch alone); "
                            f"set data.batch_size, or add GPUs with torchrun")
    if cfg.data.backend == "pil" and cfg.data.options.get("augment", "full") == "full":
        # The PIL reference is the official main_simsiam.py recipe, written out in torchvision.
        # Its blur is PIL's untruncated Gaussian: the device path's kernel size has no meaning there.
        default = AugConfig()
        changed = [f"aug.{f.name}={getattr(cfg.aug, f.name)!r}" for f in dataclasses.fields(AugConfig)
                   if f.name not in ("blur_kernel_size", "fused_color") and getattr(cfg.aug, f.name) != getattr(default, f.name)]
        if changed:
            raise TrainingError(f"data.backend=pil augments in PIL with the official SimSiam recipe, which "
                                f"ignores {', '.join(changed)}; set data.options.augment=crop (PIL crops, "
                                f"the aug.* recipe on the device) or drop those keys")


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag checked between steps (preemption-safe exit)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    """Train SimSiam as ``cfg`` says.

    Args:
        cfg: the resolved config.
        work_dir: where config, metrics and checkpoints go (default: ``work_dirs/<name>``).
        resume: ``None`` (a fresh run; refused if the work dir already holds one),
            ``"auto"`` (the newest valid checkpoint in the work dir, or fresh if none) or a path.
    """

    def __init__(self, cfg: Config, work_dir: str | Path | None = None, resume: str | None = None,
                 resume_changed: bool = False):
        _refuse_what_pretraining_would_ignore(cfg)
        self.cfg = cfg
        self.work_dir = Path(work_dir) if work_dir else default_work_dir(cfg)
        self.resume = resume
        self.resume_changed = resume_changed
        self._resume_event: dict[str, Any] | None = None
        local_rank = dist.local_rank_from_env()
        self.device = dist.resolve_device(cfg.train.device, local_rank)
        # A captured step (train.step=graph on CUDA) captures DDP's all-reduce too, which asks
        # for settings made before the process group and the DDP wrapper exist (fastsiam.dist).
        capture = cfg.train.step == "graph" and self.device.type == "cuda"
        self.dist = dist.init_distributed(cfg.dist.backend, self.device, capture=capture,
                                          timeout_s=cfg.dist.timeout_s)
        self._seed_everything(cfg.train.seed + self.dist.rank)
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Leave a core to each loader worker: oversubscribed OpenMP threads spin against the
            # workers and can slow small ops a hundredfold on a busy machine.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.data.workers))
        if self.device.type == "cuda":
            # cuDNN autotuning picks the fastest kernels for the fixed input shape; off when
            # the run must be bit-reproducible.
            torch.backends.cudnn.benchmark = not cfg.train.deterministic
        if cfg.train.deterministic:
            # Bit-reproducible: deterministic kernels, and one intra-op thread on the CPU, since
            # a reduction split over another number of threads rounds differently.
            torch.use_deterministic_algorithms(True)
            if self.device.type == "cpu":
                torch.set_num_threads(1)

        # The batches carry the augmentation's draws, per (seed, epoch, sample, view): a sample
        # is augmented the same on 1 or N processes (backends that draw their own carry none).
        self.loader = build_loader_from_config(
            cfg.data, split="train", device=self.device, seed=cfg.train.seed,
            rank=self.dist.rank, world_size=self.dist.world_size, view_draws=DRAW_COLUMNS,
        )
        self.steps_per_epoch = len(self.loader)
        # The kNN monitor finds classes by their labels; made-up data has none to find.
        self.knn_every = 0 if makes_data_up(cfg.data.backend) else cfg.eval.knn_every
        if cfg.eval.knn_every and not self.knn_every and self.dist.is_main:
            log.info("eval.knn_every: no kNN monitor on the %s backend's random labels", cfg.data.backend)
        self.model = SimSiam(cfg.model.backbone, cfg.model.dim, cfg.model.pred_dim, cfg.model.small_input)
        fmt = memory_format(cfg.train.channels_last)
        self.model.to(self.device, memory_format=fmt)
        self.train_module: nn.Module = self.model
        if self.dist.enabled:
            if cfg.model.sync_bn:
                # fastsiam's SyncBatchNorm: no host sync per layer, capturable, gloo and NCCL.
                convert_sync_batchnorm(self.model)
                if self.dist.is_main:
                    log.info("model.sync_bn: BatchNorm statistics over the global batch (%d processes)",
                             self.dist.world_size)
            self.train_module = dist.wrap_ddp(self.model, self.device, capture=capture)
        self.global_batch = cfg.data.batch_size * self.dist.world_size
        self.peak_lr = scaled_lr(cfg.optim.lr, self.global_batch)
        self.optimizer = build_optimizer(self.model, cfg.optim, lr=self.peak_lr, device=self.device)
        self.probe = online_probe(cfg, self.model, self.loader.num_classes, self.device, self.dist, capture=capture)
        self.monitors = Monitors(cfg, self.model, self.device, self.dist)
        self.schedule = build_schedule(cfg.schedule, self.optimizer, base_lr=self.peak_lr,
                                       epochs=cfg.train.epochs, steps_per_epoch=self.steps_per_epoch)
        self.schedules = [self.schedule]
        if self.probe is not None:  # the same curve from the probe's own peak
            self.schedules.append(build_schedule(cfg.schedule, self.probe.optimizer, base_lr=cfg.eval.online_probe_lr,
                                                 epochs=cfg.train.epochs, steps_per_epoch=self.steps_per_epoch))
        out_dtype = AMP_DTYPES[cfg.train.amp] or torch.float32
        if self.device.type == "cpu" and out_dtype is torch.float16:
            out_dtype = torch.float32
        self.augment = SimSiamAugment.from_config(cfg.aug, out_dtype=out_dtype, channels_last=cfg.train.channels_last)
        self.step_fn = build_step(
            self.train_module, self.optimizer, self.augment, device=self.device, amp=cfg.train.amp,
            channels_last=cfg.train.channels_last, mode=cfg.train.step,
            skip_nonfinite=cfg.train.on_nonfinite == "skip", probe=self.probe,
        )
        self.logger = RunLogger(self.work_dir, enabled=False)  # replaced in fit() once the dir is checked
        self.epoch = 0
        self.step = 0
        self.best_metric: float | None = None      # the best epoch's kNN top-1
        self._saved_at: tuple[int, Path] | None = None  # (step, file) of the last checkpoint written
        self._knn_step: int | None = None                 # the step the kNN monitor last scored
        self._train_images, self._train_seconds = 0, 0.0  # throughput of this process's run
        self.skipped_in_a_row = 0  # consecutive steps skipped for a non-finite loss

    # ------------------------------------------------------------------------------------
    # state

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step_state": self.step_fn.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "loader": self.loader.state_dict(),
            "rng": ckpt.rng_state(),
            "best_metric": self.best_metric,
            "skipped_in_a_row": self.skipped_in_a_row,
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            **({"probe": self.probe.state_dict()} if self.probe is not None else {}),
            "fastsiam_version": fastsiam.__version__,
            "git_commit": git_commit(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as e:
            raise TrainingError(f"its model does not fit this config's model: {_first_line_of(e)}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_fn.load_state_dict(state.get("step_state", {}))
        if self.probe is not None:
            if "probe" in state:
                self.probe.load_state_dict(state["probe"])
            else:  # eval.online_probe is a monitor: turning it on mid-run is allowed
                log.info("the checkpoint has no online probe: it starts untrained at step %d", int(state["step"]))
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_metric = state.get("best_metric")
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        loader_state = state.get("loader")
        if loader_state is not None and state.get("world_size", 1) == self.dist.world_size:
            old_batch = state.get("config", {}).get("data", {}).get("batch_size", self.cfg.data.batch_size)
            if old_batch != self.cfg.data.batch_size:  # a resume with --resume-changed
                start = restart_batch(loader_state["start_batch"], old_batch * self.dist.world_size,
                                      self.global_batch)
                log.warning("data.batch_size %d -> %d: epoch %d restarts at batch %d of %d",
                            old_batch, self.cfg.data.batch_size, loader_state["epoch"], start,
                            self.steps_per_epoch)
                loader_state = {**loader_state, "start_batch": start}
            self.loader.load_state_dict(loader_state)
        else:
            self.loader.set_epoch(self.epoch)
        if self.dist.world_size == state.get("world_size", 1):
            ckpt.set_rng_state(state["rng"])

    def _save(self, name: str, *, prune: bool = True) -> Path | None:
        path = None
        if self.dist.is_main:
            if self._saved_at is not None and self._saved_at[0] == self.step and self._saved_at[1].exists():
                # Nothing trained since the last save (a stop right after an epoch's end).
                path = self._link(self._saved_at[1], name)
            else:
                path = ckpt.save_checkpoint(self.state_dict(), self.work_dir / name)
            self._saved_at = (self.step, path)
            if prune:
                ckpt.prune(self.work_dir, self.cfg.output.keep_last)
        dist.barrier(self.dist)
        return path

    def _link(self, src: Path | None, name: str) -> Path | None:
        """``name`` as a second name of checkpoint ``src`` (rank 0; a hard link, no new bytes)."""
        if src is None:
            return None
        try:
            return atomic_link(src, self.work_dir / name)
        except OSError as e:
            raise TrainingError(ckpt.describe_write_error(self.work_dir / name, e)) from None

    # ------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> TrainResult:
        """Train to ``train.epochs`` (or ``train.max_steps``, or a stop signal).

        The work dir is locked for the run (rank 0 holds an exclusive lock on
        ``.fastsiam.lock``): a second trainer on it is refused in one line naming the holder.
        """
        with self._work_dir_lock():
            return self._fit()

    @contextlib.contextmanager
    def _work_dir_lock(self) -> Iterator[None]:
        with contextlib.ExitStack() as held:
            if self.dist.is_main:
                lock = self.work_dir / LOCK_FILE
                try:
                    self.work_dir.mkdir(parents=True, exist_ok=True)
                    held.enter_context(exclusive_lock(lock, f"work dir {self.work_dir}"))
                except LockedError as e:
                    raise TrainingError(f"{e}; wait for it or use another --work-dir") from None
                except OSError as e:
                    raise TrainingError(ckpt.describe_write_error(lock, e, "run")) from None
            yield

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        self._prepare_work_dir()
        self.logger = RunLogger(self.work_dir, enabled=self.dist.is_main, tensorboard=cfg.output.tensorboard)
        if self._resume_event is not None:
            self.logger.log({**self._resume_event, "epoch": self.epoch, "step": self.step})
        result = TrainResult(self.work_dir, self.epoch, self.step, finished=False)
        max_steps = cfg.train.max_steps
        total_steps = cfg.train.epochs * self.steps_per_epoch
        if max_steps is not None:
            total_steps = min(total_steps, max_steps)
        if self.dist.is_main:
            log.info("training %s on %s: %d x %d images/step, peak lr %.4g, %d steps/epoch, work dir %s",
                     cfg.model.backbone, self.device, self.dist.world_size, cfg.data.batch_size,
                     self.peak_lr, self.steps_per_epoch, self.work_dir)
        if self.knn_every and self.step == 0:
            result.knn_random_init = self._knn("random init")

        bar = progress(total_steps * self.global_batch, self.step * self.global_batch, "train", self.dist.is_main)
        with _StopSignal() as stop:
            while self.epoch < cfg.train.epochs:
                epoch_loss, completed = self._run_epoch(bar, stop, result, max_steps)
                if completed:
                    self._end_epoch(epoch_loss, result)
                if result.stopped_by is None and max_steps is not None and self.step >= max_steps:
                    result.stopped_by = "max_steps"
                if result.stopped_by is not None:
                    if not completed:
                        result.checkpoint = self._save(f"step_{self.step:08d}.pt")
                    self.logger.log({"event": "stopped", "reason": result.stopped_by, "step": self.step})
                    break
        # The summary's kNN is the final weights', also after --max-steps ends a run between
        # monitored epochs (a signal stops at once instead: the job is being preempted).
        if self.knn_every and result.stopped_by == "max_steps" and self._knn_step != self.step:
            result.knn = self._knn(f"final, step {self.step}")
        bar.close()
        if self._train_seconds > 0:
            result.images_per_s = self._train_images / self._train_seconds
        result.epoch, result.step = self.epoch, self.step
        result.finished = self.epoch >= cfg.train.epochs
        if result.finished:
            self.logger.log({"event": "finished", "epoch": self.epoch, "step": self.step})
        self.logger.close()
        return result

    def _end_epoch(self, epoch_loss: float, result: TrainResult) -> None:
        """Epoch bookkeeping: kNN monitor when due, the epoch checkpoint, the best one."""
        cfg = self.cfg
        self.epoch += 1
        self.loader.set_epoch(self.epoch)
        # best.pt is chosen by the kNN monitor only: SimSiam's loss falls as well when the
        # representation collapses, so it cannot say which epoch is best.
        metric = math.nan
        every = self.knn_every
        if every and (self.epoch % every == 0 or self.epoch == cfg.train.epochs):
            result.knn = self._knn(f"epoch {self.epoch}")
            metric = result.knn.get("top1", math.nan)
        if self.probe is not None:
            result.probe = self.monitors.probe(self.probe, epoch=self.epoch, step=self.step, logger=self.logger)
        is_best = math.isfinite(metric) and (self.best_metric is None or metric > self.best_metric)
        if is_best:
            self.best_metric = metric  # before saving, so the epoch's file and best.pt are one
        result.checkpoint = self._save(f"epoch_{self.epoch:04d}.pt")
        if is_best:
            self._link(result.checkpoint, "best.pt")

    def _run_epoch(self, bar: Any, stop: _StopSignal, result: TrainResult,
                   max_steps: int | None) -> tuple[float, bool]:
        """Train until the epoch ends, a stop signal, or ``max_steps``.

        Returns the epoch's mean loss so far (over the steps not skipped; NaN if none) and
        whether the epoch was completed. Host syncs (logging, the non-finite check) happen
        every ``train.log_every`` steps only.
        """
        cfg = self.cfg
        losses: list[torch.Tensor] = []      # device tensors since the last sync
        stds: list[torch.Tensor] = []
        probe_losses: list[torch.Tensor] = []
        loss_sum, loss_n = 0.0, 0

        def epoch_loss() -> float:
            return loss_sum / loss_n if loss_n else math.nan

        window_start = time.perf_counter()
        data_wait = 0.0
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            data_wait += time.perf_counter() - t0
            if batch is None:
                return epoch_loss(), True
            for schedule in self.schedules:
                schedule.set(self.step)
            out = self.step_fn(batch)
            losses.append(out.loss.detach())
            stds.append(out.z_std.detach())
            if out.probe_loss is not None:
                probe_losses.append(out.probe_loss)
            self.step += 1
            bar.update(self.global_batch)
            end_of_epoch = self.loader.sampler.start_batch >= self.steps_per_epoch
            hit_max = max_steps is not None and self.step >= max_steps
            # A single process sees its own signal flag for free; ranks agree at sync points.
            stop_now = stop.received is not None and not self.dist.enabled
            if not (len(losses) >= cfg.train.log_every or end_of_epoch or hit_max or stop_now):
                continue
            elapsed = time.perf_counter() - window_start
            self._train_images += len(losses) * self.global_batch
            self._train_seconds += elapsed
            # One copy to the host (the only sync of the window), and one all-reduce under DDP.
            window = torch.stack([torch.stack(losses), torch.stack(stds),
                                  *([torch.stack(probe_losses)] if probe_losses else [])]).float()
            window = dist.all_reduce_mean(window, self.dist).cpu()
            loss_vals, z = window[0], window[1].mean().item()
            finite = torch.isfinite(loss_vals)
            self._check_finite(loss_vals, finite, first_step=self.step - len(losses))
            kept = loss_vals[finite]  # the steps whose update was applied
            loss = kept.mean().item() if len(kept) else math.nan
            loss_sum += kept.sum().item()
            loss_n += len(kept)
            record = {
                "epoch": self.epoch, "step": self.step, "loss": loss, "z_std": z,
                "skipped_steps": len(losses) - len(kept),
                "corrupt_samples": self.loader.corrupt_count,  # replaced under data.on_corrupt=skip
                "z_std_healthy": 1.0 / math.sqrt(cfg.model.dim),
                "lr": self.schedule.lr_at(self.step - 1),
                "images_per_s": len(losses) * self.global_batch / max(elapsed, 1e-9),
                "data_wait": data_wait / max(elapsed, 1e-9),
                **({"probe_loss": window[2].mean().item()} if probe_losses else {}),
            }
            self.logger.log(record)
            bar.set_postfix(loss=f"{loss:.4f}", z_std=f"{z:.4f}", lr=f"{record['lr']:.3g}")
            result.last_loss, result.last_z_std = loss, z
            losses, stds, probe_losses = [], [], []
            window_start, data_wait = time.perf_counter(), 0.0
            if dist.broadcast_flag(stop.received is not None, self.dist, self.device):
                result.stopped_by = "signal"
            if result.stopped_by is not None or hit_max:
                return epoch_loss(), end_of_epoch

    def _check_finite(self, loss_vals: torch.Tensor, finite: torch.Tensor, first_step: int) -> None:
        """Stop on a non-finite loss (``stop``), or after ``train.max_skipped_steps`` skipped
        steps in a row (``skip``: each such step left every state as it was)."""
        skip = self.cfg.train.on_nonfinite == "skip"
        bad = (~finite).nonzero().flatten().tolist()  # positions in the window
        if skip:
            for i in range(len(loss_vals)):
                self.skipped_in_a_row = self.skipped_in_a_row + 1 if i in bad else 0
        if not bad:
            return
        first_bad = bad[0]
        step = first_step + first_bad + 1
        msg = f"non-finite loss ({loss_vals[first_bad].item()}) at step {step} (epoch {self.epoch})"
        if not skip:
            self._stop_nonfinite(msg, step, "or set train.on_nonfinite=skip")
        limit = self.cfg.train.max_skipped_steps
        if self.skipped_in_a_row >= limit:
            self._stop_nonfinite(f"{self.skipped_in_a_row} non-finite losses in a row up to step "
                                 f"{first_step + len(loss_vals)} (epoch {self.epoch}), every one skipped "
                                 f"(train.max_skipped_steps={limit})", step, "")
        log.warning("%s: that step changed nothing (train.on_nonfinite=skip; %d in a row)", msg,
                    self.skipped_in_a_row)

    def _stop_nonfinite(self, msg: str, step: int, advice: str) -> None:
        path = self._save("debug_nonfinite.pt", prune=False)
        self.logger.log({"event": "nonfinite", "step": step, "checkpoint": str(path)})
        raise TrainingError(f"{msg}; wrote {path} for debugging. Lower optim.lr, use train.amp=bf16"
                            + (f", {advice}" if advice else ""))

    # ------------------------------------------------------------------------------------
    # helpers

    def _knn(self, label: str) -> dict[str, float]:
        res = self.monitors.knn(label, epoch=self.epoch, step=self.step, logger=self.logger)
        self._knn_step = self.step
        return res

    def _prepare_work_dir(self) -> None:
        """Refuse to mix runs; load the checkpoint to resume; write the resolved config."""
        wd = self.work_dir
        existing = ckpt.periodic_checkpoints(wd)
        if self.resume is None and existing:
            raise TrainingError(
                f"work dir {wd} already holds a run ({existing[-1].name}); pass --resume auto to continue it "
                f"or --work-dir for a new one"
            )
        if self.resume is not None:
            if self.resume == "auto":
                found = ckpt.find_resumable(wd)
                if found is not None:
                    self._resume_from(*found)
                elif existing:
                    raise TrainingError(f"work dir {wd}: no readable checkpoint to resume from")
            else:  # find_resumable checked its candidates; a named file is checked here
                state = ckpt.load_checkpoint(self.resume)
                try:
                    check_resumable(state, self.resume)
                except WeightsError as e:
                    raise TrainingError(str(e)) from None
                self._resume_from(Path(self.resume), state)
        if self.epoch >= self.cfg.train.epochs:
            raise TrainingError(f"work dir {wd} already holds a finished run ({self.epoch} of "
                                f"{self.cfg.train.epochs} epochs); raise train.epochs (with --resume-changed) "
                                f"or use another --work-dir")
        if self.dist.is_main:
            stale = remove_partials(wd)  # under the lock: no live writer owns them
            if stale:
                log.info("removed %d temporary file(s) left by an interrupted run in %s", len(stale), wd)
            try:
                with atomic_open(wd / CONFIG_FILE, "w") as f:
                    f.write(self.cfg.to_yaml())
            except OSError as e:
                raise TrainingError(ckpt.describe_write_error(wd / CONFIG_FILE, e, "config")) from None
        dist.barrier(self.dist)

    def _resume_from(self, path: Path, state: dict[str, Any]) -> None:
        """Load ``state`` (a checkpoint :func:`~fastsiam.weights.check_resumable` accepted)
        unless this run's config changes its trajectory (fastsiam.resume)."""
        saved = state.get("config")
        if isinstance(saved, dict):
            trajectory, _ = config_changes(saved, self.cfg.to_dict())
            if trajectory and not self.resume_changed:
                raise TrainingError(
                    f"{path}: this config changes the run's trajectory ({'; '.join(map(str, trajectory))}); "
                    "resume with the run's config, or pass --resume-changed to continue anyway")
            if trajectory:
                log.warning("resuming %s with a changed config: %s", path, "; ".join(map(str, trajectory)))
                self._resume_event = {"event": "resume_changed", "checkpoint": str(path),
                                      "changed": {c.key: [c.old, c.new] for c in trajectory}}
        try:
            self.load_state_dict(state)
        except TrainingError as e:
            raise TrainingError(f"{path}: {e}") from None
        log.info("resumed from %s (epoch %d, step %d)", path, self.epoch, self.step)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def _first_line_of(e: BaseException) -> str:
    """The first specific line of an error (torch's state-dict errors start with a header)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines or [repr(e)])[0]
    return detail if len(detail) <= 300 else detail[:297] + "..."
