"""A SyncBatchNorm without host synchronization, capturable in a CUDA graph, on any device.

Batch normalization (Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
by Reducing Internal Covariate Shift", ICML 2015) normalizes every channel by the mean and
variance over the batch. Under data parallelism each process sees only its slice of the batch;
SimSiam's recipe (Chen & He, CVPR 2021) takes the statistics over the *global* batch, which is
what a SyncBatchNorm does: the per-process statistics are combined with a collective.

Why not ``torch.nn.SyncBatchNorm``:

- **Host syncs.** Outside CUDA-graph capture it drops the statistics of ranks with an empty
  batch with a data-dependent boolean index (``count_all[mask]``), which copies the mask to the
  host: one device->host synchronization in every BN layer of every forward (114 per SimSiam
  ResNet-50 step, two views) that stalls the CPU's kernel queue. fastsiam's sampler pads every
  rank to the same batch size, so the mask never removes anything. ``momentum=None`` adds a
  ``num_batches_tracked.item()`` on top.
- **CUDA only.** Its kernels (``batch_norm_stats``, ``batch_norm_elemt``, ...) have no CPU
  implementation, so CPU/gloo DDP runs had to keep BatchNorm per process.

What this module does instead (see :class:`SyncBatchNorm`): the forward all-reduces ONE float32
tensor ``[sum x (C), sum x^2 (C), count (1)]`` with SUM, and the backward one tensor
``[sum dy (C), sum dy*xhat (C)]``, the same two collectives per layer as torch's (whose forward
collective is an all-gather). Counts are device tensors built with a fill, running statistics
are updated with in-place tensor ops, and nothing reads a tensor value on the host, so the whole
layer can be captured in a CUDA graph and runs with the same code on CPU (gloo) and GPU (NCCL).
Ranks may even have different batch sizes (the count is summed), empty ones included.

Numerics: the global variance is ``E[x^2] - E[x]^2`` in float32, so its absolute error is
about ``1e-7 * E[x]^2`` (relative ``1e-7 * (mean/std)^2``), where cuDNN's and torch's Welford
combinations have none; for normalized networks (|mean| a few std at most) that is below float32
rounding of the output. Each rank's contribution comes from a stable local ``var_mean``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _world_size(process_group: Any) -> int:
    """Processes in ``process_group`` (the default group for None); 1 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def _reduce_dims(x: Tensor) -> list[int]:
    """Every dimension but the channels (dim 1): N for [N, C], N and the spatial ones else."""
    return [0, *range(2, x.dim())]


def _acc_dtype(x: Tensor) -> torch.dtype:
    """float32 for float32/bfloat16/float16 input (float64 stays float64, e.g. for gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """A [C] vector viewed as [1, C, 1, ...] so it broadcasts against ``x``."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward and backward of the global-batch BN with one all_reduce each (see the module doc).

    ``factor`` is the running-average weight: a float (``momentum``), a 0-dim device tensor
    (``1 / num_batches_tracked`` for ``momentum=None``), or unused when ``running_mean`` is None.
    With ``world_size == 1`` it runs without any collective (the single-process cumulative
    average, which torch's BatchNorm computes with a host read).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        factor: float | Tensor,
        eps: float,
        process_group: Any,
        world_size: int,
    ) -> Tensor:
        channels = x.shape[1]
        local_count = x.numel() // channels if channels else 0
        acc = _acc_dtype(x)
        if local_count > 0:
            # a stable local mean/var (Welford on CUDA), turned into sum and sum of squares so
            # that a plain SUM all_reduce combines ranks of any batch size
            local_var, local_mean = torch.var_mean(x.to(acc), dim=_reduce_dims(x), correction=0)
            stats = torch.cat([
                local_mean * local_count,
                (local_var + local_mean * local_mean) * local_count,
                torch.full((1,), local_count, dtype=acc, device=x.device),
            ])
        else:  # an empty rank still joins the collective, contributing zeros
            stats = torch.zeros(2 * channels + 1, dtype=acc, device=x.device)
        if world_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)
        count = stats[2 * channels:]                                  # [1], global N
        mean = stats[:channels] / count
        var = (stats[channels:2 * channels] / count - mean * mean).clamp_(min=0.0)

        if running_mean is not None and running_var is not None:
            # torch's update: running = (1 - f) * running + f * batch stat, unbiased variance
            # with the global count; in place, so a captured graph updates the real buffers
            keep = 1.0 - factor
            running_mean.mul_(keep).add_(mean.to(running_mean.dtype) * factor)
            unbiased = var * (count / (count - 1.0))
            running_var.mul_(keep).add_(unbiased.to(running_var.dtype) * factor)

        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps = eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.process_group = process_group
        ctx.world_size = world_size
        # normalize with the given statistics in one kernel (cuDNN/native, any memory format,
        # bf16/fp16 input with float32 statistics and parameters, output in the input's dtype)
        return F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, var, count = ctx.saved_tensors
        channels = x.shape[1]
        dims = _reduce_dims(x)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]

        acc = _acc_dtype(x)
        dy = grad_output.to(acc)
        xhat = F.batch_norm(x.to(acc), mean, var, None, None, training=False, momentum=0.0, eps=ctx.eps)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)

        grad_x = None
        if need_x:
            # dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the global
            # batch: one SUM of both per-channel sums, divided by the global count
            sums = torch.cat([sum_dy, sum_dy_xhat])
            if ctx.world_size > 1:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.process_group)
            mean_dy = sums[:channels] / count
            mean_dy_xhat = sums[channels:] / count
            scale = torch.rsqrt(var + ctx.eps)
            if weight is not None:
                scale = scale * weight.to(acc)
            grad = dy - _per_channel(mean_dy, x)
            grad.addcmul_(xhat, _per_channel(mean_dy_xhat, x), value=-1.0)
            grad_x = grad.mul_(_per_channel(scale, x)).to(x.dtype)
        # the parameters' gradients stay local, as in torch's SyncBatchNorm: DDP averages them
        grad_w = sum_dy_xhat.to(weight.dtype) if need_w and weight is not None else None
        grad_b = sum_dy.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization over the global batch of all processes, with no host sync.

    Batch normalization (Ioffe & Szegedy, ICML 2015): ``y = (x - E[x]) / sqrt(Var[x] + eps) *
    weight + bias`` per channel, with the biased batch variance, and running estimates
    (unbiased variance) for evaluation. In training under ``torch.distributed`` with more than
    one process in ``process_group``, ``E`` and ``Var`` are taken over the concatenation of all
    processes' batches, exactly like ``torch.nn.SyncBatchNorm``, so a layer behaves as if one
    process saw the whole batch: SimSiam's official recipe. Otherwise (evaluation, one process,
    or no process group) it is ``torch.nn.BatchNorm{1,2,3}d`` (``F.batch_norm``).

    Differences from ``torch.nn.SyncBatchNorm``:

    - no host<->device synchronization anywhere (no empty-rank mask, no ``.item()`` for
      ``momentum=None``), so the layer can be captured in a CUDA graph and never stalls the
      kernel queue in eager mode; ``momentum=None`` also works without a sync in one process;
    - runs on any device with any backend (CPU with gloo, CUDA with NCCL), from plain tensor
      ops plus ``F.batch_norm``;
    - one all_reduce of ``[sum x, sum x^2, count]`` instead of an all_gather of per-rank mean,
      invstd and count (float32 ``E[x^2] - E[x]^2``: see the module docstring for its error);
    - statistics in float32 for any input dtype, output in the input's dtype (what cuDNN BN
      does under autocast). As in torch, ``weight``/``bias`` gradients are the local sums,
      which DDP averages across ranks, and the input gradient uses the global batch.

    Accepts ``[N, C]``, ``[N, C, L]``, ``[N, C, H, W]`` (any memory format, channels_last
    included) and ``[N, C, D, H, W]``. Every rank must call every layer the same number of
    times (each call is a collective); batch sizes may differ between ranks.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance before the square root.
        momentum: weight of the new batch statistic in the running estimates, or None for a
            cumulative average (``1 / num_batches_tracked``, kept on the device).
        affine: learnable per-channel ``weight`` and ``bias``.
        track_running_stats: keep running estimates; without them evaluation uses batch
            statistics (of the local batch, as torch's SyncBatchNorm does).
        process_group: the group whose batches are pooled; None for the default (world) group.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input [N, C, ...] (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input``; in training, pool statistics over ``process_group``."""
        self._check_input_dim(input)
        if not self.training:
            # evaluation: the running estimates, or batch statistics when there are none
            use_batch = self.running_mean is None and self.running_var is None
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight,
                                self.bias, use_batch, 0.0, self.eps)

        track = self.track_running_stats and self.running_mean is not None \
            and self.running_var is not None
        factor: float | Tensor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, on the device (no float(t))
                factor = torch.reciprocal(self.num_batches_tracked.to(torch.float32))
        world_size = _world_size(self.process_group)
        if world_size == 1 and not isinstance(factor, Tensor):
            # one process: exactly torch's BatchNorm (the same kernel, bit for bit)
            return F.batch_norm(input, self.running_mean if track else None,
                                self.running_var if track else None, self.weight, self.bias,
                                True, factor, self.eps)
        if world_size == 1 and input.numel() // max(input.shape[1], 1) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
        out: Tensor = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean if track else None,
            self.running_var if track else None, factor, self.eps, self.process_group,
            world_size)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Same as :func:`convert_sync_batchnorm` (the ``torch.nn.SyncBatchNorm`` spelling)."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every BatchNorm in ``module`` by fastsiam's :class:`SyncBatchNorm`.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: every ``_BatchNorm`` (BatchNorm1d,
    2d, 3d, affine or not, and torch's SyncBatchNorm) becomes a :class:`SyncBatchNorm` that
    shares its parameters and buffers (the same tensors, so values, ``requires_grad``, device
    and dtype carry over, and the state dict keys stay the same), with the same training flag;
    existing fastsiam SyncBatchNorms are left alone. Children are replaced in place; a
    BatchNorm passed as ``module`` itself comes back as a new object. Convert before wrapping
    the model in ``DistributedDataParallel``.
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        ref = module.weight if module.weight is not None else module.running_mean
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group,
                            device=None if ref is None else ref.device,
                            dtype=None if ref is None else ref.dtype)
        with torch.no_grad():
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
