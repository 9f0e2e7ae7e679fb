"""Soft-mask networks g_phi of Calibrated Adversarial Training (Huang et al., App. C, Tables 5 and 6).

g_phi maps the adversarial example x' = x + delta to a mask M in (0, 1) of x's shape; the calibrated
example is x + M * delta (Eq. 10-11). As the official code (TienjinHuang/Calibrated-adversarial-training,
`Codes/resnet.py` `ResNet_me`, `Codes/Train_MNIST.py` `img_mask`) both networks read x + delta (the
input's channels, in [0, 1], not standardised), shrink the image with strided layers, upsample back
to the input's size with F.interpolate's default (nearest), and end in a 3x3 conv to the input's
channels and a sigmoid.

CIFAR: ResNet-18 without pooling and FC (a 512-channel 4x4 map for 32x32 inputs). MNIST: conv 64
(stride 2), conv 128, conv 128 (stride 1), each followed by LeakyReLU(0.2). The official code
upsamples to a fixed 32x32 / 28x28; here to the input's own size, the same for those images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model
from .resnet import BasicBlock

__all__ = ["CATMaskNet"]


class CATMaskNet(nn.Module):
    """trunk(x') -> nearest upsample to x''s size -> conv3x3 to x''s channels -> sigmoid."""

    def __init__(self, trunk: nn.Module, trunk_channels: int, in_channels: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Conv2d(trunk_channels, in_channels, kernel_size=3, padding=1)

    def forward(self, x_adv: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x_adv)
        features = F.interpolate(features, size=x_adv.shape[-2:], mode="nearest")
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
    """g_phi for CIFAR-10/100 (CAT Table 6, official `ResNet18_me`): ResNet-18 without FC on x + delta,
    nearest upsampling, conv to the input channels, sigmoid."""
    return CATMaskNet(_resnet18_trunk(in_channels), 512, in_channels)


@register_model("cat_mask_mnist_cnn", kind="mask")
def cat_mask_mnist_cnn(*, in_channels: int = 1) -> CATMaskNet:
    """g_phi for MNIST (CAT Table 5, official `img_mask`): conv 64 /2, conv 128, conv 128, LeakyReLU(0.2)
    after each, nearest upsampling, conv to the input channels, sigmoid."""
    trunk = nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, padding=1, stride=2),
        nn.LeakyReLU(0.2),
        nn.Conv2d(64, 128, 3, padding=1, stride=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(128, 128, 3, padding=1, stride=1),
        nn.LeakyReLU(0.2),
    )
    return CATMaskNet(trunk, 128, in_channels)
