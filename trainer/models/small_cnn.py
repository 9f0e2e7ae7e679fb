"""Small CNNs: the MNIST CNN of Calibrated Adversarial Training and a tiny test/demo CNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model

__all__ = ["CATMnistCNN", "PoolFlatten", "TinyCNN"]


class PoolFlatten(nn.Module):
    """Adaptive average pool to ``size x size`` then flatten; the identity pool when the map already
    has that size (7x7 for 28x28 MNIST), so the reference model is reproduced exactly there."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            x = F.adaptive_avg_pool2d(x, self.size)
        return torch.flatten(x, 1)


class CATMnistCNN(nn.Sequential):
    """The 4-conv MNIST CNN of adversarial-ml-tutorial.org (Kolter & Madry, ch. 4 ``model_cnn``) used by
    Calibrated Adversarial Training (Huang et al., 2021) for its MNIST experiments.

    Conv(in,32,3,p1)-ReLU-Conv(32,32,3,p1,s2)-ReLU-Conv(32,64,3,p1)-ReLU-Conv(64,64,3,p1,s2)-ReLU-
    Flatten-Linear(7*7*64,100)-ReLU-Linear(100,classes).  The layer indices equal the tutorial's
    ``nn.Sequential`` so its ``state_dict`` loads; index 8 pools adaptively to 7x7 for inputs other
    than 28x28 (identity at 28x28).
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2),
            nn.ReLU(),
            PoolFlatten(7),
            nn.Linear(7 * 7 * 64, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )


class TinyCNN(nn.Module):
    """Tiny BN CNN for unit tests and the CPU demo on 8x8 grayscale digits (sklearn ``load_digits``).

    Conv(in,w,3,p1)-BN-ReLU-Conv(w,2w,3,p1,s2)-BN-ReLU-AdaptiveAvgPool(2)-Flatten-Linear(8w,classes).
    It contains BatchNorm on purpose, so tests can exercise train/eval-mode handling of attacks.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"tiny_cnn width must be a positive int, got width={width!r}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model("cat_mnist_cnn")
def cat_mnist_cnn(*, num_classes: int, in_channels: int = 1) -> CATMnistCNN:
    """MNIST CNN of Calibrated Adversarial Training (from adversarial-ml-tutorial.org); in_channels=1."""
    return CATMnistCNN(num_classes=num_classes, in_channels=in_channels)


@register_model("tiny_cnn")
def tiny_cnn(*, num_classes: int, in_channels: int = 1, width: int = 16) -> TinyCNN:
    """Tiny BN CNN for tests / the CPU demo on 8x8 grayscale digits; in_channels=1, ``width`` scales it."""
    return TinyCNN(num_classes=num_classes, in_channels=in_channels, width=width)
