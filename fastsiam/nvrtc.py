"""Runtime-compiled CUDA kernels: compiled once per device by ``torch.cuda._compile_kernel``
(NVRTC inside libtorch, torch >= 2.8: no nvcc, no Triton), launched on the current stream.

A compiled module belongs to the device it was loaded on, so each launch makes that device
current. Used by the fused augmentation (:mod:`fastsiam.augment.fused`) and the nvjpeg
backend's crop-resize (:mod:`fastsiam.data.resample_kernel`); tests replace a module's
``_kernel`` with a host build of the same source.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LAUNCHERS: dict[tuple[int, str, torch.device], Callable[..., None]] = {}


def launcher(source: str, name: str, device: torch.device, what: str) -> Callable[..., None]:
    """``launch(grid=, block=, args=)`` for kernel ``name`` of ``source`` on ``device``
    (compiled at the first call for each); ``what`` names the caller in the error a non-CUDA
    device gets."""
    if device.type != "cuda":
        raise RuntimeError(f"{what}: CUDA only, got {device}")
    key = (hash(source), name, device)
    if key not in _LAUNCHERS:
        with torch.cuda.device(device):
            compiled = torch.cuda._compile_kernel(source, name)

        def launch(**launch_args: object) -> None:
            with torch.cuda.device(device):
                compiled(**launch_args)

        _LAUNCHERS[key] = launch
    return _LAUNCHERS[key]
