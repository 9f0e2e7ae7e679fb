"""Pre-activation ResNet-18 as used by the TRADES / MART / AWP / CAT code bases.

Attribute names follow kuangliu/pytorch-cifar ``preact_resnet.py`` (plus the final ``bn`` that the
adversarial-training forks add), so their ``state_dict``\\ s load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model

__all__ = ["PreActBlock", "PreActResNet"]


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): bn-relu-conv-bn-relu-conv (+ shortcut).

    When the shape changes the shortcut is a 1x1 strided conv (no BN) applied to the *pre-activated*
    input ``relu(bn1(x))``; otherwise it is the raw input.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for CIFAR: 3x3 stride-1 stem conv, four PreAct stages (64/128/256/512,
    strides 1,2,2,2), final bn-relu, adaptive global average pooling, linear classifier.
    Inputs are in [0, 1]; there is no internal normalisation.
    """

    def __init__(
        self,
        block: type[PreActBlock],
        num_blocks: Sequence[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"need 4 stages, got num_blocks={num_blocks!r}")
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.bn = nn.BatchNorm2d(512 * block.expansion)
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(
        self, block: type[PreActBlock], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.relu(self.bn(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


@register_model("preact_resnet18")
def preact_resnet18(*, num_classes: int, in_channels: int = 3) -> PreActResNet:
    """Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", 2016).

    The ResNet-18 variant of the TRADES / MART / AWP / CAT adversarial-training code bases (and of
    Rice et al.'s "Overfitting in adversarially robust deep learning"); ~11.17M parameters.
    """
    return PreActResNet(PreActBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
