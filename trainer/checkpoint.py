"""Checkpoint format: everything needed to resume a run exactly, and to rebuild its models alone.

A checkpoint is one torch file holding the robust model, the teacher, the optimizer, a method's
auxiliary network and its optimizer (CAT's mask network), the epoch, RNG states, the resolved spec and the architecture facts (classes, channels) that the spec alone
does not give. It is written to a temporary file and renamed, so readers see it whole or not at all.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from api_schemas import ModelRef, parse_spec

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a temporary file in the same folder, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train one with `lbgat train` or check the path")
    try:
        # Our checkpoints hold numpy RNG state and plain containers, so they need weights_only=False;
        # only load checkpoints you trust (as with any pickle).
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated or foreign file: say which
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


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
