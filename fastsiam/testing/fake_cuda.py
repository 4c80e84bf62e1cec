"""Fake CUDA: run the GPU code paths on a machine without a GPU and see every op they launch.

PyTorch's ``FakeTensorMode`` (``torch._subclasses.fake_tensor``) makes tensors that carry a
device, dtype, shape and strides but no data, so ``torch.empty(..., device="cuda")`` works
without a driver, and every aten op computes only its output's metadata. A
``TorchDispatchMode`` on top of it sees each of those ops as it is dispatched. Together they
show, on the CPU, what the GPU code would do to the host:

- **host<->device copies**: ``x.cpu()``, ``x.to("cuda")``, ``torch.tensor([...], device=
  "cuda")`` (built on the host, then copied), and a CPU tensor given to a CUDA op (an index
  built from a Python list: PyTorch copies it to the device inside the op);
- **host synchronizations**: ``item()`` / ``float(t)`` / ``bool(t)`` (``_local_scalar_dense``),
  ``is_nonzero``, ``nonzero``, ``masked_select``, boolean-mask indexing (output shape known
  only after reading the mask), ``equal``, and the explicit ``torch.cuda.synchronize()``,
  ``Stream.synchronize()``, ``Event.synchronize()``;
- **kernels and bytes**: every non-view op on a CUDA tensor, with the bytes of its CUDA
  operands (read) and results (written) — a traffic model, not a measurement: each operand
  counted once in full (expanded dimensions once), no caches, no fusion.

Any of the first two inside a captured CUDA graph is an error at capture (or a silent wrong
replay), and outside one a stall of the host. :func:`fake_cuda` also stands in for the parts
of ``torch.cuda`` that need a driver (device queries, streams, events, graphs, generators), so
code such as :class:`fastsiam.step.GraphStep` runs unchanged: the body of
``with torch.cuda.graph(g):`` is traced as the region ``"cuda graph capture"`` and
``g.replay()`` is recorded as one launch.

    with fake_cuda() as trace:
        model = SimSiam("resnet50").to("cuda", memory_format=torch.channels_last)
        ...
        step(batch)                       # GraphStep: warm-up, capture, first replay
    trace.assert_clean(region=CAPTURE)    # no copy, no sync inside the captured region
    print(trace.summary(region=CAPTURE))  # kernels, bytes

Limits: modes are thread-local, so only the calling thread is traced (loader threads are
not); values are never computed, so a sync returns a stand-in (0, False, or an empty result)
and the run goes on to report every later one; ops without a fake kernel that fastsiam uses
are listed in :data:`OPAQUE_OPS` and recorded as one kernel without running.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConverter, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["CAPTURE", "OPAQUE_OPS", "DeviceOp", "DeviceTrace", "fake_cuda"]

CAPTURE = "cuda graph capture"
aten = torch.ops.aten

# Ops that read a device value on the host, or whose output shape depends on device values.
_SYNC_OPS = {
    aten._local_scalar_dense.default: "reads a device value on the host (item/float/int/bool)",
    aten.is_nonzero.default: "reads a device value on the host (bool(tensor) / if tensor)",
    aten.nonzero.default: "output shape depends on device values (nonzero)",
    aten.masked_select.default: "output shape depends on device values (masked_select)",
    aten.equal.default: "returns a Python bool computed on the device (torch.equal)",
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
              aten._index_put_impl_.default}
# Allocation and bookkeeping: no kernel runs.
_NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten.lift_fresh.default,
    aten.detach.default, aten.record_stream.default, aten.set_.source_Storage_storage_offset,
    aten.resize_.default,
}
#: Ops with no fake kernel in torch 2.14 that fastsiam's GPU path uses. They are recorded as one
#: kernel that reads and writes its tensor arguments, and skipped (they return nothing). The
#: ``@pytest.mark.cuda`` tests run them for real.
OPAQUE_OPS = {
    aten._fused_sgd_.default: "torch's fused SGD kernel asks for a driver under FakeTensorMode",
    aten._fused_sgd_.tensor_lr: "torch's fused SGD kernel asks for a driver under FakeTensorMode",
    aten.record_stream.default: "allocator bookkeeping (no kernel); needs a driver",
}
_PROBLEMS = ("h2d", "d2h", "sync")


@dataclass(frozen=True)
class DeviceOp:
    """One recorded event.

    Attributes:
        name: the aten op (``aten.add.Tensor``) or the ``torch.cuda`` call.
        kind: ``kernel``, ``h2d`` / ``d2h`` (a copy between host and device), ``sync`` (the
            host waits for the device), or ``launch`` (a graph replay: one launch of many
            kernels).
        nbytes: device bytes read + written (the traffic model of the module docstring).
        region: the innermost named region when it ran (``None`` outside every region).
        where: ``file:line in function`` of the first caller outside torch, for copies and
            syncs, and for kernels with ``DeviceTrace(callers=True)`` (else ``None``:
            collecting stacks for every op is slow).
        why: what makes a copy or sync one, in words.
    """

    name: str
    kind: str
    nbytes: int
    region: str | None
    where: str | None = None
    why: str | None = None

    def describe(self) -> str:
        return f"{self.kind:6s} {self.name}: {self.why} at {self.where}"


def _touched_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading/writing ``t`` once (an expanded dimension counts once)."""
    elems = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1
    return elems * t.element_size()


def _is_cuda(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


def _caller() -> str:
    """The innermost stack frame outside torch and this module, as ``path:line in func``."""
    here = Path(__file__).resolve()
    torch_dir = Path(torch.__file__).resolve().parent
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path == here or torch_dir in path.parents or "contextlib" in path.name:
            continue
        try:
            shown = str(path.relative_to(Path.cwd()))
        except ValueError:
            shown = str(path)
        return f"{shown}:{frame.lineno} in {frame.name}"
    return "<unknown>"


class DeviceTrace(TorchDispatchMode):
    """Records every op that touches a CUDA tensor; see the module docstring.

    Use it through :func:`fake_cuda`. :meth:`region` names a part of the run, and every query
    takes ``region=`` to look at that part only. With ``callers`` every kernel also records
    the line that launched it (slower; for attributing traffic to functions).
    """

    def __init__(self, callers: bool = False) -> None:
        super().__init__()
        self.ops: list[DeviceOp] = []
        self._regions: list[str] = []
        self.callers = callers

    # ---------------------------------------------------------------- recording

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Label the ops run inside the block (regions nest; the innermost name is kept)."""
        self._regions.append(name)
        try:
            yield
        finally:
            self._regions.pop()

    @property
    def current_region(self) -> str | None:
        return self._regions[-1] if self._regions else None

    def record(self, name: str, kind: str, nbytes: int = 0, why: str | None = None) -> None:
        where = _caller() if kind != "kernel" or self.callers else None
        self.ops.append(DeviceOp(name, kind, nbytes, self.current_region, where, why))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        on_device = any(_is_cuda(x) for x in leaves)
        name = str(func)
        if func in _SYNC_OPS or (func in _INDEX_OPS and _has_mask_index(args)):
            if on_device:
                self.record(name, "sync", why=_SYNC_OPS.get(
                    func, "boolean-mask indexing (the mask's nonzero is read on the host)"))
            return _stand_in(func, args, kwargs)
        if func in OPAQUE_OPS:
            if func is not aten.record_stream.default:
                self.record(name, "kernel", 2 * sum(_touched_bytes(x) for x in leaves if _is_cuda(x)))
            return None
        out = func(*args, **kwargs)
        if on_device or any(_is_cuda(x) for x in tree_leaves(out)):
            self._classify(func, name, args, kwargs, leaves, out)
        return out

    def _classify(self, func: Any, name: str, args: Any, kwargs: Any,
                  leaves: list[torch.Tensor], out: Any) -> None:
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0] if func is aten.copy_.default else out
            if src.device.type != dst.device.type:
                kind = "h2d" if dst.device.type == "cuda" else "d2h"
                why = ("host data copied to the device" if kind == "h2d"
                       else "device data copied to the host (waits for the device)")
                self.record(name, kind, _touched_bytes(src), why)
                return
        for x in leaves:
            # A CPU tensor that is not a 0-dim scalar, handed to a CUDA op, is copied to the
            # device inside the op (e.g. an index tensor built from a Python list).
            if x.device.type == "cpu" and (x.dim() > 0 or func in _INDEX_OPS):
                self.record(name, "h2d", _touched_bytes(x),
                            f"a cpu tensor {list(x.shape)} used by a cuda op is copied to the device")
        if func in _NO_KERNEL or func.namespace == "prim" or _is_view(func):
            return
        self.record(name, "kernel", _traffic(func, args, kwargs, out))

    # ---------------------------------------------------------------- queries

    def select(self, region: str | None = None, kind: str | None = None) -> list[DeviceOp]:
        """The recorded ops, optionally only those of ``region`` and/or ``kind``."""
        return [op for op in self.ops
                if (region is None or op.region == region) and (kind is None or op.kind == kind)]

    def problems(self, region: str | None = None) -> list[DeviceOp]:
        """Host<->device copies and host syncs (of ``region``)."""
        return [op for op in self.select(region) if op.kind in _PROBLEMS]

    def kernels(self, region: str | None = None) -> int:
        return len(self.select(region, "kernel")) + len(self.select(region, "launch"))

    def nbytes(self, region: str | None = None) -> int:
        return sum(op.nbytes for op in self.select(region))

    def counts(self, region: str | None = None) -> Counter[str]:
        """Number of ops per kind."""
        return Counter(op.kind for op in self.select(region))

    def report(self, region: str | None = None) -> str:
        """One line per copy or sync: kind, op, why, and the line of fastsiam code that did it."""
        lines = [op.describe() for op in self.problems(region)]
        return "\n".join(lines) if lines else "no host<->device copy or host sync"

    def summary(self, region: str | None = None) -> str:
        c = self.counts(region)
        return (f"{self.kernels(region)} kernels, {self.nbytes(region) / 1e9:.3f} GB, "
                f"{c['h2d']} h2d, {c['d2h']} d2h, {c['sync']} syncs")

    def assert_clean(self, region: str | None = None) -> None:
        """Raise ``AssertionError`` listing every host<->device copy and host sync."""
        problems = self.problems(region)
        if problems:
            scope = f"in {region!r}" if region else "in the trace"
            raise AssertionError(f"{len(problems)} host<->device copies/syncs {scope}:\n"
                                 + self.report(region))


def _is_view(func: Any) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


def _traffic(func: Any, args: Any, kwargs: Any, out: Any) -> int:
    """Bytes read (every CUDA operand) + written (every mutated operand and new CUDA result)."""
    schema = func._schema
    total = 0
    written: set[int] = set()
    bound = list(zip(schema.arguments, args)) + [
        (a, kwargs[a.name]) for a in schema.arguments if a.name in kwargs]
    for arg, value in bound:
        tensors = [x for x in tree_leaves(value) if _is_cuda(x)]
        mutated = arg.alias_info is not None and arg.alias_info.is_write
        for x in tensors:
            if not (mutated and arg.kwarg_only):  # out= is written, not read
                total += _touched_bytes(x)
            if mutated:
                total += _touched_bytes(x)
                written.add(id(x))
    for x in tree_leaves(out):
        if _is_cuda(x) and id(x) not in written:
            total += _touched_bytes(x)
    return total


def _has_mask_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in (indices or []))


def _stand_in(func: Any, args: Any, kwargs: Any) -> Any:
    """A plausible result for an op whose result needs device values: the run goes on."""
    x = args[0]
    if func is aten._local_scalar_dense.default:
        return False if x.dtype == torch.bool else (0.0 if x.is_floating_point() else 0)
    if func in (aten.is_nonzero.default, aten.equal.default):
        return False
    if func is aten.nonzero.default:
        return torch.empty((0, x.dim()), dtype=torch.long, device=x.device)
    if func is aten.masked_select.default:
        return torch.empty((0,), dtype=x.dtype, device=x.device)
    # Boolean-mask indexing: as if no element were selected (a mask of k dims -> k empty indices).
    indices = []
    for i in args[1]:
        if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8):
            indices += [torch.empty((0,), dtype=torch.long, device=i.device)] * i.dim()
        else:
            indices.append(i)
    return func(x, indices, *args[2:], **kwargs)


# -------------------------------------------------------------------- the fake torch.cuda runtime


class _FakeEvent:
    def __init__(self, runtime: _FakeRuntime, *args: Any, **kwargs: Any) -> None:
        self._runtime = runtime

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self._runtime.host_sync("torch.cuda.Event.synchronize")

    def elapsed_time(self, end: Any) -> float:
        self._runtime.host_sync("torch.cuda.Event.elapsed_time")
        return 0.0


class _FakeStream(torch.Stream):
    """A ``torch.Stream`` of device ``cuda:0`` (so ``Tensor.record_stream`` accepts it) whose
    methods never reach the driver."""

    _ids = itertools.count(1)

    def __new__(cls, runtime: _FakeRuntime, *args: Any, **kwargs: Any) -> _FakeStream:
        return super().__new__(cls, stream_id=next(cls._ids), device_index=0, device_type=1)

    def __init__(self, runtime: _FakeRuntime, *args: Any, **kwargs: Any) -> None:
        self._runtime = runtime

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _FakeEvent(self._runtime)

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self._runtime.host_sync("torch.cuda.Stream.synchronize")


class _FakeGraph:
    """``torch.cuda.CUDAGraph``: capture is traced by the runtime; a replay is one launch."""

    def __init__(self, runtime: _FakeRuntime, *args: Any, **kwargs: Any) -> None:
        self._runtime = runtime
        self.captured = False

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("fake CUDAGraph: replay() before capture")
        self._runtime.trace.record("torch.cuda.CUDAGraph.replay", "launch")

    def reset(self) -> None:
        self.captured = False

    def pool(self) -> tuple[int, int]:
        return (0, id(self))


def _backward(tensors: Any, grad_tensors: Any = None, retain_graph: Any = None,
              create_graph: bool = False, grad_variables: Any = None, inputs: Any = None) -> None:
    """``torch.autograd.backward`` without the autograd engine, which needs a driver for CUDA
    tensors (it asks the CUDA runtime for each device's current stream).

    The graph's nodes are called from Python in topological order (Kahn's algorithm), each
    gradient is conformed to its input as the engine does (summed to a broadcast input's shape,
    cast to its dtype), gradients flowing into the same input are summed, and leaves accumulate
    ``.grad`` (set, then ``+=``). The ops are those of a real backward: every node runs its own
    formula.
    Hooks do not fire (no DDP under fake CUDA); ``inputs`` and ``create_graph`` are refused.
    """
    if inputs is not None or create_graph:
        raise NotImplementedError("fake CUDA backward: inputs= and create_graph=True are not supported")
    roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    grads = grad_tensors if grad_tensors is not None else [None] * len(roots)
    grads = [grads] if isinstance(grads, torch.Tensor) else list(grads)
    pending: dict[Any, dict[int, torch.Tensor]] = {}
    for t, g in zip(roots, grads):
        if t.grad_fn is None:
            raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
        g = torch.ones_like(t, memory_format=torch.preserve_format) if g is None else g
        _accumulate(pending.setdefault(t.grad_fn, {}), t.output_nr, g)
    # Incoming edges per node among the nodes reachable from the roots.
    indegree: Counter[Any] = Counter()
    stack: list[Any] = [t.grad_fn for t in roots]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                indegree[nxt] += 1
                stack.append(nxt)
    ready: list[Any] = [n for n in {t.grad_fn for t in roots} if indegree[n] == 0]
    with torch.no_grad():
        while ready:
            node = ready.pop()
            inputs_ = pending.pop(node, {})
            if hasattr(node, "variable"):  # AccumulateGrad: a leaf
                if 0 in inputs_:
                    leaf = node.variable
                    if leaf.grad is None:
                        leaf.grad = inputs_[0].detach()
                    else:
                        leaf.grad += inputs_[0]
                outputs: Any = ()
            elif inputs_:
                args = [inputs_.get(i) for i in range(len(node._input_metadata))]
                # C++ nodes are callable; a custom Function's node runs its backward by apply.
                outputs = node(*args) if callable(node) else node.apply(*args)
                outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
            else:
                outputs = [None] * len(node.next_functions)
            for (nxt, input_nr), out in zip(node.next_functions, outputs):
                if nxt is None:
                    continue
                if out is not None:
                    _accumulate(pending.setdefault(nxt, {}), input_nr,
                                _conform(out, nxt._input_metadata[input_nr]))
                indegree[nxt] -= 1
                if indegree[nxt] == 0:
                    ready.append(nxt)


def _conform(grad: torch.Tensor, meta: Any) -> torch.Tensor:
    """The engine's ``validate_outputs``: a gradient is summed to its input's (broadcast) shape
    and cast to its dtype (autocast's casts are undone this way)."""
    if tuple(grad.shape) != tuple(meta.shape):
        grad = grad.sum_to_size(meta.shape)
    return grad if grad.dtype == meta.dtype else grad.to(meta.dtype)


def _accumulate(buffer: dict[int, torch.Tensor], index: int, grad: torch.Tensor) -> None:
    buffer[index] = grad if index not in buffer else buffer[index] + grad


_REAL_GENERATOR = torch.Generator


class _GeneratorType(type):
    """``torch.Generator`` under fake CUDA: a CUDA generator needs a driver, so one asked for
    on ``cuda`` is a CPU generator (fake ops draw no numbers anyway); ``isinstance`` checks
    still see the real class."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _REAL_GENERATOR)

    def __call__(cls, device: Any = "cpu") -> torch.Generator:
        return _REAL_GENERATOR() if torch.device(device).type == "cuda" else _REAL_GENERATOR(device)


class _Generator(metaclass=_GeneratorType):
    pass


class _FakeRuntime:
    """The driver-dependent parts of ``torch.cuda``, answered without a driver."""

    def __init__(self, trace: DeviceTrace) -> None:
        self.trace = trace
        self._local = threading.local()

    @property
    def _streams(self) -> list[_FakeStream]:
        if not hasattr(self._local, "streams"):
            self._local.streams = [_FakeStream(self)]
        return self._local.streams

    def host_sync(self, name: str) -> None:
        self.trace.record(name, "sync", why="the host waits for the device")

    def current_stream(self, device: Any = None) -> _FakeStream:
        return self._streams[-1]

    def default_stream(self, device: Any = None) -> _FakeStream:
        return self._streams[0]

    @contextlib.contextmanager
    def stream(self, stream: Any) -> Iterator[None]:
        self._streams.append(stream if stream is not None else self._streams[-1])
        try:
            yield
        finally:
            self._streams.pop()

    @contextlib.contextmanager
    def graph(self, cuda_graph: _FakeGraph, pool: Any = None, stream: Any = None,
              **kwargs: Any) -> Iterator[None]:
        with self.stream(stream or _FakeStream(self)), self.trace.region(CAPTURE):
            yield
        cuda_graph.captured = True

    def patches(self) -> dict[str, Any]:
        runtime = self
        return {
            "torch.cuda.is_available": lambda: True,
            "torch.cuda.is_bf16_supported": lambda *a, **k: True,
            "torch.cuda.device_count": lambda: 1,
            "torch.cuda.current_device": lambda: 0,
            "torch.cuda.set_device": lambda *a: None,
            "torch.cuda.get_device_name": lambda *a: "fake CUDA device",
            "torch.cuda.get_device_capability": lambda *a: (9, 0),
            "torch.cuda.device": lambda *a: contextlib.nullcontext(),
            "torch.cuda.synchronize": lambda *a: runtime.host_sync("torch.cuda.synchronize"),
            "torch.cuda.set_sync_debug_mode": lambda *a: None,
            "torch.cuda.empty_cache": lambda: None,
            "torch.cuda.current_stream": runtime.current_stream,
            "torch.cuda.default_stream": runtime.default_stream,
            "torch.cuda.stream": runtime.stream,
            "torch.cuda.graph": runtime.graph,
            "torch.cuda.Stream": lambda *a, **k: _FakeStream(runtime, *a, **k),
            "torch.cuda.Event": lambda *a, **k: _FakeEvent(runtime, *a, **k),
            "torch.cuda.CUDAGraph": lambda *a, **k: _FakeGraph(runtime, *a, **k),
            "torch.Generator": _Generator,
            "torch.autograd.backward": _backward,
        }


class _UnmemoizedConverter(FakeTensorConverter):
    """Fresh fake tensors (from factories such as ``torch.empty``) are not memoized.

    FakeTensorMode keeps a weak reference to each of them, and ``nn.Module.to()`` moves a fake
    parameter by ``torch.utils.swap_tensors``, which refuses a tensor with weak references:
    without this, a model built under fake CUDA could not be moved to ``cuda`` or to
    channels_last. Conversions of real tensors keep their memo.
    """

    def from_meta_and_device(self, fake_mode: FakeTensorMode, t: torch.Tensor,
                             device: torch.device, pytype: Any = None,
                             dispatch_keys: Any = None) -> FakeTensor:
        return FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)


class _DriverlessFakeTensorMode(FakeTensorMode):
    """FakeTensorMode that never touches a device, whatever ``torch.cuda.is_available()`` says
    (the runtime answers True for autocast's sake; FakeTensorMode would then try to place
    host-built tensors on the real device)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fake_tensor_converter.__class__ = _UnmemoizedConverter

    @property
    def avoid_device_init(self) -> bool:
        return True


@contextlib.contextmanager
def fake_cuda(callers: bool = False) -> Iterator[DeviceTrace]:
    """Fake CUDA tensors, a stand-in ``torch.cuda`` runtime, and a :class:`DeviceTrace`.

    Inside the block every tensor is fake (``FakeTensorMode``, real tensors made before it are
    converted on use), ``torch.cuda.is_available()`` is true, and the trace records every op
    on a CUDA tensor made by this thread. Keep work on real data outside the block.
    """
    trace = DeviceTrace(callers)
    runtime = _FakeRuntime(trace)
    with contextlib.ExitStack() as stack:
        for target, value in runtime.patches().items():
            stack.enter_context(mock.patch(target, value))
        stack.enter_context(_DriverlessFakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(trace)
        yield trace
