"""Checkpoint format: everything needed to resume a run exactly, and to rebuild its models alone.

A checkpoint is one torch file holding the robust model, the teacher, the optimizer, a method's
auxiliary network and its optimizer (CAT's mask network), the epoch, RNG states, the resolved spec and the architecture facts (classes, channels) that the spec alone
does not give. It is written to a temporary file and renamed, so readers see it whole or not at all.

A checkpoint is untrusted input (the shared artifact store, uploads, teacher and transfer-attack
sources), so it holds only tensors and plain containers (dict, list, tuple, str, int, float, bool,
None) and is read with `torch.load(weights_only=True)`, never anything less: `safe_load` below is the
project's one call of `torch.load`. `save_checkpoint` refuses any other value, so a checkpoint that
saves also loads. A file is refused, with a `CheckpointError` naming it, when it is larger than
`LBGAT_MAX_CHECKPOINT_BYTES` (on disk or unpacked), is not torch's zip format, or holds anything the
weights-only unpickler refuses; no code in it runs.

Format 1 (before the safe format) held numpy's RNG state as a numpy array, which the weights-only
unpickler refuses. `python -m trainer.checkpoint upgrade OLD NEW` re-saves such a file in the current
format, reading it with weights_only=True and the allow-list `_legacy_globals` (numpy's array pieces and
torch's version string, nothing that calls out); run it on files your own runs wrote.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import random
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from torch import nn

from api_schemas import ModelRef, parse_spec

log = logging.getLogger(__name__)

# 2: RNG states without numpy arrays; every value a tensor or plain container (weights_only=True).
FORMAT_VERSION = 2

DEFAULT_MAX_CHECKPOINT_BYTES = 2 * 1024**3

# torch releases whose weights-only unpickler has published bypasses (CVE-2025-32434, fixed in 2.6;
# CVE-2026-24747, fixed in 2.10). Loading still uses weights_only=True there, with a warning.
SAFE_TORCH = (2, 10)

UPGRADE_COMMAND = "python -m trainer.checkpoint upgrade"


class CheckpointError(RuntimeError):
    pass


class CheckpointSettings(BaseSettings):
    """`LBGAT_MAX_CHECKPOINT_BYTES`: the largest checkpoint read, checked before any of it is loaded."""

    model_config = SettingsConfigDict(
        env_prefix="LBGAT_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    max_checkpoint_bytes: int = Field(
        DEFAULT_MAX_CHECKPOINT_BYTES,
        gt=0,
        description="largest checkpoint accepted, in bytes, both on disk and unpacked (default 2 GiB)",
    )


def _legacy_globals() -> list[Any]:
    """The one allow-list of non-plain types, and only `upgrade_checkpoint` uses it: what format 1 held besides
    tensors and plain containers. numpy's RNG key array (`_reconstruct`, `ndarray`, `dtype` and the
    uint32 dtype class its BUILD needs; numpy 1 pickles the first under `numpy.core`) and
    `provenance.torch`, a `TorchVersion` (a str subclass)."""
    from torch.torch_version import TorchVersion

    try:
        reconstruct = np._core.multiarray._reconstruct  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1
        reconstruct = np.core.multiarray._reconstruct
    return [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
        TorchVersion,
    ]


# The names `_legacy_globals` allows, as the weights-only unpickler reports them: a file whose only
# refused globals are these is a format-1 checkpoint, and the error says how to upgrade it.
LEGACY_GLOBAL_NAMES = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
        "torch.torch_version.TorchVersion",
    }
)


# ---------------------------------------------------------------------------------------------- RNG


def _numpy_state_plain(state: tuple) -> dict[str, Any]:
    """numpy's legacy global state ('MT19937', uint32[624] key, pos, has_gauss, cached_gaussian)
    as a tensor plus plain values."""
    name, key, pos, has_gauss, cached_gaussian = state
    return {
        "bit_generator": str(name),
        "key": torch.from_numpy(np.asarray(key, dtype=np.uint32).astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_plain(np.random.get_state()),
        "python": random.getstate(),  # (version, tuple of ints, None)
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    # .cpu(): a checkpoint read with map_location=<cuda device> holds these on the GPU.
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["bit_generator"],
            np_state["key"].cpu().numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# -------------------------------------------------------------------------------------------- write

_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Raise unless `value` is tensors and plain containers all the way down (exact types: a str or
    float subclass such as TorchVersion or numpy.float64 pickles as its class)."""
    kind = type(value)
    if kind in (torch.Tensor, nn.Parameter) or kind in _PLAIN_SCALARS:
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} (a key)")
            _check_plain(item, f"{where}.{key}")
        return
    if kind in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"cannot save {where}: a {kind.__module__}.{kind.__qualname__} is not a tensor or plain value "
        "(dict, list, tuple, str, int, float, bool, None), so the checkpoint would not load with "
        "weights_only=True; convert it where the payload is built"
    )


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    payload = {"format_version": FORMAT_VERSION, **payload}
    _check_plain(payload, "checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------- read

_warned_torch = False


def _warn_old_torch() -> None:
    global _warned_torch
    if not _warned_torch and torch.__version__ < SAFE_TORCH:
        _warned_torch = True
        log.warning(
            "torch %s: its weights-only unpickler has published bypasses (fixed in torch %s); "
            "checkpoints from others are not safe to load until torch is upgraded",
            torch.__version__,
            ".".join(map(str, SAFE_TORCH)),
        )


def _refused_globals(f: Any) -> list[str]:
    """The globals the weights-only unpickler would refuse, read from the pickle's opcodes (nothing
    is executed); empty when that cannot be told."""
    try:
        f.seek(0)
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except Exception:
        return []


def _weights_only_reason(exc: BaseException) -> str:
    # torch's message goes on to suggest weights_only=False; keep only the unpickler's own words.
    for line in str(exc).splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def safe_load(
    path: str | Path,
    *,
    map_location: str | torch.device | None = "cpu",
    max_bytes: int | None,
    legacy: bool = False,
) -> Any:
    """The project's one `torch.load`: torch's zip format only, weights_only=True, nothing else.

    `max_bytes` bounds the file and the sum of its unpacked entries (None: no bound, for the
    dataset caches this project writes itself). `legacy=True` is for `upgrade_checkpoint` alone: it
    adds the `_legacy_globals` allow-list. Every refusal is a CheckpointError naming the file.
    """
    path = Path(path)
    _warn_old_torch()
    if legacy and torch.__version__ < (2, 6):  # safe_globals with (object, name) pairs
        raise CheckpointError(f"upgrading {path} needs torch >= 2.6 (this is {torch.__version__})")
    try:
        f = open(path, "rb")  # noqa: SIM115 - `with f` below; the size checked is the file loaded
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise CheckpointError(
                f"checkpoint {path} is {size} bytes, more than the {max_bytes} accepted "
                "(LBGAT_MAX_CHECKPOINT_BYTES); it was not read"
            )
        if not zipfile.is_zipfile(f):
            raise CheckpointError(
                f"{path} is not a checkpoint this project can load safely: not torch's zip format "
                "(torch.save since torch 1.6); it was not read"
            )
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
        if max_bytes is not None and unpacked > max_bytes:
            raise CheckpointError(
                f"checkpoint {path} unpacks to {unpacked} bytes, more than the {max_bytes} accepted "
                "(LBGAT_MAX_CHECKPOINT_BYTES); it was not loaded"
            )
        f.seek(0)
        try:
            if legacy:
                with torch.serialization.safe_globals(_legacy_globals()):
                    return torch.load(f, map_location=map_location, weights_only=True)
            return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:  # what the weights-only unpickler refuses
            failure, refused = exc, _refused_globals(f)
        except Exception as exc:  # a truncated or foreign file: say which
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if refused and set(refused) <= LEGACY_GLOBAL_NAMES:
        raise CheckpointError(
            f"checkpoint {path} predates the safe checkpoint format (format 1 held numpy's RNG state "
            "as a numpy array) and is not loaded; if you trust where it came from (your own runs), "
            f"re-save it once with `{UPGRADE_COMMAND} {path} NEW.pt` and use NEW.pt"
        ) from None
    named = ", ".join(refused[:5]) + (f" and {len(refused) - 5} more" if len(refused) > 5 else "")
    detail = f"its pickle calls {named}" if refused else _weights_only_reason(failure)
    raise CheckpointError(
        f"{path} is not a checkpoint this project can load safely ({detail}; a checkpoint holds only "
        "tensors and plain containers); it was refused and nothing in it ran"
    ) from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint (or a plain state dict) as a dict, through `safe_load` within the size setting."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train one with `lbgat train` or check the path")
    limit = CheckpointSettings().max_checkpoint_bytes
    payload = safe_load(path, map_location=map_location, max_bytes=limit)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint or a state dict")
    return payload


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel / DDP ('module.') and torch.compile ('_orig_mod.') wrap parameter names.
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def load_model(
    path: str | Path,
    *,
    which: str = "robust",
    fallback_ref: ModelRef | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    weights: str = "model",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model from one of our checkpoints, or from a plain state dict plus `fallback_ref`.

    `which` picks 'robust' or 'teacher'; `weights='ema'` loads averaged weights where present.
    The model is returned in eval mode.
    """
    from trainer.models import create_model

    payload = read_checkpoint(path)
    if "format_version" in payload:
        spec = parse_spec(payload["spec"], source=f"checkpoint {path}")
        ref = spec.model.robust if which == "robust" else spec.model.teacher
        if ref is None:
            raise CheckpointError(f"checkpoint {path} has no {which} model")
        key = which if weights == "model" else f"{which}_{weights}"
        state = payload.get(key)
        if state is None:
            raise CheckpointError(f"checkpoint {path} holds no '{key}' weights")
        classes, channels = payload["num_classes"], payload["in_channels"]
    else:
        if fallback_ref is None or num_classes is None:
            raise CheckpointError(
                f"{path} is a plain state dict: name its architecture (model.teacher) so it can be rebuilt"
            )
        ref, state, classes, channels = fallback_ref, payload, num_classes, in_channels or 3
    model = create_model(ref.name, num_classes=classes, in_channels=channels, **ref.kwargs())
    try:
        model.load_state_dict(_strip_prefixes(state))
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit a {ref.name}: {exc}") from None
    if num_classes is not None and classes != num_classes:
        raise CheckpointError(f"{path} has {classes} classes but the dataset has {num_classes}")
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------ upgrade


def _plain_strings(value: Any) -> Any:
    """`value` with str subclasses (format 1's TorchVersion) made plain str, in place where it can
    (so state dicts keep their `_metadata`)."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _plain_strings(item)
    elif isinstance(value, list):
        value[:] = [_plain_strings(item) for item in value]
    elif type(value) is tuple:
        return tuple(_plain_strings(item) for item in value)
    return value


def upgrade_checkpoint(old: str | Path, new: str | Path) -> Path:
    """Re-save a format-1 checkpoint (numpy RNG array) in the current, weights-only format.

    OLD is read with weights_only=True and the `_legacy_globals` allow-list only, so a file holding
    anything else is refused as everywhere; the result must then load through `read_checkpoint`.
    Run it on files you trust: the upgraded file is accepted by every loader afterwards.
    """
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise CheckpointError(f"no checkpoint at {old}")
    if new.exists():
        raise CheckpointError(f"{new} exists; name a new file")
    limit = CheckpointSettings().max_checkpoint_bytes
    payload = safe_load(old, map_location="cpu", max_bytes=limit, legacy=True)
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{old} is not a checkpoint written by this project; nothing to upgrade")
    payload = _plain_strings(payload)
    payload.pop("format_version")
    rng = payload.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        rng["numpy"] = _numpy_state_plain(rng["numpy"])
    save_checkpoint(new, payload)
    try:
        read_checkpoint(new)
    except CheckpointError:
        new.unlink(missing_ok=True)
        raise
    return new


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.checkpoint",
        description="Checkpoint maintenance. upgrade: re-save a checkpoint written before the safe "
        "(weights-only) format, from a source you trust, in the current format.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("upgrade", help="re-save an older checkpoint in the current format")
    up.add_argument("old", type=Path, help="the older checkpoint (left as it is)")
    up.add_argument("new", type=Path, help="where to write the upgraded checkpoint (must not exist)")
    args = parser.parse_args(argv)
    try:
        written = upgrade_checkpoint(args.old, args.new)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"upgraded {args.old} -> {written} (checkpoint format {FORMAT_VERSION})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
