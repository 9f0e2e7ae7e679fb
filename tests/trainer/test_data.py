"""Readers are checked against files written in the real on-disk formats; loader/augment on CPU."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import safe_load
from trainer.data import (
    DATASET_INFO,
    ArrayDataset,
    DatasetNotFoundError,
    DeviceLoader,
    augment,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_mnist,
    load_tiny_imagenet,
    make_synthetic,
    random_crop,
    random_flip,
)

# ----------------------------------------------------------------------------- CIFAR


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _cifar_row(img: np.ndarray) -> np.ndarray:
    """Official row layout, built explicitly: 1024 R, then 1024 G, then 1024 B, each row-major."""
    row = np.empty(3072, dtype=np.uint8)
    for ch in range(3):
        for r in range(32):
            for c in range(32):
                row[ch * 1024 + r * 32 + c] = img[ch, r, c]
    return row


def _write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: bytes) -> None:
    d = {
        b"batch_label": b"testing batch",
        label_key: labels,
        b"data": np.stack([_cifar_row(im) for im in images]),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [y // 5 for y in labels]
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def _write_cifar10(root: Path) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_imgs, train_lbls = [], []
    for b in range(1, 6):
        imgs = _cifar_images(2, seed=b)
        lbls = [(2 * b) % 10, (2 * b + 1) % 10]
        _write_cifar_batch(folder / f"data_batch_{b}", imgs, lbls, b"labels")
        train_imgs.append(imgs)
        train_lbls += lbls
    test_imgs = _cifar_images(3, seed=99)
    test_lbls = [7, 0, 3]
    _write_cifar_batch(folder / "test_batch", test_imgs, test_lbls, b"labels")
    return np.concatenate(train_imgs), train_lbls, test_imgs, test_lbls


def test_cifar10_reads_official_pickles(tmp_path):
    train_imgs, train_lbls, test_imgs, test_lbls = _write_cifar10(tmp_path)
    tr = load_cifar10(tmp_path, train=True)
    te = load_cifar10(tmp_path, train=False)
    assert tr.images.dtype == torch.uint8 and tr.images.shape == (10, 3, 32, 32)
    assert tr.labels.dtype == torch.int64 and tr.labels.tolist() == train_lbls
    assert np.array_equal(tr.images.numpy(), train_imgs)
    assert np.array_equal(te.images.numpy(), test_imgs) and te.labels.tolist() == test_lbls
    assert tr.num_classes == 10 and tr.name == "cifar10"


def test_cifar10_pixel_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, 0] = 11  # R at (0, 0)
    row[0, 1024 + 1 * 32 + 2] = 22  # G at row 1, col 2
    row[0, 2048 + 31 * 32 + 31] = 33  # B at (31, 31)
    d = {b"batch_label": b"x", b"labels": [4], b"data": row, b"filenames": [b"a.png"]}
    for name in ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(d))
    img = load_cifar10(tmp_path, train=False).images[0]
    assert img[0, 0, 0] == 11 and img[1, 1, 2] == 22 and img[2, 31, 31] == 33
    assert int(img.sum()) == 66


def test_cifar10_from_tar_gz(tmp_path):
    staging = tmp_path / "staging"
    train_imgs, train_lbls, _, _ = _write_cifar10(staging)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_cifar10(root, train=True)
    assert np.array_equal(ds.images.numpy(), train_imgs) and ds.labels.tolist() == train_lbls
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()  # extracted for next time


def test_cifar10_tar_gz_on_read_only_root(tmp_path, monkeypatch):
    import trainer.data.cifar as cifar

    staging = tmp_path / "staging"
    _, _, test_imgs, test_lbls = _write_cifar10(staging)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")

    def refuse(*_args, **_kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(cifar, "_safe_extract", refuse)
    ds = load_cifar10(root, train=False)
    assert np.array_equal(ds.images.numpy(), test_imgs) and ds.labels.tolist() == test_lbls
    assert not (root / "cifar-10-batches-py").exists()


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    imgs = _cifar_images(4, seed=5)
    _write_cifar_batch(folder / "train", imgs, [0, 42, 99, 42], b"fine_labels")
    _write_cifar_batch(folder / "test", imgs[:1], [17], b"fine_labels")
    tr = load_cifar100(tmp_path, train=True)
    assert tr.labels.tolist() == [0, 42, 99, 42] and tr.num_classes == 100
    assert np.array_equal(tr.images.numpy(), imgs)
    assert load_cifar100(tmp_path, train=False).labels.tolist() == [17]


def test_cifar_missing_names_expected_path(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_cifar10(tmp_path, train=True)
    msg = str(exc.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data_batch_1" in msg
    assert "cifar-10-python.tar.gz" in msg and "https://" in msg and "download=True" in msg
    assert isinstance(exc.value, FileNotFoundError)


def test_cifar_download_without_torchvision_explains(tmp_path):
    pytest.importorskip("torch")
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(DatasetNotFoundError, match="torchvision"):
            load_cifar100(tmp_path, train=True, download=True)
    else:
        pytest.skip("torchvision imports here; download would try the network")


# ----------------------------------------------------------------------------- Tiny-ImageNet

_COLOURS = {"n01443537": (255, 0, 0), "n01629819": (0, 255, 0), "n01641577": (0, 0, 255)}


def _write_tiny(root: Path, size: int = 64) -> Path:
    from PIL import Image

    base = root / "tiny-imagenet-200"
    # Deliberately unsorted to check that class index = position in sorted(wnids).
    wnids = ["n01641577", "n01443537", "n01629819"]
    (base).mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(2):
            img = Image.new("RGB", (size, size), _COLOURS[wnid])
            if i == 0:
                img.save(folder / f"{wnid}_{i}.JPEG", quality=95)
            else:
                img.save(folder / f"{wnid}_{i}.png")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for j, wnid in enumerate(["n01629819", "n01641577", "n01443537", "n01629819"]):
        Image.new("RGB", (size, size), _COLOURS[wnid]).save(base / "val" / "images" / f"val_{j}.JPEG")
        lines.append(f"val_{j}.JPEG\t{wnid}\t0\t0\t{size - 1}\t{size - 1}")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


def _colour_of(img: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in img.float().mean(dim=(1, 2)).round())


def test_tiny_imagenet_labels_and_pixels(tmp_path):
    _write_tiny(tmp_path)
    tr = load_tiny_imagenet(tmp_path, train=True)
    assert tr.images.shape == (6, 3, 64, 64) and tr.num_classes == 3 and tr.name == "tiny_imagenet"
    assert tr.labels.tolist() == [0, 0, 1, 1, 2, 2]
    sorted_wnids = sorted(_COLOURS)
    for img, y in zip(tr.images, tr.labels.tolist()):
        expected = _COLOURS[sorted_wnids[y]]
        assert (img.int() - torch.tensor(expected)[:, None, None]).abs().max() <= 3  # JPEG rounding
    va = load_tiny_imagenet(tmp_path, train=False)
    assert va.labels.tolist() == [1, 2, 0, 1]
    assert [_colour_of(im) for im in va.images] == [
        pytest.approx(_COLOURS[sorted_wnids[y]], abs=3) for y in va.labels.tolist()
    ]


def test_tiny_imagenet_resize_and_cache(tmp_path):
    base = _write_tiny(tmp_path)
    ds = load_tiny_imagenet(tmp_path, train=False, resize_to=32)
    assert ds.images.shape == (4, 3, 32, 32)
    cache = base / ".cache_val_32.pt"
    assert cache.is_file()
    # Poison the cached pixels: a second load must come from the cache, not from the JPEGs.
    blob = safe_load(cache, max_bytes=None)
    blob["images"] = torch.full_like(blob["images"], 7)
    torch.save(blob, cache)
    again = load_tiny_imagenet(tmp_path, train=False, resize_to=32)
    assert torch.all(again.images == 7) and again.labels.tolist() == ds.labels.tolist()
    # A changed tree invalidates the cache.
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01629819\t0\t0\t63\t63\n")
    changed = load_tiny_imagenet(tmp_path, train=False, resize_to=32)
    assert len(changed) == 1 and not torch.all(changed.images == 7)


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_tiny_imagenet(tmp_path, train=True)
    msg = str(exc.value)
    assert str(tmp_path / "tiny-imagenet-200") in msg and "wnids.txt" in msg
    assert "val_annotations.txt" in msg and "tiny-imagenet-200.zip" in msg


# ----------------------------------------------------------------------------- MNIST


def _idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x0800 | arr.ndim
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_mnist(folder: Path, *, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([5, 0, 4, 1, 9], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 2, 1], dtype=np.uint8),
    }
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize(("layout", "gz"), [("raw", False), ("raw", True), ("flat", False), ("flat", True)])
def test_mnist_idx(tmp_path, layout, gz):
    folder = tmp_path / "MNIST" / "raw" if layout == "raw" else tmp_path
    arrays = _write_mnist(folder, gz=gz)
    header = (folder / ("train-images-idx3-ubyte" + (".gz" if gz else ""))).read_bytes()
    raw_header = gzip.decompress(header) if gz else header
    assert struct.unpack(">I", raw_header[:4])[0] == 2051
    tr = load_mnist(tmp_path, train=True)
    te = load_mnist(tmp_path, train=False)
    assert tr.images.shape == (5, 1, 28, 28) and tr.images.dtype == torch.uint8
    assert np.array_equal(tr.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert tr.labels.tolist() == [5, 0, 4, 1, 9] and tr.labels.dtype == torch.int64
    assert np.array_equal(te.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert te.labels.tolist() == [7, 2, 1]


def test_mnist_bad_magic(tmp_path):
    arrays = _write_mnist(tmp_path, gz=False)
    bad = bytearray(_idx_bytes(arrays["train-labels-idx1-ubyte"]))
    bad[3] = 3  # claims 3 dims
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path, train=True)


def test_mnist_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as exc:
        load_mnist(tmp_path, train=False)
    msg = str(exc.value)
    assert "t10k-images-idx3-ubyte" in msg and str(tmp_path / "MNIST" / "raw") in msg


# ----------------------------------------------------------------------------- digits / synthetic / registry


def test_digits_split():
    tr = load_digits(train=True)
    te = load_digits(train=False)
    assert len(tr) + len(te) == 1797
    assert tr.images.shape[1:] == (1, 8, 8) and tr.images.dtype == torch.uint8
    assert int(tr.images.max()) == 255 and int(tr.images.min()) == 0
    # Disjoint: no image of the test split appears (with its label) in the train split.
    from sklearn.datasets import load_digits as sk

    raw = np.rint(sk().data * 255 / 16).astype(np.uint8)
    key = {row.tobytes(): i for i, row in enumerate(raw)}
    tr_ids = {key[im.numpy().tobytes()] for im in tr.images}
    te_ids = {key[im.numpy().tobytes()] for im in te.images}
    assert not tr_ids & te_ids
    counts_te = torch.bincount(te.labels, minlength=10)
    counts_all = torch.bincount(torch.cat([tr.labels, te.labels]), minlength=10)
    assert set(te.labels.tolist()) == set(range(10))
    assert torch.all((counts_te.float() - 0.25 * counts_all).abs() <= 1)
    assert torch.equal(load_digits(train=False).labels, te.labels)  # deterministic
    assert not torch.equal(load_digits(train=False, seed=1).images, te.images)


def test_synthetic_is_deterministic_and_learnable():
    a = make_synthetic(200, num_classes=4, shape=(3, 16, 16), seed=3)
    b = make_synthetic(200, num_classes=4, shape=(3, 16, 16), seed=3)
    c = make_synthetic(200, num_classes=4, shape=(3, 16, 16), seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.dtype == torch.uint8 and a.images.shape == (200, 3, 16, 16)
    assert torch.bincount(a.labels).tolist() == [50] * 4
    # Nearest class mean from one seed classifies another seed's images: the classes generalise.
    means = torch.stack([a.images[a.labels == k].float().mean(0) for k in range(4)])
    dist = ((c.images.float()[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == c.labels).float().mean() > 0.95


def test_registry(tmp_path):
    assert set(DATASET_INFO) == {"cifar10", "cifar100", "tiny_imagenet", "mnist", "digits", "synthetic"}
    assert DATASET_INFO["cifar100"].num_classes == 100 and DATASET_INFO["mnist"].channels == 1
    num_classes, channels, size, pad = DATASET_INFO["cifar10"]
    assert (num_classes, channels, size, pad) == (10, 3, 32, 4)
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("imagenet", root=tmp_path, train=True)
    syn_tr = load_dataset("synthetic", root=tmp_path, train=True, n_synthetic=64)
    syn_te = load_dataset("synthetic", root=tmp_path, train=False, n_synthetic=64)
    assert len(syn_tr) == 64 and syn_tr.images.shape[1:] == (3, 32, 32)
    assert not torch.equal(syn_tr.images, syn_te.images)
    _write_mnist(tmp_path, gz=True)
    assert len(load_dataset("mnist", root=tmp_path, train=True)) == 5
    with pytest.raises(DatasetNotFoundError):
        load_dataset("cifar10", root=tmp_path, train=True)
    _write_tiny(tmp_path)
    assert load_dataset("tiny_imagenet", root=tmp_path, train=False, resize_to=32).images.shape[-1] == 32


def test_array_dataset_split_and_subset():
    ds = make_synthetic(100, num_classes=5, shape=(1, 4, 4), seed=0)
    rest, hold = ds.split(20, seed=1)
    assert len(rest) == 80 and len(hold) == 20
    rest2, hold2 = ds.split(20, seed=1)
    assert torch.equal(hold.images, hold2.images) and torch.equal(rest.labels, rest2.labels)
    _, hold3 = ds.split(20, seed=2)
    assert not torch.equal(hold.images, hold3.images)
    # Together the two parts are exactly the original samples.
    both = torch.cat([rest.images, hold.images]).flatten(1)
    orig = ds.images.flatten(1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, orig.numpy()))
    sub = ds.subset(torch.tensor([3, 1]))
    assert torch.equal(sub.images[0], ds.images[3]) and sub.labels.tolist() == ds.labels[[3, 1]].tolist()
    with pytest.raises(ValueError):
        ds.split(101, seed=0)
    with pytest.raises(ValueError):
        ArrayDataset(ds.images.float(), ds.labels, 5, "bad")


# ----------------------------------------------------------------------------- augment


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop_matches_reference():
    x = torch.randint(0, 256, (16, 3, 8, 10), dtype=torch.uint8)
    pad = 3
    out = random_crop(x, pad, _gen(0))
    # Replay the same random draws to get each image's offsets.
    g = _gen(0)
    oy = torch.randint(0, 2 * pad + 1, (16,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (16,), generator=g)
    assert oy.min() >= 0 and oy.max() <= 2 * pad and len(set(zip(oy.tolist(), ox.tolist()))) > 1
    for i in range(16):
        padded = torch.zeros(3, 8 + 2 * pad, 10 + 2 * pad, dtype=torch.uint8)
        padded[:, pad : pad + 8, pad : pad + 10] = x[i]
        ref = padded[:, oy[i] : oy[i] + 8, ox[i] : ox[i] + 10]
        assert torch.equal(out[i], ref)
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_random_crop_float_ones_and_offsets_cover_range():
    x = torch.ones(512, 1, 6, 6)
    out = random_crop(x, 2, _gen(1))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert out.dtype == torch.float32
    # Zeros per image reveal the offset; all 5x5 offsets should occur in 512 draws.
    assert (out.sum(dim=(1, 2, 3)) == 36).any() and (out.sum(dim=(1, 2, 3)) == 16).any()
    assert torch.equal(random_crop(x, 0, _gen(1)), x)


def test_random_flip():
    x = torch.arange(64 * 2 * 3 * 4, dtype=torch.float32).reshape(64, 2, 3, 4)
    out = random_flip(x, _gen(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert torch.all(flipped ^ kept) and flipped.any() and kept.any()
    assert torch.equal(random_flip(x, _gen(0), p=1.0), x.flip(-1))
    assert torch.equal(random_flip(x, _gen(0), p=0.0), x)


def test_augment_reproducible():
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    a = augment(x, padding=2, flip=True, generator=_gen(5))
    b = augment(x, padding=2, flip=True, generator=_gen(5))
    c = augment(x, padding=2, flip=True, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- loader


def _indexed_dataset(n: int) -> ArrayDataset:
    """Each image's pixel (0, 0, 0) encodes its index (n <= 256), so batches reveal their samples."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n) % 3, 3, "indexed")


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def test_loader_epoch_covers_dataset_once():
    ds = _indexed_dataset(50)
    loader = DeviceLoader(ds, batch_size=8, device="cpu", shuffle=True, augment=False)
    assert len(loader) == 7
    seen, labels = [], []
    for x, y in loader:
        assert x.dtype == torch.float32 and x.min() >= 0.0 and x.max() <= 1.0
        seen += _ids(x)
        labels += y.tolist()
    assert sorted(seen) == list(range(50)) and seen != list(range(50))
    assert labels == [i % 3 for i in seen]
    assert len(DeviceLoader(ds, batch_size=8, device="cpu", shuffle=True, augment=False, drop_last=True)) == 6


def test_loader_sequential_eval():
    ds = _indexed_dataset(10)
    loader = DeviceLoader(ds, batch_size=4, device="cpu", shuffle=False, augment=False)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert [i for x, _ in batches for i in _ids(x)] == list(range(10))
    assert torch.allclose(batches[0][0], ds.images[:4].float() / 255)


def _epoch(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_set_epoch_reproducible():
    ds = make_synthetic(40, num_classes=4, shape=(3, 8, 8), seed=0)
    kw = dict(batch_size=16, device="cpu", shuffle=True, augment=True, crop_padding=2, seed=7)
    loader = DeviceLoader(ds, **kw)
    e3 = _epoch(loader, 3)
    _epoch(loader, 4)
    e3_again = _epoch(loader, 3)
    e3_fresh = _epoch(DeviceLoader(ds, **kw), 3)  # a resumed run
    for a, b, c in zip(e3, e3_again, e3_fresh):
        assert all(torch.equal(t, u) and torch.equal(t, v) for t, u, v in zip(a, b, c))
    e4 = _epoch(loader, 4)
    assert not torch.equal(e3[0][0], e4[0][0]) and not torch.equal(e3[0][1], e4[0][1])
    other_seed = _epoch(DeviceLoader(ds, **{**kw, "seed": 8}), 3)
    assert not torch.equal(e3[0][1], other_seed[0][1])


def test_loader_distributed_shards():
    n, ws = 23, 2
    ds = _indexed_dataset(n)
    loaders = [
        DeviceLoader(ds, batch_size=5, device="cpu", shuffle=True, augment=False, rank=r, world_size=ws)
        for r in range(ws)
    ]
    for ld in loaders:
        ld.set_epoch(2)
    assert len(loaders[0]) == len(loaders[1]) == 3
    ids = [[i for x, _ in ld for i in _ids(x)] for ld in loaders]
    assert len(ids[0]) == len(ids[1]) == 12
    assert set(ids[0]) | set(ids[1]) == set(range(n))
    # 24 slots for 23 samples: exactly one sample is repeated (the wrap-around pad).
    assert len(set(ids[0]) & set(ids[1])) <= 1 and len(ids[0]) + len(ids[1]) - n == 1
    # The ranks interleave one shared permutation padded by wrapping, like DistributedSampler.
    full = DeviceLoader(ds, batch_size=100, device="cpu", shuffle=True, augment=False)
    full.set_epoch(2)
    order = _ids(next(iter(full))[0])
    padded = order + order[:1]
    assert ids[0] == padded[0::2] and ids[1] == padded[1::2]


def test_loader_two_views_and_channels_last():
    n = 32
    # Solid images whose value is the index: a crop with padding < size keeps some original pixels
    # and a flip keeps all, so each view's max recovers which image it came from.
    images = torch.arange(1, n + 1, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    ds = ArrayDataset(images, torch.arange(n) % 4, 4, "solid")
    loader = DeviceLoader(
        ds,
        batch_size=16,
        device="cpu",
        shuffle=True,
        augment=True,
        crop_padding=3,
        two_views=True,
        channels_last=True,
    )
    batches = list(loader)
    assert len(batches) == 2
    differs = False
    for x1, x2, y in batches:
        assert x1.shape == x2.shape == (16, 3, 8, 8) and y.shape == (16,)
        assert x1.is_contiguous(memory_format=torch.channels_last)
        assert x1.dtype == x2.dtype == torch.float32 and float(x1.min()) >= 0.0 and float(x1.max()) <= 1.0
        ids1 = (x1.amax(dim=(1, 2, 3)) * 255).round().long() - 1
        ids2 = (x2.amax(dim=(1, 2, 3)) * 255).round().long() - 1
        assert torch.equal(ids1, ids2) and torch.equal(y, ids1 % 4)
        differs |= not torch.equal(x1, x2)
    assert differs


def test_loader_rejects_bad_args():
    ds = _indexed_dataset(4)
    with pytest.raises(ValueError):
        DeviceLoader(ds, batch_size=0, device="cpu", shuffle=False, augment=False)
    with pytest.raises(ValueError):
        DeviceLoader(ds, batch_size=2, device="cpu", shuffle=False, augment=False, rank=2, world_size=2)


def test_cifar_row_helper_is_c_order():
    # Guards the test helper itself: the explicit R/G/B-plane layout equals a C-order flatten.
    img = _cifar_images(1, seed=0)[0]
    assert np.array_equal(_cifar_row(img), img.reshape(-1))
