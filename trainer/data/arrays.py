"""In-memory image datasets shared by every reader, the loader and the trainer.

Every supported dataset fits in (GPU) memory as uint8, so a dataset is just two tensors; keeping
uint8 until a batch is gathered cuts memory and host-to-device traffic by 4x versus float32.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

__all__ = ["ArrayDataset", "DatasetNotFoundError", "derive_seed"]


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are not on disk and cannot be fetched.

    Subclasses FileNotFoundError so generic callers still catch it, while the message (built by
    each reader) names the exact files expected and how to obtain them, because on the clusters
    there is often no internet and the operator has to stage the archives by hand.
    """


def derive_seed(*parts: int) -> int:
    """Mix integers into a 63-bit seed that is stable across processes, hosts and Python versions.

    ``hash()`` is salted per process and naive arithmetic (seed + epoch) makes (seed=1, epoch=0)
    collide with (seed=0, epoch=1); a cryptographic digest avoids both.
    """
    data = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


# eq=False: the generated __eq__ would compare tensors elementwise and raise on truth-testing;
# identity semantics (and hashability) are what callers need.
@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled image set held as uint8 ``[N, C, H, W]`` plus int64 ``[N]`` labels."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        # Validate once here so that the loader and augmentations can skip defensive checks.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"{self.name}: images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                f"{self.name}: labels must be int64 [N], got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if self.images.device != self.labels.device:
            raise ValueError(f"{self.name}: images on {self.images.device}, labels on {self.labels.device}")
        if self.num_classes <= 0:
            raise ValueError(f"{self.name}: num_classes must be positive, got {self.num_classes}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
            f"num_classes={self.num_classes}, device={self.images.device})"
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: torch.Tensor) -> ArrayDataset:
        indices = torch.as_tensor(indices, dtype=torch.int64).to(self.images.device)
        return replace(self, images=self.images[indices], labels=self.labels[indices])

    def to(self, device: torch.device | str) -> ArrayDataset:
        device = torch.device(device)
        if self.images.device == device:
            return self
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def split(self, n_holdout: int, *, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
        """Return ``(rest, holdout)``; the holdout drives best-checkpoint selection.

        The permutation comes from a CPU generator so that the split is identical on every
        device and every rank (each rank must validate on the same images). Both parts keep the
        original relative order, which keeps sequential evaluation reproducible.
        """
        n = len(self)
        if not 0 <= n_holdout <= n:
            raise ValueError(f"{self.name}: n_holdout must be in [0, {n}], got {n_holdout}")
        gen = torch.Generator().manual_seed(derive_seed(seed, n, n_holdout))
        perm = torch.randperm(n, generator=gen)
        holdout_idx = perm[:n_holdout].sort().values
        rest_idx = perm[n_holdout:].sort().values
        return self.subset(rest_idx), self.subset(holdout_idx)
