"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021).

The encoder is a torchvision ResNet whose ``fc`` is replaced by the 3-layer projector; the
predictor is a 2-layer bottleneck MLP. Numbers follow the paper and the official code:

- projector: Linear(c, c, bias=False)-BN-ReLU, Linear(c, c, bias=False)-BN-ReLU,
  Linear(c, dim)-BN(dim, affine=False), where c is the backbone width (2048 for ResNet-50);
  the last Linear's bias is dropped too because the BN right after it removes it anyway.
- predictor: Linear(dim, pred_dim, bias=False)-BN-ReLU-Linear(pred_dim, dim).
- loss: L = -(cos(p1, sg(z2)).mean() + cos(p2, sg(z1)).mean()) / 2, sg = stop-gradient.

ResNet-50 at dim=2048, pred_dim=512 has 38.20 M parameters (mmpretrain's model card).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import models

BACKBONES = ("resnet18", "resnet34", "resnet50")


def build_backbone(name: str = "resnet50", small_input: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier (``fc`` = Identity) and its feature width.

    ``zero_init_residual=True`` starts each residual branch at zero (the last BN's gamma), as
    the official SimSiam code does. ``small_input`` swaps the 7x7/2 stem and max-pool for a
    3x3/1 convolution, the usual CIFAR-size variant (images of 64 px or less).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    net = getattr(models, name)(weights=None, zero_init_residual=True)
    width = net.fc.in_features
    net.fc = nn.Identity()
    if small_input:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net, width


def projection_mlp(in_dim: int, dim: int) -> nn.Sequential:
    """SimSiam's projector (3 layers, BN on every output, no affine on the last)."""
    return nn.Sequential(
        nn.Linear(in_dim, in_dim, bias=False),
        nn.BatchNorm1d(in_dim),
        nn.ReLU(inplace=True),
        nn.Linear(in_dim, in_dim, bias=False),
        nn.BatchNorm1d(in_dim),
        nn.ReLU(inplace=True),
        nn.Linear(in_dim, dim, bias=False),
        nn.BatchNorm1d(dim, affine=False),
    )


def prediction_mlp(dim: int, pred_dim: int) -> nn.Sequential:
    """SimSiam's predictor h: a bottleneck MLP (no BN on its output)."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False),
        nn.BatchNorm1d(pred_dim),
        nn.ReLU(inplace=True),
        nn.Linear(pred_dim, dim),
    )


class SimSiam(nn.Module):
    """Encoder f (backbone + projector) and predictor h.

    Args:
        backbone: ``resnet18``, ``resnet34`` or ``resnet50`` (torchvision, random init).
        dim: projector output width (2048 in the paper).
        pred_dim: predictor hidden width (512 in the paper).
        small_input: 3x3 stride-1 stem without max-pool, for images of 64 px or less.
    """

    def __init__(self, backbone: str = "resnet50", dim: int = 2048, pred_dim: int = 512, small_input: bool = False):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(backbone, small_input)
        self.projector = projection_mlp(self.feat_dim, dim)
        self.predictor = prediction_mlp(dim, pred_dim)
        self.backbone_name = backbone
        self.dim = dim

    def extract_feat(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``[B, feat_dim]`` (what kNN and linear evaluation use)."""
        return self.backbone(x)

    def forward(self, x1: Tensor, x2: Tensor, features: bool = False) -> tuple[Tensor, ...]:
        """Return ``(p1, p2, z1, z2)``; z1 and z2 are detached (the stop-gradient). With
        ``features``, also the first view's pooled backbone features (for the online probe,
        :mod:`fastsiam.probe`; through the module's own call, so DDP sees one forward).

        The two views go through the encoder in two passes, as in the official code, so every
        BatchNorm layer normalizes each view over its own batch (one view's statistics never
        mix with the other's). A single concatenated pass would be a different recipe.
        """
        f1 = self.backbone(x1)
        z1 = self.projector(f1)
        z2 = self.projector(self.backbone(x2))
        p1 = self.predictor(z1)
        p2 = self.predictor(z2)
        out = (p1, p2, z1.detach(), z2.detach())
        return (*out, f1) if features else out


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Symmetric negative cosine similarity with stop-gradient on the targets (in [-1, 1])."""
    return -(F.cosine_similarity(p1, z2.detach(), dim=-1).mean()
             + F.cosine_similarity(p2, z1.detach(), dim=-1).mean()) * 0.5


def z_std(z: Tensor) -> Tensor:
    """The collapse monitor: mean over channels of the std of l2-normalized z.

    About 1/sqrt(dim) for healthy, spread-out outputs; falls toward 0 when the representation
    collapses to a constant (the paper's Figure 2).
    """
    return F.normalize(z.float(), dim=-1).std(dim=0).mean()
