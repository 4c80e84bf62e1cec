"""The online linear probe: a classifier trained beside SimSiam on its detached features.

As solo-learn trains one (da Costa et al., "solo-learn: A Library of Self-supervised Methods for
Visual Representation Learning", JMLR 2022): a linear layer on the pooled backbone features of
the first view, trained in the same step from the labels the loader already carries, scored on
the val split after every epoch. It is a running estimate of what linear evaluation will find,
without a second job; it trails the offline protocol (its features move while it learns, and
it sees augmented crops), so it tells a run's trend, not its final number.

The SimSiam update is unchanged by it, bit for bit: its features are detached (no gradient
reaches the backbone), it has its own optimizer (momentum SGD, no weight decay, its lr
``eval.online_probe_lr`` on the same schedule curve as the encoder's), its loss is added after the SimSiam loss is scaled (fp16) so the SimSiam
gradients are the same numbers, and it is initialized from its own generator, so creating it
takes no draw from the global random stream that seeds the model and the data.

Contract with the step (:mod:`fastsiam.step`): the model's forward returns the first view's
pooled features (``SimSiam.forward(..., features=True)``); the step adds :meth:`OnlineProbe.loss`
(float32, outside autocast) to its backward and calls :meth:`OnlineProbe.step` after the
optimizer's. Every operation is a device op: it is captured with the rest of a graph step, its
labels a static input. Under DDP its head is wrapped too, so every rank's probe is the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsiam.dist import DistInfo, wrap_ddp
from fastsiam.features import autocast, score_logits
from fastsiam.optim import SGD
from fastsiam.optim.factory import resolve_impl

INIT_STD = 0.01  # the head's weights ~ N(0, 0.01^2), biases 0 (main_lincls.py's init)


class OnlineProbe:
    """A linear head on pooled features, with its own SGD.

    Args:
        feat_dim: the backbone's feature width (``SimSiam.feat_dim``).
        num_classes: the labels' range.
        device: where the head lives.
        lr: the peak lr (the trainer gives ``eval.online_probe_lr``; its own schedule
            writes the lr tensor each step, as the encoder's does).
        momentum: SGD momentum.
        seed: seeds the head's initialization (its own generator, not the global one).
        dist_info: under torchrun the head is wrapped in DDP (gradients averaged over ranks).
        capture: the head's DDP is built for a CUDA-graph step (:func:`fastsiam.dist.wrap_ddp`).
    """

    def __init__(self, feat_dim: int, num_classes: int, *, device: torch.device | str, lr: float,
                 momentum: float = 0.9, seed: int = 0, dist_info: DistInfo | None = None,
                 capture: bool = False):
        if num_classes < 1:
            raise ValueError(f"OnlineProbe: num_classes must be >= 1, got {num_classes}")
        device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        # skip_init: nn.Linear's own init would draw from the global generator
        self.head = nn.utils.skip_init(nn.Linear, feat_dim, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, feat_dim, generator=g) * INIT_STD)
            self.head.bias.zero_()
        self.head.to(device)
        self.module: nn.Module = self.head
        if dist_info is not None and dist_info.enabled:
            self.module = wrap_ddp(self.head, device, capture=capture)
        self.optimizer = SGD(self.head.parameters(), lr=lr, momentum=momentum, weight_decay=0.0,
                             impl=resolve_impl("auto", device, ("foreach", "fused")))
        self.device = device

    def loss(self, features: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy of the head on ``features`` (detached, in float32) against ``labels``."""
        logits = self.module(features.detach().float())
        return F.cross_entropy(logits, labels)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, found_inf: Tensor | None = None) -> None:
        """The head's update (the identity where ``found_inf`` is 1)."""
        self.optimizer.step(found_inf=found_inf)

    def state_tensors(self) -> list[Tensor]:
        """Everything its step mutates (weights, momentum, created now if not yet): what a
        graph step's warm-up puts back."""
        self.optimizer.init_state()
        tensors = [*self.head.parameters()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
        return tensors

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, loader: Iterable[Any], *, mean: Sequence[float],
                 std: Sequence[float], amp: str, info: DistInfo | None = None) -> dict[str, float]:
        """Top-1 / top-5 (percent) of the probe on ``loader`` (an EvalBatch loader, this rank's
        shard of the val split) through ``backbone`` in eval mode (restored after)."""
        was_training = backbone.training
        backbone.eval()

        def logits(x: Tensor) -> Tensor:
            with autocast(self.device, amp):
                feats = backbone(x)
            return self.head(feats.float())

        try:
            return score_logits(logits, loader, self.device, mean=mean, std=std, info=info,
                                desc="probe", show_progress=False)
        finally:
            backbone.train(was_training)

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
