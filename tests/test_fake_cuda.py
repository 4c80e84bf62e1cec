"""The fake-CUDA checker itself, on toys whose kernels, bytes, copies and syncs are counted by
hand, and the fake runtime's stand-ins (streams, events, graphs, generators, backward)."""

from __future__ import annotations

import pytest
import torch

from fastsiam.testing.fake_cuda import CAPTURE, fake_cuda


def test_one_add_is_one_kernel_moving_its_operands_and_result() -> None:
    with fake_cuda() as trace:
        a = torch.empty(4, 8, device="cuda")                     # allocations: no kernel
        b = torch.empty(4, 8, device="cuda", dtype=torch.float16)
        with trace.region("add"):
            c = a + b                                            # reads 128 + 64, writes 128 B
            c.t()                                                # a view: no kernel
            c.add_(1.0)                                          # reads and writes 128 B
            torch.add(a, a, out=c)                               # reads 2 x 128, writes 128 B
            a[:1].expand(4, 8).sum()                             # reads one row (32 B), writes 4 B
    assert trace.kernels("add") == 4
    assert trace.nbytes("add") == (128 + 64 + 128) + 2 * 128 + 3 * 128 + (32 + 4)
    assert trace.problems("add") == []


def test_copies_and_syncs_are_named_with_their_line() -> None:
    with fake_cuda() as trace:
        x = torch.empty(4, 8, device="cuda")
        with trace.region("bad"):
            x[:, [0, 2]]                                  # list index: built on the host, copied
            torch.tensor([1.0, 2.0], device="cuda")       # host-built tensor
            x.sum().item()                                # read on the host
            x[x > 0]                                      # boolean mask: nonzero on the host
            x.nonzero()
            x.cpu()
            torch.cuda.synchronize()
            torch.cuda.current_stream().synchronize()
    kinds = [op.kind for op in trace.problems("bad")]
    assert kinds == ["h2d", "h2d", "sync", "sync", "sync", "d2h", "sync", "sync"]
    assert all("tests/test_fake_cuda.py:" in op.where for op in trace.problems("bad"))
    with pytest.raises(AssertionError, match="8 host<->device copies/syncs in 'bad'"):
        trace.assert_clean("bad")
    # Values are never computed: a sync gets a stand-in and the run goes on.
    with fake_cuda():
        x = torch.empty(4, 8, device="cuda")
        assert x.sum().item() == 0.0 and x[x > 0].shape == (0,) and x.nonzero().shape == (0, 2)


def test_host_scalars_and_device_fills_are_no_copies() -> None:
    with fake_cuda() as trace:
        x = torch.empty(4, 8, device="cuda")
        with trace.region("ok"):
            torch.where(x > 0, x, 1.0)               # the scalar is a kernel argument
            x * torch.tensor(2.0)                    # a 0-dim cpu tensor is passed by value
            torch.full((3,), 5.0, device="cuda")     # a fill kernel
            x.index_select(1, torch.arange(3, device="cuda"))
    trace.assert_clean("ok")


def test_graph_capture_region_replay_and_streams() -> None:
    with fake_cuda() as trace:
        assert torch.cuda.is_available() and torch.cuda.get_device_name() == "fake CUDA device"
        x = torch.empty(8, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            assert torch.cuda.current_stream() is side
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = x * 2
            y.sum().item()
        graph.replay()
        event = torch.cuda.Event()
        event.record()
        event.synchronize()
        g = torch.Generator(device="cuda")
        assert isinstance(g, torch.Generator)
        torch.rand(3, device="cuda", generator=g)
    assert trace.kernels(CAPTURE) == 2 and [op.kind for op in trace.problems(CAPTURE)] == ["sync"]
    assert trace.counts()["launch"] == 1
    assert [op.name for op in trace.problems() if op.region is None] == [
        "torch.cuda.Event.synchronize"]


def test_backward_without_the_engine_matches_autograd() -> None:
    """The fake runtime's backward (nodes called from Python) gives the engine's gradients:
    checked on real CPU tensors, with broadcasting, a shared input, a dtype cast and a custom
    autograd Function."""
    from fastsiam.testing.fake_cuda import _backward

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 3 * x * x * grad

    def grads(backward) -> list[torch.Tensor]:
        torch.manual_seed(0)
        w = torch.randn(5, 3, requires_grad=True)
        b = torch.randn(3, requires_grad=True)
        x = torch.randn(4, 5)
        h = x @ w + b                                   # b is broadcast
        loss = (h.relu() * h).sum() + h.to(torch.float64).square().mean() + Cube.apply(h).sum()
        backward(loss)
        return [w.grad, b.grad]

    ref = grads(lambda loss: loss.backward())
    ours = grads(_backward)
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r)


def test_opaque_fused_sgd_is_one_kernel() -> None:
    from torch.optim.sgd import sgd

    with fake_cuda() as trace:
        params = [torch.empty(10, device="cuda") for _ in range(3)]
        grads = [torch.empty(10, device="cuda") for _ in range(3)]
        bufs = [torch.empty(10, device="cuda") for _ in range(3)]
        lr = torch.full((), 0.1, device="cuda")
        with trace.region("sgd"):
            sgd(params, grads, bufs, fused=True, found_inf=None, weight_decay=0.0, momentum=0.9,
                lr=lr, dampening=0.0, nesterov=False, maximize=False)
    names = [op.name for op in trace.select("sgd", "kernel")]
    assert names == ["aten._fused_sgd_.tensor_lr"]
    trace.assert_clean("sgd")
