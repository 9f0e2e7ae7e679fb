"""CIFAR ResNet-18 (kuangliu/pytorch-cifar), the LBGAT teacher variant and the Bottleneck
"ResNet-18" of the RAAT code.

Attribute names follow the reference code (``conv1``, ``bn1``, ``layer1``..``layer4``, ``linear``;
blocks ``conv1/bn1/conv2/bn2[/conv3/bn3]/shortcut``) so their published ``state_dict``\\ s load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


class BasicBlock(nn.Module):
    """Post-activation ResNet basic block: conv-bn-relu-conv-bn (+ shortcut) - relu.

    The shortcut is a 1x1 strided conv + BN whenever the shape changes, identity otherwise.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class Bottleneck(nn.Module):
    """Post-activation bottleneck block (He et al. 2016): 1x1 conv-bn-relu, 3x3 conv(stride)-bn-relu,
    1x1 conv to ``4 * planes``-bn (+ shortcut) - relu.

    The shortcut is a 1x1 strided conv + BN whenever the shape changes, identity otherwise.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (stride ``stem_stride``, no max-pool), four stages of ``block``,
    global average pooling (adaptive, so any input >= 8x8 works) and a linear classifier.  Inputs are
    in [0, 1]; there is no internal normalisation.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        num_blocks: Sequence[int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        strides: Sequence[int] = (1, 2, 2, 2),
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or len(strides) != 4:
            raise ValueError(f"need 4 stages, got num_blocks={num_blocks!r} strides={strides!r}")
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], strides[0])
        self.layer2 = self._make_layer(block, 128, num_blocks[1], strides[1])
        self.layer3 = self._make_layer(block, 256, num_blocks[2], strides[2])
        self.layer4 = self._make_layer(block, 512, num_blocks[3], strides[3])
        self.linear = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, num_blocks: int, stride: int
    ) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


@register_model("resnet18")
def resnet18(*, num_classes: int, in_channels: int = 3) -> ResNet:
    """Standard CIFAR ResNet-18 (kuangliu/pytorch-cifar; He et al. 2016), stage strides 1,2,2,2.

    The usual student/backbone in adversarial-training papers (LBGAT, TRADES, MART, AWP, CAT ...);
    ~11.17M parameters for 10 classes, a 4x4 final feature map at 32x32 input.
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


@register_model("lbgat_teacher_resnet18")
def lbgat_teacher_resnet18(*, num_classes: int, in_channels: int = 3) -> ResNet:
    """The natural-teacher network of the official LBGAT code (Cui et al., ICCV 2021; github
    dvlab-research/LBGAT ``models/resnetcifar.py`` ``ResNet18_cifar``).

    Identical to :func:`resnet18` (same parameters, 11.17M for 10 classes) except that the second
    stage keeps stride 1 (strides 1,1,2,2): the last feature map at 32x32 input is 8x8 (the reference
    code hard-codes ``avg_pool2d(out, 8)``), costing about 3x the FLOPs of ResNet-18.
    """
    return ResNet(
        BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, strides=(1, 1, 2, 2)
    )


@register_model("resnet18_bottleneck")
def resnet18_bottleneck(*, num_classes: int, in_channels: int = 3) -> ResNet:
    """The "ResNet-18" of the RAAT code (FlaAI/RAAT ``models/resnet.py`` ``resnet18``, inherited from
    alinlab/consistency-adversarial): ``ResNet(Bottleneck, [2, 2, 2, 2])``, i.e. bottleneck blocks
    with 4x expansion (2048 features), not the BasicBlock ResNet-18 of :func:`resnet18`.

    13.96M parameters for 10 classes; 3x3 stride-1 stem, a 4x4 final feature map at 32x32 input.
    RAAT's Tables 1 and 5 (ResNet-18 columns), Cons-AT and RAAT's baselines ran on it.
    """
    return ResNet(Bottleneck, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


@register_model("resnet18_bottleneck_stem2")
def resnet18_bottleneck_stem2(*, num_classes: int, in_channels: int = 3) -> ResNet:
    """:func:`resnet18_bottleneck` with a stride-2 stem, for Tiny-ImageNet at its native 64x64 (the
    RAAT code's ``models/classifier.py`` builds ``resnet18(stride=2)`` for ``tinyimagenet``): the
    final feature map is 4x4 at 64x64 input, as at 32x32 for the stride-1 stem.
    """
    return ResNet(Bottleneck, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, stem_stride=2)
