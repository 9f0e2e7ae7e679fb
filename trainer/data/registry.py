"""Dataset names as used in run specs, mapped to readers and static facts about each dataset.

Static facts (classes, channels, size, crop padding) let callers build models and loaders, and
validate specs, without reading any files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from .arrays import ArrayDataset, derive_seed
from .cifar import load_cifar10, load_cifar100
from .digits import load_digits
from .mnist import load_mnist
from .synthetic import make_synthetic
from .tiny_imagenet import load_tiny_imagenet

__all__ = ["DATASET_INFO", "DatasetInfo", "canonical_name", "load_dataset"]


class DatasetInfo(NamedTuple):
    num_classes: int
    channels: int
    image_size: int  # native side length; tiny_imagenet may be loaded resized (resize_to)
    crop_padding: int  # default RandomCrop padding in the standard recipe; 0 = no crop


DATASET_INFO: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, 3, 32, 4),
    "cifar100": DatasetInfo(100, 3, 32, 4),
    # 4 px as in the LBGAT recipe (which resizes to 32); also the common choice at 64 px.
    "tiny_imagenet": DatasetInfo(200, 3, 64, 4),
    # MNIST/digits adversarial training uses no crop: digits are centred and the images tiny.
    "mnist": DatasetInfo(10, 1, 28, 0),
    "digits": DatasetInfo(10, 1, 8, 0),
    "synthetic": DatasetInfo(10, 3, 32, 4),
}

_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "tiny-imagenet": "tiny_imagenet",
    "tinyimagenet": "tiny_imagenet",
    "tiny-imagenet-200": "tiny_imagenet",
}


def canonical_name(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASET_INFO))}")
    return key


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike,
    train: bool,
    download: bool = False,
    resize_to: int | None = None,
    n_synthetic: int = 1024,
    seed: int = 0,
) -> ArrayDataset:
    """Load a split by name.

    ``seed`` only matters for datasets generated or split in code: the digits train/test split
    and the synthetic data (whose train and test sets use different noise but the same classes).
    ``resize_to`` applies to tiny_imagenet, and to synthetic as its side length.
    """
    key = canonical_name(name)
    root = Path(root)
    info = DATASET_INFO[key]
    if resize_to is not None and key not in ("tiny_imagenet", "synthetic") and resize_to != info.image_size:
        raise ValueError(f"resize_to is only supported for tiny_imagenet and synthetic, not {key}")
    if key == "cifar10":
        return load_cifar10(root, train=train, download=download)
    if key == "cifar100":
        return load_cifar100(root, train=train, download=download)
    if key == "tiny_imagenet":
        return load_tiny_imagenet(root, train=train, resize_to=resize_to)
    if key == "mnist":
        return load_mnist(root, train=train, download=download)
    if key == "digits":
        return load_digits(train=train, seed=seed)
    side = resize_to or info.image_size
    return make_synthetic(
        n_synthetic,
        num_classes=info.num_classes,
        shape=(info.channels, side, side),
        seed=derive_seed(seed, int(train)),
    )
