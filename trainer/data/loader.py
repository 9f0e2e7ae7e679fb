"""A batch loader for datasets that live entirely on the training device.

The datasets used here are at most a few hundred MB as uint8, so keeping them on the GPU and
gathering/augmenting batches there beats a worker-based DataLoader by a wide margin and removes
all host-to-device copies from the training loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .arrays import ArrayDataset, derive_seed
from .augment import augment as augment_batch

__all__ = ["DeviceLoader"]

_AUG_STREAM = 1  # separates the augmentation seed from the order seed derived from the same inputs


class DeviceLoader:
    """Iterates an ArrayDataset already placed on `device` (uint8), producing float batches in [0,1].

    Reproducibility contract: the order and the augmentation of epoch ``e`` depend only on
    ``(seed, e, rank)``, so a run resumed at epoch ``e`` (after ``set_epoch(e)``) sees exactly what
    an uninterrupted run would, and one resumed at batch ``k`` of it (``batches(k)``) too. Like
    ``DistributedSampler``, the epoch is not advanced implicitly: call ``set_epoch`` before each epoch.

    Sharding follows ``DistributedSampler``: the epoch permutation is padded to a multiple of
    ``world_size`` by wrapping around and rank ``r`` takes every ``world_size``-th index starting
    at ``r``, so all ranks run the same number of steps (a few samples repeat when ``N`` is not
    divisible; for exact distributed evaluation shard the metric instead).
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        *,
        batch_size: int,
        device: torch.device | str,
        shuffle: bool,
        augment: bool,
        crop_padding: int = 4,
        padding_mode: str = "zeros",
        flip: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        two_views: bool = False,
        channels_last: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        if len(dataset) == 0:
            raise ValueError(f"dataset {dataset.name!r} is empty")
        self.device = torch.device(device)
        self.dataset = dataset.to(self.device)  # once; stays uint8 on the device
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = crop_padding
        self.padding_mode = padding_mode
        self.flip = flip
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.two_views = two_views
        self.channels_last = channels_last
        self.epoch = 0
        n = len(self.dataset)
        self.num_samples = -(-n // world_size)  # per rank, after wrap-padding
        self.total_size = self.num_samples * world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, as a CPU int64 tensor."""
        n = len(self.dataset)
        if self.shuffle:
            # CPU generator: the permutation must be identical on every rank, whatever its device.
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        pad = self.total_size - n
        if pad:
            order = torch.cat([order, order.repeat(-(-pad // n))[:pad]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """The current epoch's batches from batch index `start` on: exactly the batches `start`,
        `start + 1`, ... that iterating from 0 would give (a run resumed mid-epoch). The augmentation
        generator is advanced over the skipped batches by drawing their augmentations again (no
        model work), so the step index alone, with (seed, epoch, rank), fixes what comes next."""
        n_batches = len(self)
        if not 0 <= start <= n_batches:
            raise ValueError(f"start must be in [0, {n_batches}], got {start}")
        idx = self.indices().to(self.device)
        images, labels = self.dataset.images, self.dataset.labels
        gen = None
        if self.augment:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(derive_seed(self.seed, self.epoch, self.rank, _AUG_STREAM))
            for b in range(start):  # replay the skipped batches' draws
                raw = images.index_select(0, idx[b * self.batch_size : (b + 1) * self.batch_size])
                for _ in range(2 if self.two_views else 1):
                    self._view(raw, gen)
        for b in range(start, n_batches):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            raw = images.index_select(0, sel)
            y = labels.index_select(0, sel)
            x1 = self._view(raw, gen)
            if self.two_views:
                yield x1, self._view(raw, gen), y
            else:
                yield x1, y

    def _view(self, raw: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        # Augment while still uint8 (a quarter of the bytes to move), then convert like ToTensor.
        if gen is not None:
            raw = augment_batch(
                raw, padding=self.crop_padding, flip=self.flip, generator=gen, padding_mode=self.padding_mode
            )
        x = raw.to(torch.float32).div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
