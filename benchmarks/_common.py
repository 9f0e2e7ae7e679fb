"""Helpers both benchmark scripts share (they run as `python benchmarks/<script>.py`, so this
folder is on sys.path)."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    return device


def describe_device(device: torch.device) -> str:
    """What the figures were measured on: the GPU's name, or the CPU threads torch uses."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
