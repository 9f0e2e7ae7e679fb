"""Reader for the Tiny-ImageNet-200 folder layout (``tiny-imagenet-200.zip`` from CS231n).

Decoding the 100k training JPEGs takes minutes, longer than a short training run, so the decoded
uint8 tensor is cached next to the data and reused by every later run on that volume.

Resizing (``resize_to``, e.g. 32 as in the LBGAT paper) uses Pillow's BILINEAR filter on the
decoded RGB image. When shrinking, Pillow widens the filter support by the scale factor, i.e. it
antialiases; this is what ``torchvision.transforms.Resize`` does on PIL images, so the pixels match
the reference pipelines that resized with torchvision.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .arrays import ArrayDataset, DatasetNotFoundError

__all__ = ["load_tiny_imagenet"]

log = logging.getLogger(__name__)

_DIR = "tiny-imagenet-200"
_ZIP = "tiny-imagenet-200.zip"
_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_NATIVE_SIZE = 64
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
_CACHE_VERSION = 1


def load_tiny_imagenet(root: str | os.PathLike, *, train: bool, resize_to: int | None = None) -> ArrayDataset:
    """Load the train split, or the labelled val split when ``train=False`` (test has no labels)."""
    if resize_to is not None and resize_to <= 0:
        raise ValueError(f"resize_to must be a positive int or None, got {resize_to}")
    root = Path(root)
    base = _locate(root)
    wnids = _read_wnids(base)
    class_index = {w: i for i, w in enumerate(wnids)}
    paths, labels = _list_train(base, wnids) if train else _list_val(base, class_index)
    if not paths:
        split_name = "train" if train else "val"
        raise DatasetNotFoundError(f"Tiny-ImageNet under {base} lists no {split_name} images")

    split = "train" if train else "val"
    cache = base / f".cache_{split}_{resize_to or _NATIVE_SIZE}.pt"
    fingerprint = _fingerprint(base, paths, labels, resize_to)
    images = _read_cache(cache, fingerprint, len(paths))
    if images is None:
        images = _decode_all(paths, resize_to)
        _write_cache(cache, fingerprint, images)
    return ArrayDataset(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=len(wnids),
        name="tiny_imagenet",
    )


def _locate(root: Path) -> Path:
    base = root / _DIR
    if (base / "wnids.txt").is_file():
        return base
    archive = root / _ZIP
    if archive.is_file():
        log.info("extracting %s into %s", archive, root)
        with zipfile.ZipFile(archive) as zf:
            root_resolved = root.resolve()
            for name in zf.namelist():
                target = (root / name).resolve()
                if root_resolved not in target.parents:
                    raise DatasetNotFoundError(f"{archive}: unsafe member path {name!r}")
            zf.extractall(root)
        if (base / "wnids.txt").is_file():
            return base
    raise DatasetNotFoundError(
        f"Tiny-ImageNet not found under root {root}: expected {base}/wnids.txt, "
        f"{base}/train/<wnid>/images/*.JPEG, {base}/val/images/*.JPEG and "
        f"{base}/val/val_annotations.txt, or the archive {archive} (extracted on first use). "
        f"Get the official archive from {_URL} and put it in {root}; torchvision has no "
        "downloader for it, so download=True cannot fetch it."
    )


def _read_wnids(base: Path) -> list[str]:
    lines = (base / "wnids.txt").read_text().split()
    wnids = sorted(set(lines))
    if len(wnids) != len(lines):
        raise ValueError(f"{base}/wnids.txt has duplicate entries")
    if not wnids:
        raise DatasetNotFoundError(f"{base}/wnids.txt is empty")
    return wnids


def _list_train(base: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for idx, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise DatasetNotFoundError(f"Tiny-ImageNet: missing {folder} (wnid listed in wnids.txt)")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        paths.extend(files)
        labels.extend([idx] * len(files))
    return paths, labels


def _list_val(base: Path, class_index: dict[str, int]) -> tuple[list[Path], list[int]]:
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetNotFoundError(f"Tiny-ImageNet: missing {ann} (the val labels)")
    paths: list[Path] = []
    labels: list[int] = []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{ann}:{lineno}: expected 'filename<TAB>wnid<TAB>bbox...', got {line!r}")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_index:
            raise ValueError(f"{ann}:{lineno}: wnid {wnid!r} is not in wnids.txt")
        path = base / "val" / "images" / fname
        if not path.is_file():
            raise DatasetNotFoundError(f"Tiny-ImageNet: {ann} lists {fname} but {path} is missing")
        paths.append(path)
        labels.append(class_index[wnid])
    return paths, labels


def _fingerprint(base: Path, paths: list[Path], labels: list[int], resize_to: int | None) -> str:
    # File names + labels + resize setting identify the content well enough to catch a changed or
    # partially copied tree, without stat-ing or hashing 100k files on every start.
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v{_CACHE_VERSION}|resize={resize_to}|".encode())
    for p, y in zip(paths, labels):
        h.update(f"{p.relative_to(base).as_posix()}\t{y}\n".encode())
    return h.hexdigest()


def _read_cache(cache: Path, fingerprint: str, n: int) -> torch.Tensor | None:
    from ..checkpoint import safe_load

    if not cache.is_file():
        return None
    try:
        blob = safe_load(cache, max_bytes=None)  # weights_only; its size follows the dataset
        images = blob["images"]
        if blob.get("fingerprint") != fingerprint or images.dtype != torch.uint8 or images.shape[0] != n:
            log.info("ignoring stale cache %s", cache)
            return None
        return images
    except Exception as exc:  # a truncated or foreign file must not block loading the real data
        log.warning("ignoring unreadable cache %s (%s)", cache, exc)
        return None


def _write_cache(cache: Path, fingerprint: str, images: torch.Tensor) -> None:
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    try:
        torch.save({"fingerprint": fingerprint, "images": images}, tmp)
        os.replace(tmp, cache)  # atomic, so concurrent workers never read a half-written cache
    except OSError as exc:  # read-only dataset mounts are normal; the cache is an optimisation
        log.info("not caching decoded Tiny-ImageNet to %s (%s)", cache, exc)
        tmp.unlink(missing_ok=True)


def _decode_all(paths: list[Path], resize_to: int | None) -> torch.Tensor:
    from PIL import Image

    def decode(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        if resize_to is not None and rgb.size != (resize_to, resize_to):
            rgb = rgb.resize((resize_to, resize_to), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)

    first = decode(paths[0])
    h, w = first.shape[:2]
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    out[0] = first

    def fill(i: int) -> None:
        arr = decode(paths[i])
        if arr.shape != first.shape:
            raise ValueError(f"{paths[i]} is {arr.shape[1]}x{arr.shape[0]}, expected {w}x{h}; pass resize_to")
        out[i] = arr

    # Pillow releases the GIL while decoding, so threads give a near-linear speed-up.
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(fill, range(1, len(paths))):
            pass
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
