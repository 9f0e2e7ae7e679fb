"""Random but learnable images for benchmarks and tests that must not depend on files on disk."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .arrays import ArrayDataset, derive_seed

__all__ = ["make_synthetic"]

_PATTERN_WEIGHT = 0.55  # the rest is per-image noise; chosen so a small CNN learns it in an epoch or two
_CHUNK = 8192  # bounds the float32 working set when generating hundreds of thousands of images


def make_synthetic(
    n: int, *, num_classes: int = 10, shape: tuple[int, int, int] = (3, 32, 32), seed: int = 0
) -> ArrayDataset:
    """Images = class prototype blended with uniform noise, quantised to uint8.

    The prototypes depend only on ``(num_classes, shape)``, never on ``seed``, so a train set and a
    test set made with different seeds share the same classes: what a model learns generalises.
    ``seed`` drives the labels and the noise. Prototypes are coarse blocks (robust to the 4-pixel
    crops the loader applies) mirrored left-right (invariant under the random flips).
    """
    if n < 0 or num_classes <= 0:
        raise ValueError(f"need n >= 0 and num_classes > 0, got n={n}, num_classes={num_classes}")
    c, h, w = (int(s) for s in shape)
    protos = _prototypes(num_classes, c, h, w)

    gen = torch.Generator().manual_seed(derive_seed(seed, n, num_classes, c, h, w))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    images = torch.empty((n, c, h, w), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        y = labels[start : start + _CHUNK]
        noise = torch.rand((len(y), c, h, w), generator=gen)
        x = _PATTERN_WEIGHT * protos[y] + (1.0 - _PATTERN_WEIGHT) * noise
        images[start : start + len(y)] = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return ArrayDataset(images=images, labels=labels, num_classes=num_classes, name="synthetic")


def _prototypes(num_classes: int, c: int, h: int, w: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(0x5EED, num_classes, c, h, w))
    gh, gw = min(4, h), min(4, w)
    half = torch.rand((num_classes, c, gh, (gw + 1) // 2), generator=gen)
    mirrored = torch.cat([half, half.flip(-1)[..., gw % 2 :]], dim=-1)
    return F.interpolate(mirrored, size=(h, w), mode="nearest")
