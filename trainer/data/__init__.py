"""Dataset readers for the real on-disk formats and a GPU-resident loader with batched augmentation.

Nothing here imports torchvision: the training core must run where torchvision is missing.
"""

from .arrays import ArrayDataset, DatasetNotFoundError, derive_seed
from .augment import augment, random_crop, random_flip
from .cifar import load_cifar10, load_cifar100
from .digits import load_digits
from .loader import DeviceLoader
from .mnist import load_mnist, read_idx
from .registry import DATASET_INFO, DatasetInfo, canonical_name, load_dataset
from .synthetic import make_synthetic
from .tiny_imagenet import load_tiny_imagenet

__all__ = [
    "DATASET_INFO",
    "ArrayDataset",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DeviceLoader",
    "augment",
    "canonical_name",
    "derive_seed",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_tiny_imagenet",
    "make_synthetic",
    "random_crop",
    "random_flip",
    "read_idx",
]
