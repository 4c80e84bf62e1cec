"""Parameters and FLOPs of a model, in mmpretrain's model-card convention (``fastsiam info``).

mmpretrain's ``get_flops`` counts the forward of ``extract_feat`` (the backbone and its
pooling: no projector, predictor or classifier head) on one image, with mmengine's
fvcore-style analyzer, where one "FLOP" is one multiply-accumulate. Per module type:

- Conv2d: output elements x (input channels / groups) x kernel area;
- Linear: output elements x input features;
- BatchNorm in eval mode: 2 per element with an affine transform, 1 without;
- adaptive average pooling: 1 per input element;
- ReLU, max-pooling and residual additions: not counted.

Parameters count the whole model. For ResNet-50 at 224 px this gives the model card's
figures: 4.11 G for both the SimSiam model (38.20 M parameters) and the linear classifier
(25.56 M parameters). Counting uses forward hooks on a single input, so it runs in a
fraction of a second on the CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _module_flops(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        k = math.prod(module.kernel_size)
        return output.numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return inputs[0].numel() * (2 if module.affine else 1)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)):
        return inputs[0].numel()
    return 0


@torch.no_grad()
def count_flops(module: nn.Module, *inputs: Tensor, forward: Any = None) -> int:
    """Multiply-accumulates of one call of ``forward`` (default: ``module``) on ``inputs``.

    The module is put in eval mode for the count (BatchNorm's eval-mode cost) and restored.
    """
    total = 0

    def hook(m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        total += _module_flops(m, args, out)

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    was_training = module.training
    module.eval()
    try:
        (forward or module)(*inputs)
    finally:
        module.train(was_training)
        for h in handles:
            h.remove()
    return total


def model_info(name_or_config: Any, image_size: int | None = None) -> dict[str, Any]:
    """Parameters and FLOPs of a model-card name, a config file or a :class:`Config`.

    Returns ``{"name", "task", "params", "params_m", "flops", "gflops", "image_size",
    "params_per_class"}`` (the last for a linear config whose ``model.num_classes`` is null,
    the data's count: ``params`` is then without the head, which adds that many per class):
    ``params_m`` in millions, ``gflops`` in 10^9 multiply-accumulates per ``image_size`` px
    image of ``extract_feat`` (mmpretrain's convention, see the module docstring).
    ``image_size`` defaults to the config's ``data.image_size``, the views it trains on.
    """
    from fastsiam.api import build_model, resolve

    cfg, task, name = resolve(name_or_config)
    image_size = image_size or cfg.data.image_size
    # null: the data decides; count the backbone and say what each class adds
    head_from_data = task == "linear" and cfg.model.num_classes is None
    model = build_model(cfg, task, num_classes=1 if head_from_data else None)
    x = torch.zeros(1, 3, image_size, image_size)
    flops = count_flops(model, x, forward=model.extract_feat)
    params = count_params(model)
    per_class = count_params(model.fc) if head_from_data else None  # type: ignore[arg-type]
    params -= per_class or 0
    return {"name": name, "task": task, "params": params, "params_m": params / 1e6, "flops": flops,
            "gflops": flops / 1e9, "image_size": image_size, "params_per_class": per_class}
