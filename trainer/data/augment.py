"""Batched crop/flip augmentation that runs where the data lives (usually the GPU).

Per-image augmentation in DataLoader workers is the usual bottleneck for small images; doing the
whole batch with a couple of kernels removes it. Randomness comes from an explicit generator on
the data's device so that a run is reproducible and resumable without touching global RNG state.
Both ops work on uint8 as well as float, so the loader augments before converting to float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["augment", "random_crop", "random_flip"]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map coordinates in ``[-size + 1, 2 * size - 2]`` back into ``[0, size)`` by mirroring at the
    edges without repeating them (numpy ``mode='reflect'``, ``F.pad(mode='reflect')``)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator, mode: str = "zeros"
) -> torch.Tensor:
    """Pad by ``padding`` then crop back to ``H x W`` at an independent offset per image.

    ``mode='zeros'``: the distribution of ``torchvision.transforms.RandomCrop(size, padding=padding,
    fill=0)`` (TRADES, LBGAT). ``mode='reflect'``: reflection padding, as Rice et al.'s and CAT's code
    pad the whole training set with ``np.pad(..., mode='reflect')`` and crop it. Offsets are uniform
    in ``[0, 2 * padding]`` on each axis either way. Reflection gathers straight from ``x`` (mirrored
    indices), which works on uint8 too.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if mode not in ("zeros", "reflect"):
        raise ValueError(f"mode must be 'zeros' or 'reflect', got {mode!r}")
    if padding == 0:
        return x
    b, c, h, w = x.shape
    dev = x.device
    if mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflection padding {padding} needs images larger than it, got {h}x{w}")
    off_y = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    off_x = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    rows = off_y[:, None] + torch.arange(h, device=dev)  # [B, H], in padded coordinates
    cols = off_x[:, None] + torch.arange(w, device=dev)  # [B, W]
    if mode == "reflect":
        padded = x
        rows, cols = _reflect(rows - padding, h), _reflect(cols - padding, w)
    else:
        padded = F.pad(x, (padding, padding, padding, padding))
    # One advanced-indexing gather for the whole batch; broadcasts to [B, C, H, W].
    return padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def random_flip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image horizontally with probability ``p``, independently per image."""
    flip = torch.rand((x.shape[0],), generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(
    x: torch.Tensor,
    *,
    padding: int,
    flip: bool,
    generator: torch.Generator,
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Crop then flip, in a fixed order so that a given generator state always yields the same batch."""
    x = random_crop(x, padding, generator, padding_mode)
    if flip:
        x = random_flip(x, generator)
    return x
