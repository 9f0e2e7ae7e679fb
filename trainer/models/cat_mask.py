"""Soft-mask networks g_phi of Calibrated Adversarial Training (Huang et al., App. C, Tables 5 and 6).

g_phi maps an input x and its adversarial perturbation delta to a mask M in (0, 1) of x's shape; the
calibrated example is x + M * delta (Eq. 10-11). Both networks read x and delta concatenated along
the channels (M = g_phi(X, delta) needs both), shrink the image with strided layers, upsample back to
the input's size, and end in a 3x3 conv to the input's channels and a sigmoid.

Choices the paper leaves open, made here: the CIFAR trunk keeps ResNet-18's spatial 4x4 map (no
global pooling, which would make the mask constant over the image, whereas the paper's masks are
pixel-level, Fig. 2); upsampling is bilinear; the MNIST trunk's 2nd and 3rd convs have stride 2
(28 -> 14 -> 7, the upsampling in Table 5 implies downsampling somewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model
from .resnet import BasicBlock

__all__ = ["CATMaskNet"]


class CATMaskNet(nn.Module):
    """trunk([x, delta]) -> bilinear upsample to x's size -> conv3x3 to x's channels -> sigmoid."""

    def __init__(self, trunk: nn.Module, trunk_channels: int, in_channels: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Conv2d(trunk_channels, in_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        features = self.trunk(torch.cat([x, delta], dim=1))
        features = F.interpolate(features, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(features))


def _resnet18_trunk(in_channels: int) -> nn.Sequential:
    """ResNet-18 (kuangliu/pytorch-cifar layout) without pooling and FC: a 512-channel map at 1/8 size."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
    ]
    in_planes = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for s in (stride, 1):
            layers.append(BasicBlock(in_planes, planes, s))
            in_planes = planes
    return nn.Sequential(*layers)


@register_model("cat_mask_resnet18", kind="mask")
def cat_mask_resnet18(*, in_channels: int = 3) -> CATMaskNet:
    """g_phi for CIFAR-10/100 (CAT Table 6): ResNet-18 without FC, upsampling, conv to the input channels, sigmoid."""
    return CATMaskNet(_resnet18_trunk(2 * in_channels), 512, in_channels)


@register_model("cat_mask_mnist_cnn", kind="mask")
def cat_mask_mnist_cnn(*, in_channels: int = 1) -> CATMaskNet:
    """g_phi for MNIST (CAT Table 5): conv 64, conv 128, conv 128, upsampling, conv to the input channels, sigmoid."""
    trunk = nn.Sequential(
        nn.Conv2d(2 * in_channels, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1, stride=2),
        nn.ReLU(),
    )
    return CATMaskNet(trunk, 128, in_channels)
