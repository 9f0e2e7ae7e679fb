"""Inception-ResNet-v2 (Szegedy et al., AAAI 2017) adapted to 32x32 inputs, for BGAT's teacher ensemble.

The LBGAT paper's BGAT teacher is "the ensemble of WideResNet and InceptionResNetV2" natural models
(Tables 1-3); its code does not include them, so this follows the CIFAR adaptation most used in
practice, ``inception_resnet_v2`` of weiaicunzai/pytorch-cifar100 (``models/inceptionv4.py``):

- stem without the ImageNet network's stride-2 convolutions and max-pools: a 3x3 valid conv (32x32
  -> 30x30), two padded 3x3 convs to 64 channels, then the three concatenations of Fig. 3 of the
  paper with stride 1 (3x3 conv | 3x3 max-pool; 7x1/1x7 branch | 3x3 branch; max-pool | 3x3 conv),
  giving 384 channels at 30x30;
- 5 Inception-ResNet-A, Reduction-A (k, l, m, n = 256, 256, 384, 384; 30 -> 14), 10 Inception-ResNet-B,
  Reduction-B (14 -> 6), 5 Inception-ResNet-C blocks, as the paper's 5/10/5;
- every residual block adds its branches' 1x1 projection to a 1x1-conv projection of its input
  (not the identity), then BatchNorm and ReLU; the B and C residuals are scaled by 0.1;
- adaptive average pooling, dropout 0.2 (the paper's keep 0.8), a linear classifier.

Convolutions inside branches are conv-BN-ReLU without bias; the 1x1 projections of the residual and
of the shortcut have a bias. Inputs are in [0, 1] (no internal normalisation); any input of at least
16x16 works (32x32 is the intended size: 6x6 before pooling). About 64M parameters for 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model

__all__ = ["InceptionResNetV2"]


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int | tuple[int, int], **conv_kwargs) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, bias=False, **conv_kwargs),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


def _chain(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """32x32xC -> 30x30x384 (Fig. 3 of the paper with every stride set to 1 after the first conv)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.convs = _chain(
            ConvBNReLU(in_channels, 32, 3),
            ConvBNReLU(32, 32, 3, padding=1),
            ConvBNReLU(32, 64, 3, padding=1),
        )
        self.mix1_conv = ConvBNReLU(64, 96, 3, padding=1)
        self.mix1_pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.mix2_long = _chain(
            ConvBNReLU(160, 64, 1),
            ConvBNReLU(64, 64, (7, 1), padding=(3, 0)),
            ConvBNReLU(64, 64, (1, 7), padding=(0, 3)),
            ConvBNReLU(64, 96, 3, padding=1),
        )
        self.mix2_short = _chain(ConvBNReLU(160, 64, 1), ConvBNReLU(64, 96, 3, padding=1))
        self.mix3_pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.mix3_conv = ConvBNReLU(192, 192, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        x = torch.cat([self.mix1_conv(x), self.mix1_pool(x)], 1)
        x = torch.cat([self.mix2_long(x), self.mix2_short(x)], 1)
        return torch.cat([self.mix3_pool(x), self.mix3_conv(x)], 1)


class _Residual(nn.Module):
    """relu(bn(shortcut(x) + scale * project(cat(branches(x))))): the Inception-ResNet blocks."""

    def __init__(self, in_ch: int, out_ch: int, branches: list[nn.Module], branch_ch: int, scale: float):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.project = nn.Conv2d(branch_ch, out_ch, 1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1)
        self.bn = nn.BatchNorm2d(out_ch)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.project(torch.cat([branch(x) for branch in self.branches], 1))
        if self.scale != 1.0:
            residual = residual * self.scale
        return F.relu(self.bn(self.shortcut(x) + residual))


def block_a(in_ch: int) -> _Residual:
    """Inception-ResNet-A (Fig. 16): 1x1 | 1x1-3x3 | 1x1-3x3-3x3 -> 384 channels, no residual scaling."""
    branches = [
        ConvBNReLU(in_ch, 32, 1),
        _chain(ConvBNReLU(in_ch, 32, 1), ConvBNReLU(32, 32, 3, padding=1)),
        _chain(ConvBNReLU(in_ch, 32, 1), ConvBNReLU(32, 48, 3, padding=1), ConvBNReLU(48, 64, 3, padding=1)),
    ]
    return _Residual(in_ch, 384, branches, 128, scale=1.0)


def block_b(in_ch: int) -> _Residual:
    """Inception-ResNet-B (Fig. 17): 1x1 | 1x1-1x7-7x1 -> 1154 channels, residual x 0.1."""
    branches = [
        ConvBNReLU(in_ch, 192, 1),
        _chain(
            ConvBNReLU(in_ch, 128, 1),
            ConvBNReLU(128, 160, (1, 7), padding=(0, 3)),
            ConvBNReLU(160, 192, (7, 1), padding=(3, 0)),
        ),
    ]
    return _Residual(in_ch, 1154, branches, 384, scale=0.1)


def block_c(in_ch: int) -> _Residual:
    """Inception-ResNet-C (Fig. 19): 1x1 | 1x1-1x3-3x1 -> 2048 channels, residual x 0.1."""
    branches = [
        ConvBNReLU(in_ch, 192, 1),
        _chain(
            ConvBNReLU(in_ch, 192, 1),
            ConvBNReLU(192, 224, (1, 3), padding=(0, 1)),
            ConvBNReLU(224, 256, (3, 1), padding=(1, 0)),
        ),
    ]
    return _Residual(in_ch, 2048, branches, 448, scale=0.1)


class ReductionA(nn.Module):
    """Fig. 7 with k, l, m, n = 256, 256, 384, 384: valid stride-2 convs and max-pool, 384 -> 1152 channels."""

    def __init__(self, in_ch: int, k: int = 256, l: int = 256, m: int = 384, n: int = 384) -> None:
        super().__init__()
        self.long = _chain(
            ConvBNReLU(in_ch, k, 1), ConvBNReLU(k, l, 3, padding=1), ConvBNReLU(l, m, 3, stride=2)
        )
        self.short = ConvBNReLU(in_ch, n, 3, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2)
        self.out_channels = in_ch + m + n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.long(x), self.short(x), self.pool(x)], 1)


class ReductionB(nn.Module):
    """Fig. 18: three conv branches (384, 288, 320 channels) and a max-pool, all stride 2 and valid."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch_a = _chain(ConvBNReLU(in_ch, 256, 1), ConvBNReLU(256, 384, 3, stride=2))
        self.branch_b = _chain(ConvBNReLU(in_ch, 256, 1), ConvBNReLU(256, 288, 3, stride=2))
        self.branch_c = _chain(
            ConvBNReLU(in_ch, 256, 1), ConvBNReLU(256, 288, 3, padding=1), ConvBNReLU(288, 320, 3, stride=2)
        )
        self.pool = nn.MaxPool2d(3, stride=2)
        self.out_channels = 384 + 288 + 320 + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_a(x), self.branch_b(x), self.branch_c(x), self.pool(x)], 1)


class InceptionResNetV2(nn.Module):
    """Inception-ResNet-v2 for 32x32 inputs (see the module docstring for the adaptation)."""

    def __init__(
        self,
        blocks: tuple[int, int, int] = (5, 10, 5),
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.2,
    ) -> None:
        super().__init__()
        n_a, n_b, n_c = blocks
        self.stem = Stem(in_channels)
        self.blocks_a = nn.Sequential(*[block_a(384) for _ in range(n_a)])
        self.reduction_a = ReductionA(384)
        ch = self.reduction_a.out_channels
        self.blocks_b = nn.Sequential(*[block_b(ch if i == 0 else 1154) for i in range(n_b)])
        self.reduction_b = ReductionB(1154)
        ch = self.reduction_b.out_channels
        self.blocks_c = nn.Sequential(*[block_c(ch if i == 0 else 2048) for i in range(n_c)])
        self.drop_rate = drop_rate
        self.linear = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.reduction_a(self.blocks_a(x))
        x = self.reduction_b(self.blocks_b(x))
        x = self.blocks_c(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        # dropout of whole channels of a 1x1 map (the reference's Dropout2d) is element-wise dropout
        x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.linear(x)


@register_model("inception_resnet_v2")
def inception_resnet_v2(*, num_classes: int, in_channels: int = 3) -> InceptionResNetV2:
    """Inception-ResNet-v2 for CIFAR (weiaicunzai/pytorch-cifar100's adaptation, 5/10/5 blocks):
    the second member of BGAT's natural teacher ensemble (LBGAT paper, Tables 1-3)."""
    return InceptionResNetV2((5, 10, 5), num_classes=num_classes, in_channels=in_channels)
