"""Readers for the official CIFAR-10/100 "python version" archives.

We parse the pickles ourselves instead of going through torchvision so that the training core
runs on boxes where torchvision is absent or ABI-mismatched with the installed torch; torchvision
is only borrowed, when present, to perform a download.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayDataset, DatasetNotFoundError

__all__ = ["load_cifar10", "load_cifar100"]

log = logging.getLogger(__name__)

_CIFAR10 = {
    "title": "CIFAR-10",
    "dir": "cifar-10-batches-py",
    "archive": "cifar-10-python.tar.gz",
    "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
    "label_key": b"labels",
    "num_classes": 10,
    "name": "cifar10",
    "tv_class": "CIFAR10",
}
_CIFAR100 = {
    "title": "CIFAR-100",
    "dir": "cifar-100-python",
    "archive": "cifar-100-python.tar.gz",
    "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "train": ["train"],
    "test": ["test"],
    "label_key": b"fine_labels",
    "num_classes": 100,
    "name": "cifar100",
    "tv_class": "CIFAR100",
}


def load_cifar10(root: str | os.PathLike, *, train: bool, download: bool = False) -> ArrayDataset:
    return _load(_CIFAR10, Path(root), train=train, download=download)


def load_cifar100(root: str | os.PathLike, *, train: bool, download: bool = False) -> ArrayDataset:
    return _load(_CIFAR100, Path(root), train=train, download=download)


def _load(spec: dict, root: Path, *, train: bool, download: bool) -> ArrayDataset:
    files: list[str] = spec["train"] if train else spec["test"]
    read = _locate(spec, root, files)
    if read is None and download:
        _download_with_torchvision(spec, root, train=train)
        read = _locate(spec, root, files)
    if read is None:
        raise DatasetNotFoundError(_not_found_message(spec, root, files, download=download))

    images, labels = [], []
    for fname in files:
        data, lab = _parse_batch(read(fname), spec["label_key"], where=f"{spec['dir']}/{fname}")
        images.append(data)
        labels.append(lab)
    return ArrayDataset(
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        num_classes=spec["num_classes"],
        name=spec["name"],
    )


def _locate(spec: dict, root: Path, files: Sequence[str]) -> Callable[[str], bytes] | None:
    """Find the batch files, extracting the .tar.gz on first use.

    Returns a reader by file name. When ``root`` is read-only (a shared dataset mount) the
    archive is read in memory instead of extracted, so a bare archive is always enough.
    """
    folder = root / spec["dir"]
    if all((folder / f).is_file() for f in files):
        return lambda f: (folder / f).read_bytes()
    archive = root / spec["archive"]
    if not archive.is_file():
        return None
    try:
        _safe_extract(archive, root)
    except OSError as exc:
        log.warning("cannot extract %s into %s (%s); reading it in memory", archive, root, exc)
        return _reader_from_tar(archive, spec["dir"], files)
    if all((folder / f).is_file() for f in files):
        return lambda f: (folder / f).read_bytes()
    raise DatasetNotFoundError(
        f"{archive} was extracted but {folder} still lacks {', '.join(files)}; the archive is not "
        f"the official {spec['title']} python version ({spec['url']})"
    )


def _reader_from_tar(archive: Path, dirname: str, files: Sequence[str]) -> Callable[[str], bytes]:
    blobs: dict[str, bytes] = {}
    with tarfile.open(archive, "r:*") as tar:
        for f in files:
            try:
                member = tar.extractfile(f"{dirname}/{f}")
            except KeyError:
                member = None
            if member is None:
                raise DatasetNotFoundError(f"{archive} has no member {dirname}/{f}")
            blobs[f] = member.read()
    return blobs.__getitem__


def _safe_extract(archive: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:*") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
            return
        # Older interpreters without extraction filters: refuse path traversal ourselves.
        dest_resolved = dest.resolve()
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if dest_resolved not in target.parents and target != dest_resolved:
                raise DatasetNotFoundError(f"{archive}: unsafe member path {member.name!r}")
            if member.issym() or member.islnk():
                raise DatasetNotFoundError(f"{archive}: refusing link member {member.name!r}")
        tar.extractall(dest)


def _parse_batch(blob: bytes, label_key: bytes, *, where: str) -> tuple[np.ndarray, np.ndarray]:
    # The archives are pickles by upstream design; only load them from a trusted dataset root.
    try:
        d = pickle.load(io.BytesIO(blob), encoding="bytes")
    except Exception as exc:
        raise ValueError(f"{where}: not a CIFAR python pickle ({exc})") from exc
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{where}: expected keys b'data' and {label_key!r}, found {keys}")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{where}: data {data.shape} / labels {labels.shape} are not [N, 3072] / [N]")
    # Row layout is 1024 R, 1024 G, 1024 B, each plane row-major 32x32: exactly NCHW.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


def _download_with_torchvision(spec: dict, root: Path, *, train: bool) -> None:
    try:
        import torchvision.datasets as tvd
    except Exception as exc:  # ImportError, or a torch/torchvision ABI mismatch
        raise DatasetNotFoundError(
            f"download=True needs torchvision, which does not import here ({exc}). "
            + _not_found_message(spec, root, spec["train"] if train else spec["test"], download=False)
        ) from exc
    root.mkdir(parents=True, exist_ok=True)
    getattr(tvd, spec["tv_class"])(str(root), train=train, download=True)


def _not_found_message(spec: dict, root: Path, files: Sequence[str], *, download: bool) -> str:
    folder = root / spec["dir"]
    missing = [f for f in files if not (folder / f).is_file()]
    msg = (
        f"{spec['title']} not found under root {root}: expected the directory {folder} containing "
        f"{', '.join(files)} (missing: {', '.join(missing) or 'none'}), or the archive "
        f"{root / spec['archive']} (it is extracted on first use). Get the official archive from "
        f"{spec['url']} and put it in {root}"
    )
    if not download:
        msg += ", or pass download=True on a machine with internet where torchvision imports"
    return msg + "."
