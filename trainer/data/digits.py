"""scikit-learn's bundled 8x8 handwritten digits: a real dataset that needs no download.

It lets CI and offline boxes run true end-to-end training/evaluation on real images.
"""

from __future__ import annotations

import numpy as np
import torch

from .arrays import ArrayDataset

__all__ = ["load_digits"]


def load_digits(*, train: bool, test_fraction: float = 0.25, seed: int = 0) -> ArrayDataset:
    """Return one side of a stratified split that is a pure function of ``(test_fraction, seed)``.

    The split is recomputed on each call, so train and test loaded separately never overlap as
    long as both calls pass the same arguments.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sk_load_digits()
    values = np.asarray(bunch.data, dtype=np.float64).reshape(-1, 1, 8, 8)  # 0..16
    images = np.rint(values * 255.0 / 16.0).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = _stratified_split(labels, test_fraction, seed)
    idx = train_idx if train else test_idx
    return ArrayDataset(
        images=torch.from_numpy(np.ascontiguousarray(images[idx])),
        labels=torch.from_numpy(labels[idx]),
        num_classes=10,
        name="digits",
    )


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Own implementation rather than sklearn's train_test_split, whose shuffling may change
    # between sklearn releases; a benchmark split must stay fixed across environments.
    rng = np.random.Generator(np.random.PCG64(seed))
    test_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = round(len(members) * test_fraction)
        test_parts.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts))
    mask = np.ones(len(labels), dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx
