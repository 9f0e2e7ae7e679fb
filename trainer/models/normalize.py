"""Input standardisation inside the model: ``(x - mean) / std`` per channel, then the network.

CAT's and Rice et al.'s training scripts keep images in [0, 1], attack them there (eps, the box
clamp) and standardise them in every forward, ``model(normalize(X + delta))``. Putting that step
in the model does the same: attacks, losses and evaluation keep working on [0, 1] images while the
network sees standardised ones. The statistics are the ones those scripts use (their utils.py).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["NORMALIZATION_STATS", "Normalized"]

#: name -> (per-channel mean, per-channel std) of the training images in [0, 1]
NORMALIZATION_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": (
        (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
        (0.2673342858792401, 0.2564384629170883, 0.27615047132568404),
    ),
}


class Normalized(nn.Module):
    """``net((x - mean) / std)``; mean and std are buffers that follow the module's device.

    The buffers are not persistent: a checkpoint holds the network's weights under ``net.``, and the
    statistics come from the spec (``model.robust.normalize``) when the model is rebuilt.
    """

    def __init__(self, net: nn.Module, stats: str) -> None:
        super().__init__()
        if stats not in NORMALIZATION_STATS:
            raise ValueError(
                f"normalize: unknown statistics {stats!r}; use one of {', '.join(NORMALIZATION_STATS)}"
            )
        mean, std = NORMALIZATION_STATS[stats]
        self.stats = stats
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"normalize={self.stats!r} has {self.mean.shape[1]} channels, the input {x.shape[1]}"
            )
        return self.net((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"stats={self.stats!r}"
