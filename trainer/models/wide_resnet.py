"""WideResNet (Zagoruyko & Komodakis 2016) exactly as in the TRADES official code
(github yaodongyu/TRADES ``models/wideresnet.py``), which LBGAT, MART, AWP and CAT reuse.

Attribute names match the reference (``conv1``, ``block1..3.layer.i.{bn1,conv1,bn2,conv2,convShortcut}``,
``bn1``, ``fc``) so published checkpoints load.  The reference also builds an unused ``sub_block1``
(never called in ``forward``); it is deliberately omitted here, so load such checkpoints after dropping
their ``sub_block1.*`` keys (or with ``strict=False``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model

__all__ = ["NetworkBlock", "WideBasicBlock", "WideResNet"]


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: bn1-relu-conv1(stride)-bn2-relu-[dropout]-conv2 (+ shortcut).

    When ``in_planes != out_planes`` the shortcut is a 1x1 strided conv (``convShortcut``) applied to
    the pre-activated input, as in TRADES; otherwise it is the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(
                in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of ``nb_layers`` wide blocks; only the first changes width / stride."""

    def __init__(
        self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate
                )
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR: 3x3 stem (stride ``stem_stride``) to 16 channels, three groups of ``(depth-4)/6`` wide blocks with
    16k/32k/64k channels and strides 1,2,2, final bn-relu, adaptive global average pooling, linear.
    Inputs are in [0, 1]; there is no internal normalisation.  Initialised as TRADES (conv weights
    ``N(0, 2/(k*k*out_channels))``, BN weight 1 / bias 0, linear bias 0).
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        drop_rate: float = 0.0,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be an int with (depth - 4) % 6 == 0 and >= 10, got depth={depth!r}"
            )
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(
                f"WideResNet widen_factor must be a positive int, got widen_factor={widen_factor!r}"
            )
        if not 0.0 <= float(drop_rate) < 1.0:
            raise ValueError(f"WideResNet drop_rate must be in [0, 1), got drop_rate={drop_rate!r}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth = depth
        self.widen_factor = widen_factor
        self.nChannels = channels[3]
        self.conv1 = nn.Conv2d(
            in_channels, channels[0], kernel_size=3, stride=stem_stride, padding=1, bias=False
        )
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = F.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


@register_model("wide_resnet")
def wide_resnet(
    *,
    num_classes: int,
    in_channels: int = 3,
    depth: int = 34,
    widen_factor: int = 10,
    drop_rate: float = 0.0,
) -> WideResNet:
    """WideResNet-``depth``-``widen_factor`` of the TRADES code (default WRN-34-10, the standard
    robustness benchmark backbone of TRADES / LBGAT / MART / AWP; 46.16M parameters for 10 classes).
    """
    return WideResNet(depth, widen_factor, drop_rate, num_classes=num_classes, in_channels=in_channels)


@register_model("wrn28_10")
def wrn28_10(*, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WRN-28-10 (TRADES code): the backbone used with extra/generated data (Carmon et al., Gowal et al.)."""
    return WideResNet(28, 10, drop_rate, num_classes=num_classes, in_channels=in_channels)


@register_model("wrn28_10_stem2")
def wrn28_10_stem2(*, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WRN-28-10 with a stride-2 stem conv, for Tiny-ImageNet at its native 64x64: the RAAT code's
    ``models/classifier.py`` builds ``wide_resnet_28_10(stride=2)`` for ``tinyimagenet`` (its
    ``models/wide_resnet.py`` is this network), so the last feature map is 8x8 as at 32x32.
    """
    return WideResNet(28, 10, drop_rate, num_classes=num_classes, in_channels=in_channels, stem_stride=2)


@register_model("wrn34_10")
def wrn34_10(*, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WRN-34-10 (TRADES code): the main CIFAR-10/100 backbone of TRADES and LBGAT."""
    return WideResNet(34, 10, drop_rate, num_classes=num_classes, in_channels=in_channels)


@register_model("wrn34_20")
def wrn34_20(*, num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
    """WRN-34-20 (TRADES code): the larger backbone of LBGAT's CIFAR-100 results and of Gowal et al."""
    return WideResNet(34, 20, drop_rate, num_classes=num_classes, in_channels=in_channels)
