"""Reader for the MNIST IDX files, plain or gzipped.

Both torchvision's layout (``root/MNIST/raw``) and a flat folder of the four files are accepted,
so an existing torchvision download and hand-staged files work alike.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayDataset, DatasetNotFoundError

__all__ = ["load_mnist", "read_idx"]

_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/ (the mirror torchvision uses)",
    "http://yann.lecun.com/exdb/mnist/",
)
_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dims
_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dim


def load_mnist(root: str | os.PathLike, *, train: bool, download: bool = False) -> ArrayDataset:
    root = Path(root)
    found = _find(root, train)
    if found is None and download:
        _download_with_torchvision(root, train)
        found = _find(root, train)
    if found is None:
        raise DatasetNotFoundError(_not_found_message(root, train, download))
    img_path, lbl_path = found
    images = read_idx(img_path, expected_magic=_IMAGES_MAGIC)
    labels = read_idx(lbl_path, expected_magic=_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    return ArrayDataset(
        images=torch.from_numpy(images[:, None].copy()),  # frombuffer arrays are read-only
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
        name="mnist",
    )


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Parse an unsigned-byte IDX file (header: magic, then one big-endian uint32 per dim)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        blob = f.read()
    if len(blob) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    (magic,) = struct.unpack(">I", blob[:4])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: IDX magic {magic}, expected {expected_magic}")
    if magic >> 16 != 0 or (magic >> 8) & 0xFF != 0x08:
        raise ValueError(f"{path}: IDX magic {magic:#010x} is not an unsigned-byte IDX file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", blob[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(blob) - header != expected:
        raise ValueError(f"{path}: header says {dims} = {expected} bytes, payload has {len(blob) - header}")
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, train: bool) -> tuple[Path, Path] | None:
    for folder in (root / "MNIST" / "raw", root):
        found = []
        for name in _FILES[train]:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found.append(candidate)
                    break
        if len(found) == 2:
            return found[0], found[1]
    return None


def _download_with_torchvision(root: Path, train: bool) -> None:
    try:
        import torchvision.datasets as tvd
    except Exception as exc:  # ImportError, or a torch/torchvision ABI mismatch
        raise DatasetNotFoundError(
            f"download=True needs torchvision, which does not import here ({exc}). "
            + _not_found_message(root, train, download=False)
        ) from exc
    root.mkdir(parents=True, exist_ok=True)
    tvd.MNIST(str(root), train=train, download=True)


def _not_found_message(root: Path, train: bool, download: bool) -> str:
    names = " and ".join(_FILES[train])
    msg = (
        f"MNIST ({'train' if train else 'test'}) not found under root {root}: expected {names} "
        f"(optionally with .gz) in {root / 'MNIST' / 'raw'} or directly in {root}. "
        f"Get the official files from {_MIRRORS[0]} or {_MIRRORS[1]}"
    )
    if not download:
        msg += ", or pass download=True on a machine with internet where torchvision imports"
    return msg + "."
