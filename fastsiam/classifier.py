"""The linear-evaluation model: a torchvision ResNet whose ``fc`` classifies pooled features.

Linear classification on frozen features is how the SimSiam paper (Chen & He, CVPR 2021,
following Goyal et al. and MoCo) scores a representation: only ``fc`` is trained, initialised
N(0, 0.01) with zero bias; the backbone stays in eval mode.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastsiam.model import build_backbone


class LinearClassifier(nn.Module):
    """A ResNet backbone (pooled features) and a linear head.

    State dict keys are ``backbone.*`` (torchvision ResNet names, no ``fc``) and
    ``fc.weight`` / ``fc.bias``: the backbone keys match :class:`fastsiam.model.SimSiam`'s,
    and stripping ``backbone.`` gives a torchvision ResNet state dict.

    Args:
        backbone: ``resnet18``, ``resnet34`` or ``resnet50``.
        num_classes: outputs of the linear head.
        small_input: the 3x3 stride-1 stem without max-pool (images of 64 px or less).
    """

    def __init__(self, backbone: str = "resnet50", num_classes: int = 1000, small_input: bool = False):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(backbone, small_input)
        self.fc = nn.Linear(self.feat_dim, num_classes)
        self.backbone_name = backbone
        self.num_classes = num_classes
        self.reset_head()

    def reset_head(self) -> None:
        """The linear-evaluation init: weight N(0, 0.01), bias 0."""
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def freeze_backbone(self) -> None:
        """No gradients for the backbone (its BatchNorm statistics are kept by eval mode)."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def extract_feat(self, x: Tensor) -> Tensor:
        """Pooled backbone features ``[B, feat_dim]``."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.fc(self.backbone(x))

    def train(self, mode: bool = True) -> LinearClassifier:
        """Training touches only the head: the frozen backbone stays in eval mode so its
        BatchNorm layers use (and never update) the pretrained running statistics."""
        super().train(mode)
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self

