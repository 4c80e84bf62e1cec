"""The SimSiam training step: eager, or captured once as a CUDA graph and replayed.

One step is: device-side augmentation of the two views, the SimSiam forward under autocast
(bf16, or fp16 with a loss scaler, or fp32), the symmetric negative-cosine loss, backward,
optimizer update. It returns the loss and the collapse monitor as device tensors, so the
caller decides when to synchronize (the trainer does every ``train.log_every`` steps).

Decisions:

- **Two passes, one per view.** The model's forward runs the encoder on view 1, then on
  view 2, as the official code does: every BatchNorm normalizes each view over its own
  batch. One concatenated pass would mix the views' statistics, a different recipe;
  ``benchmarks/step.py --concat`` measures what it would gain.
- **z-std monitor:** the mean of :func:`fastsiam.model.z_std` over z1 and z2.
- **fp16 under a graph is supported** with :class:`LossScaler`, a dynamic loss scaler whose
  overflow check and scale update are tensor ops (``torch._amp_foreach_non_finite_check_
  and_unscale_`` / ``torch._amp_update_scale_``, the kernels of ``torch.amp.GradScaler``)
  and whose skipped step is a masked update in the optimizer. bf16 needs no scaler and is
  the default.
- **Graph capture** (PyTorch's "whole network capture" recipe): a static input buffer,
  warm-up iterations on a side stream (their effect on weights, BN statistics, momentum and
  the scaler is then undone, so the first replay is the first real step), one capture of
  augmentation + forward + loss + backward + update, then a replay per batch, which copies
  the batch's views (both in one tensor, :class:`~fastsiam.data.TwoViewBatch`) into the
  buffer once. The lr is a device tensor read by the captured update, so the schedule needs
  no re-capture. The outputs are cloned after each replay (the static ones are overwritten
  by the next). A batch of another shape (a short last batch) runs eagerly, with a one-time
  notice.
- **DDP.** The step calls the wrapped module's forward, so DDP's gradient all-reduce runs in
  backward. With ``mode="graph"`` the all-reduce is captured too, which PyTorch supports
  under these conditions (CUDA semantics notes, "Usage with DistributedDataParallel"): NCCL
  >= 2.9.6, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=0`` set before ``init_process_group`` and DDP
  constructed inside a side-stream context (both done by :mod:`fastsiam.dist` for a graph
  step), and at least 11 eager DDP iterations before capture (this step warms up 11 times
  when it sees a DDP module). The collectives of :mod:`fastsiam.sync_batchnorm` are then
  captured as well (torch's SyncBatchNorm would also capture, but syncs in eager mode).
  Eager DDP has no conditions.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from fastsiam.data.batch import TwoViewBatch
from fastsiam.model import simsiam_loss, z_std
from fastsiam.optim import optimizer_info
from fastsiam.runtime import AMP_DTYPES, memory_format

if TYPE_CHECKING:
    from fastsiam.probe import OnlineProbe

MODES = ("eager", "graph")
DDP_WARMUP_ITERS = 11  # PyTorch's requirement before capturing DDP
WARMUP_ITERS = 3

Augment = Callable[[TwoViewBatch], tuple[Tensor, Tensor]]


class StepOutput(NamedTuple):
    """Device tensors (0-dim float32): the step's loss, the z-std collapse monitor, and the
    online probe's cross-entropy (None without a probe)."""

    loss: Tensor
    z_std: Tensor
    probe_loss: Tensor | None = None


class LossScaler:
    """Dynamic loss scaling for fp16 whose every operation is a device op (graph-safe).

    The loss is multiplied by ``scale`` before backward; the gradients are unscaled and
    checked for inf/NaN in one multi-tensor kernel, which sets ``found_inf``; the optimizer
    skips the update by masking when ``found_inf`` is 1; the scale halves on overflow and
    doubles after ``growth_interval`` clean steps (the policy of ``torch.amp.GradScaler``,
    Micikevicius et al., "Mixed Precision Training", ICLR 2018).

    Args:
        device: where the scale and counters live.
        init_scale: the initial scale.
        growth_factor: scale multiplier after ``growth_interval`` finite steps.
        backoff_factor: scale multiplier after an overflow.
        growth_interval: finite steps between growths.
    """

    def __init__(self, device: torch.device | str, *, init_scale: float = 2.0**16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        device = torch.device(device)
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss.float() * self.scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide every gradient by the scale; ``found_inf`` = 1 if any is not finite."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        inv_scale = self.scale.double().reciprocal().float()
        self.found_inf.zero_()
        for grads in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, inv_scale)

    def update(self) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf,
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": float(self.scale), "growth_tracker": int(self.growth_tracker)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale.fill_(float(state["scale"]))  # in place: a captured graph holds these
        self.growth_tracker.fill_(int(state["growth_tracker"]))


def _resolve_amp(amp: str, device: torch.device) -> str:
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        warnings.warn(f"amp=fp16 needs CUDA; running in fp32 on {device} (use amp=bf16 on the CPU)",
                      stacklevel=3)
        return "none"
    return amp


def _set_memory_format(model: nn.Module, channels_last: bool) -> None:
    """Put the 4-D weights in the requested layout (a no-op when they already are)."""
    fmt = memory_format(channels_last)
    if all(p.is_contiguous(memory_format=fmt) for p in model.parameters() if p.dim() == 4):
        return
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError("build_step: convert the model's memory format (channels_last="
                         f"{channels_last}) before wrapping it in DistributedDataParallel")
    model.to(memory_format=fmt)


class Step:
    """The eager training step.

    Args:
        model: SimSiam, or a DistributedDataParallel wrapping it; ``model(v1, v2)`` returns
            ``(p1, p2, z1, z2)``.
        optimizer: from :func:`fastsiam.optim.build_optimizer` (fp16 needs fastsiam's
            ``SGD``/``LARS``, whose ``step`` accepts ``found_inf``).
        augment: ``augment(batch) -> (v1, v2)`` on the device (e.g.
            :class:`fastsiam.augment.SimSiamAugment`).
        device: the training device.
        amp: ``"bf16"``, ``"fp16"`` (CUDA only; fp32 with a notice elsewhere) or ``"none"``.
        channels_last: NHWC activations and weights (the model is converted if needed).
        skip_nonfinite: a step whose loss is inf/NaN leaves every state as it was: the update
            is masked (no host sync; needs fastsiam's SGD/LARS) and the BatchNorm statistics
            its forward wrote are restored. fp16's scaler skips overflows regardless.
        probe: an :class:`~fastsiam.probe.OnlineProbe` trained in the same step on the first
            view's detached features and the batch's labels (the model's forward is asked
            for the features); the SimSiam update is the same with or without it.
    """

    mode = "eager"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, augment: Augment, *,
                 device: torch.device | str, amp: str = "bf16", channels_last: bool = True,
                 skip_nonfinite: bool = False, probe: OnlineProbe | None = None):
        self.model = model
        self.probe = probe
        self.optimizer = optimizer
        self.augment = augment
        self.device = torch.device(device)
        self.amp = _resolve_amp(amp, self.device)
        self.dtype = AMP_DTYPES[self.amp]
        self.channels_last = channels_last
        self.autocast_cache = True
        _set_memory_format(model, channels_last)
        self.scaler: LossScaler | None = None
        # what the optimizer can do: the masked update below, capture in GraphStep
        self.optimizer_info = info = optimizer_info(optimizer)
        if skip_nonfinite and not info.takes_found_inf:
            raise ValueError("train.on_nonfinite=skip needs fastsiam's SGD or LARS (optim.impl auto, "
                             f"foreach or fused) for its masked update; got {type(optimizer).__name__}")
        self.skip_nonfinite = skip_nonfinite
        # The buffers a training forward writes (BatchNorm statistics), by dtype and device:
        # a skipped step puts them back (see _restore_buffers).
        self._buffer_groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for b in model.buffers() if skip_nonfinite else ():
            self._buffer_groups.setdefault((b.dtype, b.device), []).append(b)
        if self.amp == "fp16":
            if not info.takes_found_inf:
                raise ValueError("amp=fp16 needs fastsiam's SGD or LARS (optim.impl auto, foreach "
                                 f"or fused) for its masked overflow skip; got {type(optimizer).__name__}")
            self.scaler = LossScaler(self.device)

    def __call__(self, batch: TwoViewBatch) -> StepOutput:
        self.model.train()
        return self._run(batch)

    def _prepare(self, view: Tensor) -> Tensor:
        if self.dtype is None and view.dtype != torch.float32:
            view = view.float()
        fmt = memory_format(self.channels_last)
        return view.contiguous(memory_format=fmt)

    def _run(self, batch: TwoViewBatch) -> StepOutput:
        self.optimizer.zero_grad(set_to_none=True)
        probe = self.probe
        if probe is not None:
            probe.zero_grad()
        saved = self._snapshot_buffers()
        v1, v2 = self.augment(batch)
        v1, v2 = self._prepare(v1), self._prepare(v2)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None, cache_enabled=self.autocast_cache):
            out = self.model(v1, v2, features=True) if probe is not None else self.model(v1, v2)
        p1, p2, z1, z2 = out[:4]
        # The loss in fp32: cosine similarity of bf16/fp16 outputs loses digits that matter
        # once the loss approaches its floor of -1.
        loss = simsiam_loss(p1.float(), p2.float(), z1.float(), z2.float())
        nonfinite = (~torch.isfinite(loss)) if self.skip_nonfinite else None
        # The probe's loss joins the backward after the SimSiam loss is scaled: its branch is
        # detached, so the SimSiam gradients are the same numbers with or without it.
        probe_loss = probe.loss(out[4], batch.label) if probe is not None else None
        backward = loss if self.scaler is None else self.scaler.scale_loss(loss)
        (backward if probe_loss is None else backward + probe_loss).backward()
        if self.scaler is None:
            if nonfinite is not None:
                self.optimizer.step(found_inf=nonfinite.float())
            else:
                self.optimizer.step()
        else:
            self.scaler.unscale_(self.optimizer)
            self.optimizer.step(found_inf=self.scaler.found_inf)
            self.scaler.update()
        if probe is not None and probe_loss is not None:
            probe.step(found_inf=(~torch.isfinite(probe_loss)).float() if self.skip_nonfinite else None)
        if nonfinite is not None:
            self._restore_buffers(saved, nonfinite)
        with torch.no_grad():
            monitor = (z_std(z1) + z_std(z2)) * 0.5
        return StepOutput(loss.detach(), monitor, None if probe_loss is None else probe_loss.detach())

    def _snapshot_buffers(self) -> list[Tensor]:
        """One flat copy per buffer group, taken before the forward (one kernel each)."""
        return [torch.cat([b.reshape(-1) for b in group]) for group in self._buffer_groups.values()]

    def _restore_buffers(self, saved: list[Tensor], skip: Tensor) -> None:
        """Where ``skip`` (0-dim bool on the device) is set, put the snapshot back.

        A select, not arithmetic: the statistics of a non-finite forward are NaN/inf, and
        ``nan * 0`` is NaN. Three kernels per group (cat, where, a multi-tensor copy), no host
        sync, so it runs inside a captured graph.
        """
        for group, before in zip(self._buffer_groups.values(), saved):
            now = torch.cat([b.reshape(-1) for b in group])
            kept = torch.where(skip, before, now).split([b.numel() for b in group])
            torch._foreach_copy_(group, [k.view(b.shape) for k, b in zip(kept, group)])

    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state (empty without fp16)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class GraphStep(Step):
    """The step captured once as a CUDA graph (on the first batch) and replayed per batch.

    The graph reads its input from static buffers shaped as the first batch: the
    ``[2B, 3, H, W]`` views (both views, as a :class:`~fastsiam.data.TwoViewBatch` holds
    them) and the augmentation's carried draws (``[2B, k]``, ``k`` = 0 when the
    loader carries none and the augmentation draws on the device); a replay copies the batch
    into them once. A batch of another shape or dtype runs eagerly.

    Same arguments as :class:`Step`, plus ``warmup_iters`` (default 3, or 11 for DDP).
    Needs fastsiam's ``SGD``/``LARS`` (torch.optim.SGD's foreach path reads a tensor lr on
    the host) and an augmentation without host synchronization.
    """

    mode = "graph"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, augment: Augment, *,
                 device: torch.device | str, amp: str = "bf16", channels_last: bool = True,
                 skip_nonfinite: bool = False, probe: OnlineProbe | None = None,
                 warmup_iters: int | None = None):
        super().__init__(model, optimizer, augment, device=device, amp=amp,
                         channels_last=channels_last, skip_nonfinite=skip_nonfinite, probe=probe)
        if self.device.type != "cuda":
            raise ValueError(f"GraphStep needs a CUDA device, got {self.device}")
        if not self.optimizer_info.graph_safe:
            raise ValueError("mode=graph needs fastsiam's SGD or LARS (optim.impl auto, foreach or "
                             f"fused), got {type(optimizer).__name__}")
        # Autocast's weight-cast cache must not outlive the capture (PyTorch's graph notes).
        self.autocast_cache = False
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.warmup_iters = warmup_iters or (DDP_WARMUP_ITERS if ddp else WARMUP_ITERS)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: TwoViewBatch | None = None
        self._static_out: StepOutput | None = None
        self._warned_shape = False

    def __call__(self, batch: TwoViewBatch) -> StepOutput:
        if self.graph is None:
            self.model.train()
            self._capture(batch)
        elif not self._fits(batch):
            if not self._warned_shape:
                warnings.warn(f"batch views of shape {tuple(batch.views.shape)} (draws "
                              f"{tuple(batch.draws.shape)}) differ from the captured "
                              f"{tuple(self._static.views.shape)} ({tuple(self._static.draws.shape)}); "
                              "running it eagerly",
                              stacklevel=2)
                self._warned_shape = True
            return super().__call__(batch)
        self._static.views.copy_(batch.views, non_blocking=True)
        if batch.draws.numel():  # no draws carried: the graph draws its own
            self._static.draws.copy_(batch.draws, non_blocking=True)
        if self.probe is not None:  # the probe's labels: the captured step's third input
            self._static.label.copy_(batch.label, non_blocking=True)
        self.graph.replay()
        # The static outputs are overwritten by the next replay; callers keep these.
        return StepOutput(*(None if t is None else t.clone() for t in self._static_out))

    def _fits(self, batch: TwoViewBatch) -> bool:
        static = self._static.views
        return (batch.views.shape == static.shape and batch.views.dtype == static.dtype
                and batch.draws.shape == self._static.draws.shape)

    def _state_tensors(self) -> list[Tensor]:
        """Everything a step mutates: weights, BN buffers, momentum, the scaler."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
        if self.scaler is not None:
            tensors += [self.scaler.scale, self.scaler.growth_tracker]
        if self.probe is not None:
            tensors += self.probe.state_tensors()
        return tensors

    def _capture(self, batch: TwoViewBatch) -> None:
        self._static = TwoViewBatch(*(t.to(self.device).clone(memory_format=torch.preserve_format)
                                      for t in batch))
        self.optimizer.init_state()
        tensors = self._state_tensors()
        saved = [t.detach().clone(memory_format=torch.preserve_format) for t in tensors]
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                self._run(self._static)
        current.wait_stream(side)
        with torch.no_grad():  # undo the warm-up: the first replay is the first real step
            for t, s in zip(tensors, saved):
                t.copy_(s)
        del saved
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._run(self._static)
        except RuntimeError as e:
            raise RuntimeError(
                f"capturing the training step as a CUDA graph failed ({e}); something in the "
                "augmentation, model or optimizer synchronizes with the host: use train.step=eager"
            ) from e
        self.graph, self._static_out = graph, out


def build_step(model: nn.Module, optimizer: torch.optim.Optimizer, augment: Augment, *,
               device: torch.device | str, amp: str = "bf16", channels_last: bool = True,
               mode: str = "eager", skip_nonfinite: bool = False, probe: OnlineProbe | None = None) -> Step:
    """The training step for ``mode`` (``eager`` or ``graph``; graph falls back to eager
    with a notice when the device is not CUDA). See :class:`Step` for the arguments."""
    if mode not in MODES:
        raise ValueError(f"step mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    if mode == "graph" and device.type != "cuda":
        warnings.warn(f"train.step=graph needs CUDA; running the eager step on {device}",
                      stacklevel=2)
        mode = "eager"
    cls = GraphStep if mode == "graph" else Step
    return cls(model, optimizer, augment, device=device, amp=amp, channels_last=channels_last,
               skip_nonfinite=skip_nonfinite, probe=probe)
