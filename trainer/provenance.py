"""Where a number came from: package and git revision, library versions, device."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


@lru_cache(maxsize=1)
def _git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(device: torch.device | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "package": _version("lbgat-orchestrator"),
        "git_revision": _git_revision(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a plain str: TorchVersion is a class checkpoints refuse
        "pyautoattack": _version("pyautoattack"),
        "device": str(device) if device is not None else None,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
