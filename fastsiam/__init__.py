"""fastsiam: SimSiam self-supervised training at the speed of the hardware.

The Python API follows mmpretrain's: ``get_model``, ``list_models``, ``inference_model``
(imported lazily so that ``import fastsiam`` stays light).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "get_model": "fastsiam.api",
    "list_models": "fastsiam.api",
    "inference_model": "fastsiam.api",
    "SimSiam": "fastsiam.model",
    "load_config": "fastsiam.config",
    "build_loader": "fastsiam.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastsiam' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
