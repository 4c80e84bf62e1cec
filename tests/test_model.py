"""SimSiam model: the model card's parameter counts, shapes, the loss by hand, stop-gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision import models

from fastsiam.model import SimSiam, build_backbone, simsiam_loss, z_std


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_resnet50_matches_model_card() -> None:
    m = SimSiam("resnet50", dim=2048, pred_dim=512)
    assert round(n_params(m) / 1e6, 2) == 38.20          # mmpretrain's model card
    assert round(n_params(m.backbone) / 1e6, 2) == 23.51  # ResNet-50 without fc
    # the linear-eval network is the backbone plus a 1000-way fc: 25.56 M
    assert round((n_params(m.backbone) + 2048 * 1000 + 1000) / 1e6, 2) == 25.56


def test_backbone_is_torchvision_resnet_with_zero_init_residual() -> None:
    net, width = build_backbone("resnet18")
    assert width == 512
    ref = models.resnet18(weights=None)
    ref.fc = torch.nn.Identity()
    assert [k for k in net.state_dict()] == [k for k in ref.state_dict()]
    # zero_init_residual: the last BN of every basic block starts at gamma = 0
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for layer in (net.layer1, net.layer4) for b in layer)


def test_projector_and_predictor_structure() -> None:
    m = SimSiam("resnet18", dim=64, pred_dim=16)
    linears = [x for x in m.projector if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features, x.bias is None) for x in linears] == [
        (512, 512, True), (512, 512, True), (512, 64, True)]
    assert not m.projector[-1].affine            # BN(dim, affine=False) closes the projector
    p_lin = [x for x in m.predictor if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in p_lin] == [(64, 16), (16, 64)]
    assert p_lin[0].bias is None and p_lin[1].bias is not None


def test_forward_shapes_and_extract_feat() -> None:
    torch.manual_seed(0)
    m = SimSiam("resnet18", dim=32, pred_dim=8, small_input=True)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    p1, p2, z1, z2 = m(x1, x2)
    assert all(t.shape == (4, 32) for t in (p1, p2, z1, z2))
    assert not z1.requires_grad and not z2.requires_grad and p1.requires_grad
    assert m.extract_feat(x1).shape == (4, 512)


def test_small_input_stem() -> None:
    m = SimSiam("resnet18", small_input=True)
    assert m.backbone.conv1.kernel_size == (3, 3) and m.backbone.conv1.stride == (1, 1)
    assert isinstance(m.backbone.maxpool, torch.nn.Identity)


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vit'; expected one of resnet18, resnet34, resnet50"):
        SimSiam("vit")


def test_loss_by_hand() -> None:
    p1 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p2 = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    z1 = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    z2 = torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    # cos(p1, z2): row0 (1,0).(0,1)=0; row1 (0,2).(0,5)/(2*5)=1 -> mean 0.5
    # cos(p2, z1): row0 (1,1).(1,1)/2=1; row1 (3,0).(1,0)/3=1 -> mean 1
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(-(0.5 + 1.0) / 2)


def test_no_gradient_reaches_z_through_the_loss() -> None:
    p1, p2 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    z1, z2 = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p1.grad.abs().sum() > 0


def test_model_gradients_flow_only_through_predictor_path() -> None:
    """With z detached, the encoder still learns through p = h(z) (the branch with gradient)."""
    torch.manual_seed(0)
    m = SimSiam("resnet18", dim=16, pred_dim=8, small_input=True)
    x = torch.randn(4, 3, 16, 16)
    simsiam_loss(*m(x, x.flip(-1))).backward()
    assert m.backbone.conv1.weight.grad is not None and m.backbone.conv1.weight.grad.abs().sum() > 0
    assert m.predictor[0].weight.grad.abs().sum() > 0


def test_z_std_monitor() -> None:
    torch.manual_seed(0)
    dim = 256
    healthy = z_std(torch.randn(4096, dim))
    assert healthy.item() == pytest.approx(1 / math.sqrt(dim), rel=0.05)
    collapsed = z_std(torch.ones(4096, dim) + 1e-4 * torch.randn(4096, dim))
    assert collapsed.item() < 0.01 * healthy.item()
