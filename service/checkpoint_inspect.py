"""What an uploaded checkpoint holds, read without torch and without running anything in it.

An upload is untrusted: a torch file is a zip archive whose `<folder>/data.pkl` is a pickle, and a
pickle can call any function it names. This module reads that pickle with a restricted unpickler
that resolves only the few names a weights-only checkpoint needs, and refuses the file at the first
other name, before any of it is called:

* `collections.OrderedDict` (state dicts), replaced by a plain dict subclass of ours;
* `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter` and `_rebuild_parameter_with_state`,
  replaced by functions of ours that return a `TensorInfo` (dtype and shape) instead of a tensor;
* the typed storage classes (`torch.FloatStorage`, ...), which only ever appear inside a storage's
  persistent id: `persistent_load` returns a `StorageRef` placeholder and no tensor data is read;
* `torch.<dtype>`, `torch.device`, `builtins.set`/`frozenset` and `_codecs.encode` (bytes under
  pickle protocol 2), each replaced by a plain value.

Nothing else is resolved: `os.system`, `builtins.eval`, `subprocess.Popen`, numpy's array pieces,
any class of torch or of this project, all refused with `CheckpointRefused`. The archive is checked
before the pickle is read (zip format, entry count, the unpacked size its entries declare), the pickle
is read with a bound on its size, and every storage a tensor names must be an entry of the archive
large enough for it.

What comes back (`CheckpointInfo`): for this project's format (trainer.checkpoint.save_checkpoint)
the format version, classes, input channels, whether EMA weights are there, and the spec's dataset,
model, method and threat model; for a plain state dict the parameter shapes, the classifier's output
dimension (the first dimension of the last 2-D weight) and the input channels (the second of the
first 4-D weight). The service imports no torch: this is how it checks an upload before storing it.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: entries an archive may list (a WRN-34-10 state dict has about 250)
MAX_ENTRIES = 100_000
#: the largest data.pkl read: the pickle holds structure, not tensor data
MAX_PICKLE_BYTES = 64 * 1024 * 1024
#: dimensions of one tensor
MAX_DIMS = 16

# torch's typed storages, as their pickles name them: dtype and bytes per element
STORAGE_TYPES: dict[str, tuple[str, int]] = {
    "DoubleStorage": ("float64", 8),
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexDoubleStorage": ("complex128", 16),
    "ComplexFloatStorage": ("complex64", 8),
}
DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "complex128",
        "complex64",
        "double",
        "float",
        "half",
        "long",
        "int",
        "short",
    }
)


class CheckpointRefused(ValueError):
    """The file is not a checkpoint that may be stored: the message says why, for the uploader."""


@dataclass(frozen=True)
class StorageRef:
    """A tensor storage as the pickle names it (its bytes are never read)."""

    dtype: str
    itemsize: int
    key: str
    numel: int


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


class _StorageType:
    """What `torch.FloatStorage` & co. resolve to: a marker, never callable."""

    __slots__ = ("dtype", "itemsize")

    def __init__(self, dtype: str, itemsize: int) -> None:
        self.dtype = dtype
        self.itemsize = itemsize


class _Dict(dict):
    """`collections.OrderedDict` as unpickled here: a dict whose pickled state (a state dict's
    `_metadata`) is dropped rather than set as attributes."""

    def __setstate__(self, state: Any) -> None:
        return None


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_DIMS:
        raise CheckpointRefused(f"a tensor's {what} is not a tuple of at most {MAX_DIMS} integers")
    if not all(type(v) is int and v >= 0 for v in value):
        raise CheckpointRefused(f"a tensor's {what} holds something other than non-negative integers")
    return value


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorInfo:
    if not isinstance(storage, StorageRef):
        raise CheckpointRefused("a tensor is built from something other than a storage of the archive")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if type(storage_offset) is not int or storage_offset < 0 or len(strides) != len(shape):
        raise CheckpointRefused("a tensor's offset or strides do not fit its shape")
    if all(shape):
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides))
        if last >= storage.numel:
            raise CheckpointRefused(
                f"a tensor of shape {list(shape)} reaches past the end of its storage ({storage.numel} "
                "elements): the file is truncated or crafted"
            )
    return TensorInfo(storage.dtype, shape)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> TensorInfo:
    if not isinstance(data, TensorInfo):
        raise CheckpointRefused("a parameter wraps something other than a tensor")
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> TensorInfo:
    return _rebuild_parameter(data)


def _device(*args: Any) -> str:
    if not args or not all(isinstance(a, (str, int)) for a in args):
        raise CheckpointRefused("torch.device(...) with arguments other than a name and an index")
    return ":".join(str(a) for a in args)


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointRefused("_codecs.encode with arguments other than (str, 'latin1')")
    return text.encode("latin1")


def _set(items: Any = ()) -> set[Any]:
    if not isinstance(items, (list, tuple)):
        raise CheckpointRefused("set(...) of something other than a list")
    return set(items)


def _frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_set(items))


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _Dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch", "device"): _device,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("_codecs", "encode"): _encode,
    **{("torch", name): _StorageType(dtype, size) for name, (dtype, size) in STORAGE_TYPES.items()},
    **{("torch", name): name for name in DTYPES},
}


class _Unpickler(pickle.Unpickler):
    """Resolves only `_ALLOWED`; every storage must be an entry of the archive, large enough."""

    def __init__(self, data: bytes, storages: dict[str, int]) -> None:
        super().__init__(io.BytesIO(data))
        self._storages = storages  # key -> bytes in the archive

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise CheckpointRefused(
                f"its pickle calls {module}.{name}, which a checkpoint of tensors and plain values never "
                "needs; it was refused and nothing in it ran"
            )
        return found

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointRefused("a persistent reference of its pickle is not a tensor storage")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise CheckpointRefused("a storage reference of its pickle is malformed")
        size = self._storages.get(key)
        if size is None:
            raise CheckpointRefused(f"its pickle names storage {key!r}, which the archive does not hold")
        if numel < 0 or numel * kind.itemsize > size:
            raise CheckpointRefused(
                f"storage {key!r} should hold {numel} {kind.dtype} elements but the archive has {size} "
                "bytes for it: the file is truncated or crafted"
            )
        return StorageRef(kind.dtype, kind.itemsize, key, numel)


@dataclass
class CheckpointInfo:
    format: Literal["checkpoint", "state_dict"]
    format_version: int | None = None
    num_classes: int | None = None
    in_channels: int | None = None
    has_averaged: bool = False
    spec: dict[str, Any] | None = None
    dataset: str | None = None
    model: str | None = None
    model_ref: dict[str, Any] | None = None
    method: str | None = None
    norm: str | None = None
    eps: float | None = None
    output_dim: int | None = None
    classifier: str | None = None
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)


def _read_pickle(path: Path, max_unpacked_bytes: int, max_pickle_bytes: int) -> Any:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            if len(entries) > MAX_ENTRIES:
                raise CheckpointRefused(f"the archive lists {len(entries)} entries (at most {MAX_ENTRIES})")
            unpacked = sum(info.file_size for info in entries)
            if unpacked > max_unpacked_bytes:
                raise CheckpointRefused(
                    f"the archive unpacks to {unpacked} bytes, more than the {max_unpacked_bytes} accepted "
                    "(LBGAT_MAX_UPLOAD_BYTES); it was not unpacked"
                )
            pickles = [i for i in entries if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointRefused(
                    "not torch's zip format: no <folder>/data.pkl entry (a file of torch.save since torch 1.6)"
                )
            info = pickles[0]
            folder = info.filename[: -len("data.pkl")]
            storages = {
                i.filename[len(folder) + len("data/") :]: i.file_size
                for i in entries
                if i.filename.startswith(folder + "data/")
            }
            if info.file_size > max_pickle_bytes:
                raise CheckpointRefused(
                    f"its data.pkl is {info.file_size} bytes (at most {max_pickle_bytes})"
                )
            with archive.open(info) as handle:
                data = handle.read(max_pickle_bytes + 1)
            if len(data) > max_pickle_bytes:
                raise CheckpointRefused(f"its data.pkl unpacks past {max_pickle_bytes} bytes")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError) as exc:
        raise CheckpointRefused(f"the zip archive cannot be read ({exc})") from None
    try:
        return _Unpickler(data, storages).load()
    except CheckpointRefused:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, RecursionError, MemoryError, UnicodeDecodeError) as exc:  # fmt: skip
        raise CheckpointRefused(f"its pickle cannot be read ({type(exc).__name__}: {exc})") from None


def _weights(state: Any, where: str) -> dict[str, tuple[int, ...]]:
    """A state dict's parameter shapes; refused unless it maps names to tensors."""
    if not isinstance(state, dict):
        raise CheckpointRefused(f"{where} is a {type(state).__name__}, not a state dict")
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in dict.items(state):
        if not isinstance(key, str):
            raise CheckpointRefused(f"{where} has a key that is not a parameter name")
        if not isinstance(value, TensorInfo):
            raise CheckpointRefused(
                f"{where}[{key!r}] is a {type(value).__name__}, not a tensor: a plain state dict maps "
                "parameter names to tensors"
            )
        shapes[key] = value.shape
    if not shapes:
        raise CheckpointRefused(f"{where} holds no tensors")
    return shapes


def _architecture(info: CheckpointInfo) -> None:
    """The classifier's outputs (last 2-D weight) and input channels (first 4-D weight)."""
    for name, shape in reversed(info.tensors.items()):
        if name.endswith("weight") and len(shape) == 2:
            info.output_dim, info.classifier = shape[0], name
            break
    for name, shape in info.tensors.items():
        if name.endswith("weight") and len(shape) == 4:
            info.in_channels = info.in_channels or shape[1]
            break


def inspect_checkpoint(
    path: str | Path, *, max_unpacked_bytes: int, max_pickle_bytes: int = MAX_PICKLE_BYTES
) -> CheckpointInfo:
    """Read `path` as described in the module docstring; `CheckpointRefused` says why it is not one."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointRefused(
            "not torch's zip format (torch.save since torch 1.6): legacy or foreign files are not accepted"
        )
    payload = _read_pickle(path, max_unpacked_bytes, max_pickle_bytes)
    if not isinstance(payload, dict):
        raise CheckpointRefused(f"it holds a {type(payload).__name__}, not a checkpoint or a state dict")
    version = dict.get(payload, "format_version")
    if version is None:
        info = CheckpointInfo(format="state_dict", tensors=_weights(payload, "the state dict"))
        _architecture(info)
        return info
    return _checkpoint_info(payload, version)


def _checkpoint_info(payload: dict[str, Any], version: Any) -> CheckpointInfo:
    from api_schemas import SpecError, parse_spec

    if type(version) is not int:
        raise CheckpointRefused("format_version is not an integer")
    classes, channels = dict.get(payload, "num_classes"), dict.get(payload, "in_channels")
    if type(classes) is not int or type(channels) is not int or classes < 1 or channels < 1:
        raise CheckpointRefused(
            "a checkpoint of this project names num_classes and in_channels; this one does not"
        )
    raw_spec = dict.get(payload, "spec")
    if not isinstance(raw_spec, dict):
        raise CheckpointRefused("a checkpoint of this project holds its spec; this one does not")
    try:
        spec = parse_spec(raw_spec, source="the checkpoint's spec")
    except SpecError as exc:
        raise CheckpointRefused(f"its spec does not validate: {exc}") from None
    except RecursionError:
        raise CheckpointRefused("its spec is nested too deeply") from None
    averaged = dict.get(payload, "robust_ema")
    info = CheckpointInfo(
        format="checkpoint",
        format_version=version,
        num_classes=classes,
        in_channels=channels,
        has_averaged=averaged is not None,
        spec=spec.model_dump(mode="json"),
        dataset=spec.dataset.name,
        model=spec.model.robust.name,
        model_ref=spec.model.robust.model_dump(mode="json"),
        method=spec.method.name,
        norm=spec.threat_model.norm,
        eps=float(spec.threat_model.eps),
        tensors=_weights(dict.get(payload, "robust"), "its robust model"),
    )
    if averaged is not None:
        _weights(averaged, "its averaged weights")
    channels_read = info.in_channels
    _architecture(info)
    info.in_channels = channels_read
    if info.output_dim is not None and info.output_dim != classes:
        raise CheckpointRefused(
            f"it says num_classes={classes} but its classifier ({info.classifier}) has {info.output_dim} outputs"
        )
    return info
