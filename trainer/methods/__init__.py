"""Adversarial-training methods, one module each, registered by name (`build_method`)."""

from __future__ import annotations

from typing import Any

from api_schemas import ThreatModel
from trainer.methods.base import AttackConfig, Method, StepOutput

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def build_method(spec: Any, threat: ThreatModel) -> Method:
    """Instantiate the method named by `spec.name` (a MethodSpec)."""
    try:
        cls = _REGISTRY[spec.name]
    except KeyError:
        raise ValueError(f"unknown method {spec.name!r}; available: {', '.join(list_methods())}") from None
    return cls(spec, threat)


# Registration happens on import of each module.
from trainer.methods import (  # noqa: E402, F401
    alp,
    bgat,
    cat,
    cons_at,
    fat,
    lbgat,
    mart,
    natural,
    pgd_at,
    raat,
    raat_sharp,
    rebat,
    trades,
)

__all__ = ["AttackConfig", "Method", "StepOutput", "build_method", "list_methods", "register_method"]
