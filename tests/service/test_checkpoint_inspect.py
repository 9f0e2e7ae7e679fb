"""service.checkpoint_inspect: what a torch file holds, read without torch and without running it.

Real files come from trainer.checkpoint.save_checkpoint and torch.save; crafted ones are zip archives
written here around hand-made pickles. Every crafted pickle that names a callable would create a file
if it ran: the tests check the file is never there.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest

from service.checkpoint_inspect import CheckpointRefused, inspect_checkpoint
from tests.service.evaluations_helpers import save_digits_checkpoint

LIMIT = 64 * 1024 * 1024


def torch_zip(
    path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None, folder: str = "archive"
) -> Path:
    """A file laid out as torch.save writes it: <folder>/data.pkl, <folder>/data/<key>, version."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{folder}/data.pkl", data_pkl)
        archive.writestr(f"{folder}/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"{folder}/data/{key}", data)
        archive.writestr(f"{folder}/version", "3\n")
    return path


def test_this_projects_checkpoint(tmp_path: Path) -> None:
    info = inspect_checkpoint(save_digits_checkpoint(tmp_path / "c.pt"), max_unpacked_bytes=LIMIT)
    assert (info.format, info.format_version, info.num_classes, info.in_channels) == ("checkpoint", 2, 10, 1)
    assert (info.dataset, info.model, info.method, info.norm, info.eps) == (
        "digits",
        "tiny_cnn",
        "lbgat",
        "linf",
        0.1,
    )
    assert info.model_ref["width"] == 32 and not info.has_averaged
    assert (info.output_dim, info.classifier) == (10, "fc.weight")


def test_a_plain_state_dict_gives_its_shapes(tmp_path: Path) -> None:
    info = inspect_checkpoint(
        save_digits_checkpoint(tmp_path / "s.pt", plain=True, classes=7), max_unpacked_bytes=LIMIT
    )
    assert info.format == "state_dict" and info.spec is None
    assert (info.output_dim, info.classifier, info.in_channels) == (7, "fc.weight", 1)
    assert all(isinstance(shape, tuple) for shape in info.tensors.values())


def test_other_torch_files_are_not_checkpoints(tmp_path: Path) -> None:
    import torch

    torch.save(torch.nn.Parameter(torch.zeros(3)), tmp_path / "p.pt")
    with pytest.raises(CheckpointRefused, match="holds a TensorInfo, not a checkpoint"):
        inspect_checkpoint(tmp_path / "p.pt", max_unpacked_bytes=LIMIT)
    torch.save({"state_dict": {"w": torch.zeros(2, 2)}}, tmp_path / "nested.pt")
    with pytest.raises(CheckpointRefused, match="not a tensor: a plain state dict maps"):
        inspect_checkpoint(tmp_path / "nested.pt", max_unpacked_bytes=LIMIT)
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointRefused, match="not torch's zip format"):
        inspect_checkpoint(tmp_path / "legacy.pt", max_unpacked_bytes=LIMIT)


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


class _Open:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def _crafted(marker: Path) -> dict[str, bytes]:
    touch = f"touch {marker}"
    return {
        "os.system via __reduce__ (protocol 2)": pickle.dumps({"robust": _System(touch)}, protocol=2),
        "os.system (protocol 4, STACK_GLOBAL)": pickle.dumps({"robust": _System(touch)}, protocol=4),
        "builtins.open creating a file": pickle.dumps(_Open(str(marker)), protocol=2),
        "GLOBAL + REDUCE by hand (protocol 0)": f"cos\nsystem\n(S'{touch}'\ntR.".encode(),
        "INST opcode (protocol 0)": f"(S'{touch}'\nios\nsystem\n.".encode(),
        "builtins.eval": b'cbuiltins\neval\n(S\'__import__("os").system("' + touch.encode() + b"\")'\ntR.",
        "subprocess.Popen": b"csubprocess\nPopen\n((S'touch'\nS'" + str(marker).encode() + b"'\nltR.",
        "builtins.getattr": b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__class__'\ntR.",
        "torch.load_from_bytes": b"ctorch.storage\n_load_from_bytes\n(S'x'\ntR.",
        "numpy array": b"cnumpy.core.multiarray\n_reconstruct\n(tR.",
        "an OrderedDict's __setstate__ calling out": b"ccollections\nOrderedDict\n)R(cos\nsystem\n(S'"
        + touch.encode()
        + b"'\ntRb.",
    }


@pytest.mark.parametrize("case", list(_crafted(Path("x"))))
def test_a_pickle_that_calls_anything_else_is_refused_before_it_runs(tmp_path: Path, case: str) -> None:
    marker = tmp_path / "ran"
    path = torch_zip(tmp_path / "evil.pt", _crafted(marker)[case])
    with pytest.raises(CheckpointRefused, match=r"nothing in it ran"):
        inspect_checkpoint(path, max_unpacked_bytes=LIMIT)
    assert not marker.exists()


def test_a_torch_save_of_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "ran"
    torch.save({"robust": {"w": torch.zeros(2)}, "hook": _System(f"touch {marker}")}, tmp_path / "e.pt")
    with pytest.raises(CheckpointRefused, match=r"calls posix\.system|calls os\.system|calls nt\.system"):
        inspect_checkpoint(tmp_path / "e.pt", max_unpacked_bytes=LIMIT)
    assert not marker.exists()


def _tensor_pickle(key: str, numel: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> bytes:
    """A plain state dict {'w': tensor} as torch.save pickles it (protocol 2), written opcode by
    opcode: the tensor is `_rebuild_tensor_v2((storage persistent id), 0, shape, stride, False, {})`."""

    def text(value: str) -> bytes:  # BINUNICODE
        data = value.encode()
        return b"X" + struct.pack("<I", len(data)) + data

    def number(value: int) -> bytes:  # BININT
        return b"J" + struct.pack("<i", value)

    def name(module: str, attr: str) -> bytes:  # GLOBAL
        return b"c" + f"{module}\n{attr}\n".encode()

    def tup(values: tuple[int, ...]) -> bytes:  # MARK ... TUPLE
        return b"(" + b"".join(number(v) for v in values) + b"t"

    storage = (
        b"("
        + text("storage")
        + name("torch", "FloatStorage")
        + text(key)
        + text("cpu")
        + number(numel)
        + b"tQ"
    )
    args = (
        b"("
        + storage
        + number(0)
        + tup(shape)
        + tup(stride)
        + b"\x89"
        + name("collections", "OrderedDict")
        + b")Rt"
    )
    return b"\x80\x02}(" + text("w") + name("torch._utils", "_rebuild_tensor_v2") + args + b"Ru."


def test_storages_must_be_in_the_archive_and_large_enough(tmp_path: Path) -> None:
    ok = torch_zip(tmp_path / "ok.pt", _tensor_pickle("0", 6, (2, 3), (3, 1)), {"0": bytes(24)})
    assert inspect_checkpoint(ok, max_unpacked_bytes=LIMIT).tensors == {"w": (2, 3)}
    missing = torch_zip(tmp_path / "m.pt", _tensor_pickle("7", 6, (2, 3), (3, 1)), {"0": bytes(24)})
    with pytest.raises(CheckpointRefused, match="does not hold"):
        inspect_checkpoint(missing, max_unpacked_bytes=LIMIT)
    short = torch_zip(tmp_path / "s.pt", _tensor_pickle("0", 6, (2, 3), (3, 1)), {"0": bytes(8)})
    with pytest.raises(CheckpointRefused, match="truncated or crafted"):
        inspect_checkpoint(short, max_unpacked_bytes=LIMIT)
    past = torch_zip(tmp_path / "p.pt", _tensor_pickle("0", 6, (4, 3), (3, 1)), {"0": bytes(24)})
    with pytest.raises(CheckpointRefused, match="reaches past the end of its storage"):
        inspect_checkpoint(past, max_unpacked_bytes=LIMIT)


def test_archives_are_bounded_before_anything_is_unpacked(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("archive/data/0", bytes(8 * 1024 * 1024))  # 8 MiB of zeros: a few KiB packed
    assert bomb.stat().st_size < 64 * 1024
    with pytest.raises(CheckpointRefused, match="unpacks to"):
        inspect_checkpoint(bomb, max_unpacked_bytes=1024 * 1024)
    big_pickle = torch_zip(tmp_path / "bp.pt", pickle.dumps(list(range(100_000)), protocol=2))
    with pytest.raises(CheckpointRefused, match=r"data\.pkl is"):
        inspect_checkpoint(big_pickle, max_unpacked_bytes=LIMIT, max_pickle_bytes=1000)
    two = tmp_path / "two.pt"
    with zipfile.ZipFile(two, "w") as archive:
        archive.writestr("a/data.pkl", pickle.dumps({}))
        archive.writestr("b/data.pkl", pickle.dumps({}))
    with pytest.raises(CheckpointRefused, match=r"no <folder>/data\.pkl"):
        inspect_checkpoint(two, max_unpacked_bytes=LIMIT)
    (tmp_path / "junk.pt").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointRefused, match="not torch's zip format"):
        inspect_checkpoint(tmp_path / "junk.pt", max_unpacked_bytes=LIMIT)
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(save_digits_checkpoint(tmp_path / "whole.pt").read_bytes()[:-300])
    with pytest.raises(CheckpointRefused):
        inspect_checkpoint(truncated, max_unpacked_bytes=LIMIT)
