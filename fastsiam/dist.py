"""Process-group setup for torchrun, and the few collectives the trainer needs.

fastsiam never launches processes itself: ``torchrun --nproc-per-node G [--nnodes N ...]
-m fastsiam train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, and
:func:`init_distributed` joins the group with NCCL on GPUs or gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

log = logging.getLogger("fastsiam")
NCCL_ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(name: str, local_rank: int = 0, *, key: str = "train.device") -> torch.device:
    """``auto`` picks ``cuda:<local_rank>`` when a GPU exists, else the CPU.

    A device this machine cannot give is a :class:`ValueError` naming ``key`` (the config key
    or argument the name came from) and what would work: it is the user's value that is wrong
    here, and the CLI prints ValueErrors as one line.
    """
    target = name
    if name == "auto":
        target = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(target)
    except RuntimeError:
        raise ValueError(f"{key}={name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={name!r} asks for CUDA, but torch sees no GPU "
                             f"(torch.cuda.is_available() is False); use cpu or auto")
        by_rank = device.index is None
        if by_rank:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(f"{key}={name!r}: this machine has {count} GPUs (cuda:0 to cuda:{count - 1})"
                             + (f"; local rank {local_rank} has none" if by_rank else ""))
        torch.cuda.set_device(device)
    return device


def init_distributed(backend: str, device: torch.device, *, capture: bool = False,
                     timeout_s: float | None = None) -> DistInfo:
    """Join torchrun's process group (no-op for a single process).

    ``capture``: the training step will be captured as a CUDA graph with DDP's all-reduce in
    it. PyTorch's CUDA-graph notes ("Usage with DistributedDataParallel") then ask for NCCL's
    asynchronous error handling off (``TORCH_NCCL_ASYNC_ERROR_HANDLING=0``) before the process
    group is created: its watchdog thread polls each collective's CUDA event, and an event
    query from another thread while a stream is capturing invalidates the capture.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo()
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if capture and backend == "nccl":
        previous = os.environ.get(NCCL_ASYNC_ERROR_HANDLING)
        if previous not in (None, "0"):
            log.warning("train.step=graph with DDP: setting %s=0 (was %s), as CUDA graphs need",
                        NCCL_ASYNC_ERROR_HANDLING, previous)
        os.environ[NCCL_ASYNC_ERROR_HANDLING] = "0"
    if not torch_dist.is_initialized():
        extra: dict[str, Any] = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        torch_dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                      **_attempt_store(), **extra)
    return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def join(device: str, backend: str = "auto", timeout_s: float | None = None) -> tuple[torch.device, DistInfo]:
    """This process's device (``cuda:<local rank>`` for ``auto``/``cuda`` under torchrun) and
    its place in the process group: what an evaluation command needs to run on N processes."""
    dev = resolve_device(device, local_rank_from_env())
    return dev, init_distributed(backend, dev, timeout_s=timeout_s)


def _attempt_store() -> dict[str, Any]:
    """``store``/``rank``/``world_size`` for ``init_process_group`` when torchrun restarts workers.

    Since torch 2.4 torchrun's c10d rendezvous shares its TCP store with the workers
    (``TORCHELASTIC_USE_AGENT_STORE=True``), and the store outlives a restart: the process
    group of the next attempt finds the previous attempt's addresses under the same keys and
    connects to dead workers (gloo: connection refused or a hang; NCCL: a stale unique id),
    pytorch/pytorch#135712. Prefixing the keys by the attempt (``TORCHELASTIC_RESTART_COUNT``)
    gives every attempt fresh ones. The count is the same on every rank of one torchrun
    agent; with several nodes, an agent that restarts its workers for a membership change
    does not count it, so multi-node launchers also set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    (scripts/slurm_train.sh does), which gives every rendezvous round a store of its own.
    Empty (torch's default ``env://`` setup) when the store is not the agent's.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in env:
        return {}
    world_size = int(env["WORLD_SIZE"])
    store = torch_dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False)
    attempt = f"fastsiam/{env.get('TORCHELASTIC_RUN_ID', 'run')}/attempt_{env['TORCHELASTIC_RESTART_COUNT']}/"
    return {"store": torch_dist.PrefixStore(attempt, store), "rank": int(env["RANK"]), "world_size": world_size}


def wrap_ddp(model: nn.Module, device: torch.device, *, capture: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)``; with ``capture`` (a CUDA-graph step) on CUDA,
    constructed inside a side-stream context, a condition of PyTorch's CUDA-graph notes
    ("Usage with DistributedDataParallel"): the constructor's collectives (the parameter
    broadcast) then do not run on the default stream, which a later capture must not depend on.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    if not (capture and device.type == "cuda"):
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    current.wait_stream(side)
    return wrapped


def local_rank_from_env() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch_dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a SIGTERM seen by one process)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    t = t.clone()
    torch_dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    t = t.clone()
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t


def all_gather(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``[world_size, *t.shape]``: every rank's ``t`` (the same shape on every rank)."""
    if not info.enabled:
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    torch_dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def shard_rows(loader: Any) -> torch.Tensor:
    """A bool mask over the rows an evaluation loader yields on this rank, in order: False for
    the padding its sampler repeats to give every rank as many samples
    (:mod:`fastsiam.data.sampler`), so a sharded evaluation counts every image exactly once."""
    s = loader.sampler
    n = len(s.rank_indices())
    return torch.arange(n) * s.world_size + s.rank < s.num_samples


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return all_reduce_sum(t, info) / info.world_size if info.enabled else t
