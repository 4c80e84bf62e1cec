"""fastsiam.sync_batchnorm: the global-batch BN of 2 gloo processes equals BN on the whole batch.

Two CPU processes (gloo, file:// rendezvous) each get their slice of a fixed global batch; the
reference is ``nn.BatchNorm1d/2d`` in float64 on the concatenated batch in this process. One
spawn runs every case (a module-scoped fixture); ranks save their results with torch.save and
the assertions happen here. Tolerances: float32 input rtol=1e-5, atol=1e-6 (float32 rounding);
bf16/fp16 input: output and input gradient to one ulp (rtol=2**-8 / 2**-10, atol=1e-5; they are
computed in float32 and rounded once), statistics and parameter gradients to float32 rounding
(computed in float32 from the exact bf16/fp16 values). The DDP model's parameter gradients: atol
1e-5 x max|grad| (float32 torch itself is off by 2.5e-6 x max|grad| on that network).
"""

from __future__ import annotations

import copy
import datetime
from collections import Counter
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastsiam.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

WORLD = 2
STEPS = 3
FP32_TOL = {"rtol": 1e-5, "atol": 1e-6}
LOW_TOL = {torch.bfloat16: {"rtol": 2.0**-8, "atol": 1e-5}, torch.float16: {"rtol": 2.0**-10, "atol": 1e-5}}

# name -> (global shape, options); "split" is the per-rank batch size (default: even halves)
CASES: dict[str, dict[str, Any]] = {
    "2d_channels_last": {"shape": (8, 4, 5, 5), "channels_last": True},
    "2d_affine_false_cma": {"shape": (8, 4, 3, 3), "affine": False, "momentum": None},
    "1d_nc": {"shape": (12, 16)},
    "1d_ncl_cma": {"shape": (8, 6, 7), "momentum": None},
    "2d_uneven_split": {"shape": (7, 3, 4, 4), "split": (5, 2)},
    "2d_bf16_channels_last": {"shape": (8, 4, 5, 5), "channels_last": True, "dtype": torch.bfloat16},
    "2d_fp16_cma": {"shape": (8, 3, 4, 4), "dtype": torch.float16, "momentum": None},
    "2d_no_running_stats": {"shape": (6, 3, 4, 4), "track_running_stats": False},
}
FORBIDDEN = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.masked_select"}


def _case_data(name: str, shape: tuple[int, ...]) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
    """STEPS (input, upstream gradient) pairs of the global batch, and initial weight/bias."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    c = shape[1]
    offset = torch.linspace(-2.0, 3.0, c).view(1, c, *([1] * (len(shape) - 2)))
    steps = [(torch.randn(shape, generator=gen) * 1.5 + offset, torch.randn(shape, generator=gen))
             for _ in range(STEPS)]
    weight = 1.0 + 0.5 * torch.randn(c, generator=gen)
    bias = 0.5 * torch.randn(c, generator=gen)
    return steps, weight, bias


def _bounds(cfg: dict[str, Any], rank: int) -> tuple[int, int]:
    split = cfg.get("split") or (cfg["shape"][0] // WORLD,) * WORLD
    return sum(split[:rank]), sum(split[:rank + 1])


def _bn_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"momentum": cfg.get("momentum", 0.1), "affine": cfg.get("affine", True),
            "track_running_stats": cfg.get("track_running_stats", True)}


class OpRecorder(TorchDispatchMode):
    """Counts every aten/c10d op that runs under it (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func.overloadpacket).replace("torch.ops.", "")] += 1
        return func(*args, **(kwargs or {}))


def _run_case(name: str, cfg: dict[str, Any], rank: int) -> dict[str, Any]:
    steps, weight, bias = _case_data(name, cfg["shape"])
    lo, hi = _bounds(cfg, rank)
    dtype = cfg.get("dtype", torch.float32)
    m = SyncBatchNorm(cfg["shape"][1], **_bn_kwargs(cfg))
    if m.affine:
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
    out: dict[str, Any] = {"y": [], "dx": [], "dw": [], "db": []}
    for x, g in steps:
        xs = x[lo:hi].to(dtype)
        if cfg.get("channels_last"):
            xs = xs.contiguous(memory_format=torch.channels_last)
        xs.requires_grad_(True)
        y = m(xs)
        assert y.dtype == dtype and y.shape == xs.shape
        if cfg.get("channels_last"):
            assert y.is_contiguous(memory_format=torch.channels_last)
        (y * g[lo:hi].to(dtype)).sum().backward()
        out["y"].append(y.detach())
        out["dx"].append(xs.grad)
        if m.affine:  # the local sums; summed over the ranks here, as DDP would (x world)
            for key, p in (("dw", m.weight), ("db", m.bias)):
                assert p.grad is not None
                total = p.grad.clone()
                dist.all_reduce(total)
                out[key].append(total)
                p.grad = None
    if m.track_running_stats:
        out.update(mean=m.running_mean, var=m.running_var, nbt=m.num_batches_tracked)
    return out


def _ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6, bias=False),
        nn.BatchNorm1d(6, affine=False),
    )


def _ddp_data() -> tuple[list[Tensor], list[Tensor]]:
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 3, 6, 6, generator=gen) + 0.5 for _ in range(2)]
    gs = [torch.randn(8, 6, generator=gen) for _ in range(2)]
    return xs, gs


def _run_ddp(rank: int) -> dict[str, Any]:
    """convert, then wrap in DDP; DDP's averaged grads x WORLD = the global-batch grads."""
    model = convert_sync_batchnorm(_ddp_model())
    ddp = nn.parallel.DistributedDataParallel(model)
    xs, gs = _ddp_data()
    out: dict[str, Any] = {"y": [], "grads": []}
    for x, g in zip(xs, gs):
        y = ddp(x[rank * 4:(rank + 1) * 4])
        (y * g[rank * 4:(rank + 1) * 4]).sum().backward()
        out["y"].append(y.detach())
        out["grads"].append({k: p.grad.clone() for k, p in model.named_parameters()})  # type: ignore[union-attr]
        model.zero_grad(set_to_none=True)
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def _run_dispatch(rank: int) -> dict[str, Any]:
    """The ops of training forward+backward, channels_last, float and None momentum."""
    out: dict[str, Any] = {}
    for momentum in (0.1, None):
        m = SyncBatchNorm(4, momentum=momentum)
        x = torch.randn(4, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with OpRecorder() as rec:
            (m(x) * 2.0).sum().backward()
        out[f"sync_{momentum}"] = dict(rec.ops)
    ref = nn.BatchNorm2d(4, momentum=None)  # positive control: torch reads num_batches_tracked
    with OpRecorder() as rec:
        ref(torch.randn(4, 4, 5, 5)).sum().backward()
    out["torch_bn_none"] = dict(rec.ops)
    return out


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results: dict[str, Any] = {name: _run_case(name, cfg, rank) for name, cfg in CASES.items()}
        results["ddp"] = _run_ddp(rank)
        results["dispatch"] = _run_dispatch(rank)
        torch.save(results, f"{root}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(str(root),), nprocs=WORLD, join=True)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference_bn(cfg: dict[str, Any]) -> nn.Module:
    cls = nn.BatchNorm1d if len(cfg["shape"]) < 4 else nn.BatchNorm2d
    return cls(cfg["shape"][1], **_bn_kwargs(cfg)).double()


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_global_batchnorm(dist_results: list[dict[str, Any]], name: str) -> None:
    cfg = CASES[name]
    steps, weight, bias = _case_data(name, cfg["shape"])
    dtype = cfg.get("dtype", torch.float32)
    tol = LOW_TOL.get(dtype, FP32_TOL)
    ref = _reference_bn(cfg)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(weight)
            ref.bias.copy_(bias)
    for step, (x, g) in enumerate(steps):
        # the reference sees exactly the values the ranks got (bf16-rounded input and gradient)
        xr = x.to(dtype).double().requires_grad_(True)
        y = ref(xr)
        (y * g.to(dtype).double()).sum().backward()
        for rank, res in enumerate(dist_results):
            lo, hi = _bounds(cfg, rank)
            torch.testing.assert_close(res[name]["y"][step].double(), y[lo:hi].detach(), **tol)
            torch.testing.assert_close(res[name]["dx"][step].double(), xr.grad[lo:hi], **tol)
            if ref.affine:
                torch.testing.assert_close(res[name]["dw"][step].double(), ref.weight.grad, **FP32_TOL)
                torch.testing.assert_close(res[name]["db"][step].double(), ref.bias.grad, **FP32_TOL)
        ref.zero_grad(set_to_none=True)
    for res in dist_results:
        if ref.track_running_stats:
            torch.testing.assert_close(res[name]["mean"].double(), ref.running_mean, **FP32_TOL)
            torch.testing.assert_close(res[name]["var"].double(), ref.running_var, **FP32_TOL)
            assert res[name]["nbt"].item() == ref.num_batches_tracked.item() == STEPS
        else:
            assert "mean" not in res[name]


def test_ddp_after_convert_matches_global_batch(dist_results: list[dict[str, Any]]) -> None:
    ref = _ddp_model().double()
    xs, gs = _ddp_data()
    for step, (x, g) in enumerate(zip(xs, gs)):
        y = ref(x.double())
        (y * g.double()).sum().backward()
        for rank, res in enumerate(dist_results):
            got = res["ddp"]
            torch.testing.assert_close(got["y"][step].double(), y[rank * 4:(rank + 1) * 4].detach(), **FP32_TOL)
            for k, p in ref.named_parameters():  # DDP averages: x WORLD is the global grad
                # a 3-layer float32 network: plain torch in float32 is off by ~2.5e-6 x max|grad|
                # here (cancellation in the BN backward), so scale atol with the gradient
                assert p.grad is not None
                atol = 1e-5 * p.grad.abs().max().item()
                torch.testing.assert_close(got["grads"][step][k].double() * WORLD, p.grad, rtol=0, atol=atol)
        ref.zero_grad(set_to_none=True)
    for res in dist_results:
        state = res["ddp"]["state"]
        assert state.keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(state[k].to(v.dtype), v, **FP32_TOL)


def test_no_host_sync_ops(dist_results: list[dict[str, Any]]) -> None:
    for res in dist_results:
        control = res["dispatch"]["torch_bn_none"]
        assert control.get("aten._local_scalar_dense", 0) >= 1, "the recorder must see torch's sync"
        for key in ("sync_0.1", "sync_None"):
            ops = res["dispatch"][key]
            assert not FORBIDDEN & ops.keys(), sorted(FORBIDDEN & ops.keys())
            # one all_reduce in the forward, one in the backward
            assert {k: v for k, v in ops.items() if "allreduce" in k} == {"c10d.allreduce_": 2}, ops


def test_single_process_equals_batchnorm2d_bitwise() -> None:
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ours, ref = SyncBatchNorm(5), nn.BatchNorm2d(5)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    for _ in range(3):
        x = torch.randn(4, 5, 6, 6) * 2 + 1
        g = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = ours(xa), ref(xb)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)  # type: ignore[arg-type]
    for a, b in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad)):
        assert torch.equal(a, b)  # type: ignore[arg-type]
    for key, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], v), key
    ours.eval()
    ref.eval()
    x = torch.randn(3, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours(x), ref(x))


def test_single_process_cumulative_average_without_sync() -> None:
    """momentum=None in one process: torch reads num_batches_tracked on the host, ours not."""
    torch.manual_seed(0)
    ours, ref = SyncBatchNorm(3, momentum=None), nn.BatchNorm1d(3, momentum=None)
    for _ in range(3):
        x = torch.randn(10, 3) * 3 - 1
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with OpRecorder() as rec:
            ya = ours(xa)
            ya.sum().backward()
        assert not FORBIDDEN & rec.ops.keys()
        yb = ref(xb)
        yb.sum().backward()
        torch.testing.assert_close(ya, yb, **FP32_TOL)
        torch.testing.assert_close(xa.grad, xb.grad, **FP32_TOL)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **FP32_TOL)
    torch.testing.assert_close(ours.running_var, ref.running_var, **FP32_TOL)
    assert ours.num_batches_tracked.item() == 3
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 3))


def test_convert_resnet18() -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = nn.Sequential(resnet18(weights=None), nn.Linear(1000, 8), nn.BatchNorm1d(8, affine=False))
    model.train()
    with torch.no_grad():  # non-trivial running statistics and num_batches_tracked
        model(torch.randn(4, 3, 32, 32))
    model[0].bn1.weight.requires_grad_(False)
    model.eval()
    model[0].layer1[0].bn2.train()  # a mixed training flag must survive
    before = copy.deepcopy(model)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    keep = SyncBatchNorm(8)
    model.add_module("already", keep)

    out = convert_sync_batchnorm(model)
    assert out is model and model.already is keep
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == n_bn + 1 and all(type(m) is SyncBatchNorm for m in bns)
    assert n_bn == 21  # 20 in resnet18, the projector's affine=False one
    assert model[2].weight is None and model[2].bias is None and not model[2].affine
    assert not model[0].bn1.weight.requires_grad and model[0].bn1.bias.requires_grad
    assert model[0].layer1[0].bn2.training and not model[0].bn1.training
    new_state = {k: v for k, v in model.state_dict().items() if not k.startswith("already.")}
    assert new_state.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(new_state[k], v), k
    model[0].layer1[0].bn2.eval()
    before[0].layer1[0].bn2.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model[:3](x), before(x))


def test_convert_keeps_dtype_and_single_module() -> None:
    bn = nn.BatchNorm2d(3, momentum=None, eps=1e-3).double()
    bn.num_batches_tracked.fill_(7)
    out = convert_sync_batchnorm(bn)
    assert type(out) is SyncBatchNorm and out is not bn
    assert out.weight is bn.weight and out.running_var is bn.running_var
    assert out.weight.dtype == torch.float64 and out.eps == 1e-3 and out.momentum is None
    assert out.num_batches_tracked.item() == 7
    assert SyncBatchNorm.convert_sync_batchnorm(out) is out
    torch_sync = convert_sync_batchnorm(nn.SyncBatchNorm(4, track_running_stats=False))
    assert type(torch_sync) is SyncBatchNorm and torch_sync.running_mean is None
