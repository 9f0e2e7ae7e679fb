"""A small timm-style model registry plus a FLOP counter.

Architectures register a factory with :func:`register_model`; callers build them by name with
:func:`create_model` and enumerate them with :func:`list_models`.  A classifier factory has the
signature ``fn(*, num_classes: int, in_channels: int = <model default>, **model_kwargs) -> nn.Module``.

Besides classifiers (kind ``"classifier"``, the default everywhere) the registry holds auxiliary
networks of other kinds, such as the soft-mask networks g_phi of Calibrated Adversarial Training
(kind ``"mask"``: ``fn(*, in_channels) -> nn.Module`` mapping ``(x, delta)`` to a mask).  They are
kept apart by kind because they cannot stand in for a classifier (no ``num_classes``, two inputs).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["count_flops", "create_model", "list_models", "register_model"]

ModelFactory = Callable[..., nn.Module]

_MODEL_REGISTRY: dict[str, ModelFactory] = {}
_MODEL_KINDS: dict[str, str] = {}
MODEL_KINDS = ("classifier", "mask")


def register_model(name: str, *, kind: str = "classifier") -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering ``fn`` under ``name`` (of ``kind``); ``fn`` is returned unchanged.

    Registering the same name twice raises ``ValueError`` (it would silently shadow a model).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if kind not in MODEL_KINDS:
        raise ValueError(f"model kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")

    def decorator(fn: ModelFactory) -> ModelFactory:
        existing = _MODEL_REGISTRY.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(
                f"model {name!r} is already registered (by {existing.__module__}.{existing.__qualname__})"
            )
        _MODEL_REGISTRY[name] = fn
        _MODEL_KINDS[name] = kind
        return fn

    return decorator


def list_models(filter: str = "", *, kind: str = "classifier") -> list[str]:
    """Sorted names of the registered models of ``kind``, optionally restricted by an fnmatch pattern (``"wrn*"``)."""
    names = sorted(n for n in _MODEL_REGISTRY if _MODEL_KINDS[n] == kind)
    if filter:
        names = [n for n in names if fnmatch.fnmatchcase(n, filter)]
    return names


def model_kind(name: str) -> str:
    """The kind a registered model was registered with (``"classifier"`` or ``"mask"``)."""
    if name not in _MODEL_KINDS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_MODEL_REGISTRY))}")
    return _MODEL_KINDS[name]


def _check_kwargs(name: str, fn: ModelFactory, kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming any kwarg the factory does not accept (never silently ignore it)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the factory validates its own **kwargs
    accepted = {
        p_name
        for p_name, p in params.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        extra = sorted(accepted - {"num_classes", "in_channels"})
        raise TypeError(
            f"model {name!r} got unexpected keyword argument(s): {', '.join(unknown)}; "
            f"accepted model kwargs: {', '.join(extra) if extra else '(none)'}"
        )


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    in_channels: int | None = None,
    normalize: str = "none",
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    Classifiers need ``num_classes``; other kinds (mask networks) take none.  ``in_channels=None``
    uses the model's own default (3 for the CIFAR networks, 1 for the MNIST / digits CNNs).
    ``normalize`` ('cifar10', 'cifar100') wraps a classifier in :class:`~trainer.models.normalize.Normalized`,
    which standardises [0, 1] inputs before the network ('none': the bare network).
    Unknown names raise ``ValueError`` listing what is available; unknown model kwargs raise
    ``TypeError`` naming the offending kwarg.
    """
    fn = _MODEL_REGISTRY.get(name)
    if fn is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_MODEL_REGISTRY))}")
    if _MODEL_KINDS[name] != "classifier":
        if num_classes is not None:
            raise ValueError(f"model {name!r} is a {_MODEL_KINDS[name]} network: it takes no num_classes")
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    else:
        kwargs["num_classes"] = num_classes
    if in_channels is not None:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        kwargs["in_channels"] = in_channels
    _check_kwargs(name, fn, kwargs)
    model = fn(**kwargs)
    if normalize != "none":
        if _MODEL_KINDS[name] != "classifier":
            raise ValueError(
                f"normalize: only classifiers standardise their inputs, not the {name!r} network"
            )
        from .normalize import Normalized

        model = Normalized(model, normalize)
    return model


def count_flops(model: nn.Module, input_shape: tuple[int, ...] | torch.Size) -> int:
    """FLOPs (2 x multiply-accumulates) of all ``Conv2d`` and ``Linear`` layers for one forward pass.

    ``input_shape`` is ``(C, H, W)`` (counted for a single image) or ``(N, C, H, W)`` (counted for the
    whole batch).  Biases, normalisation, activations and pooling are not counted, the usual convention
    when reporting achieved TFLOP/s.  The pass runs under ``no_grad`` in eval mode (so BatchNorm running
    statistics are untouched) on the device/dtype of the model's first parameter; the original
    train/eval mode is restored afterwards.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W), got {tuple(input_shape)}")

    total = 0

    def conv_hook(module: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        k_h, k_w = module.kernel_size
        macs_per_output = (module.in_channels // module.groups) * k_h * k_w
        total += 2 * out.numel() * macs_per_output

    def linear_hook(module: nn.Linear, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return int(total)
