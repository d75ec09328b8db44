"""The GEMM weight gradient for convolutions on small CPU feature maps (stages/fast_conv_grad.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stages import fast_conv_grad
from stages.fast_conv_grad import fast_weight_grad


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()], x.grad.clone()


@pytest.mark.parametrize(
    "conv, size",
    [
        (nn.Conv2d(32, 48, 3, padding=1, bias=False), 1),  # a ResNet layer4 conv on a 1×1 map
        (nn.Conv2d(16, 24, 3, padding=1, bias=True), 2),
        (nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False), 4),  # 4×4 in, 2×2 out
        (nn.Conv2d(8, 8, (3, 1), padding=(1, 0), dilation=(2, 1), bias=True), 3),
    ],
)
def test_same_output_and_gradients_as_torch(conv, size):
    torch.manual_seed(0)
    model = nn.Sequential(conv, nn.ReLU())
    reference = copy.deepcopy(model)
    x = torch.randn(5, conv.in_channels, size, size)

    with fast_weight_grad(model):
        out, grads, grad_x = _grads(model, x)
    ref_out, ref_grads, ref_grad_x = _grads(reference, x)

    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-5)


def test_used_only_for_small_maps_in_training_and_restored_on_exit(monkeypatch):
    calls = []
    real = fast_conv_grad._Conv2dUnfoldGrad.apply
    monkeypatch.setattr(fast_conv_grad._Conv2dUnfoldGrad, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    conv = nn.Conv2d(4, 4, 3, padding=1)

    with fast_weight_grad(conv, None, max_positions=4):
        conv(torch.randn(2, 4, 2, 2))  # 4 output pixels: the GEMM path
        conv(torch.randn(2, 4, 3, 3))  # 9 output pixels: torch's path
        with torch.no_grad():
            conv(torch.randn(2, 4, 1, 1))
        conv.eval()
        conv(torch.randn(2, 4, 1, 1))
        assert "forward" in vars(conv)

    assert calls == [torch.Size([2, 4, 2, 2])]
    assert "forward" not in vars(conv)  # the class's forward again: saved and exported models never see it

