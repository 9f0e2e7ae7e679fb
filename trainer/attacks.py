"""The one attack implementation: PGD (l_inf, l_2; CE, KL, CW objectives) and FGSM.

Attacks never change a model's train/eval mode and never touch parameter gradients (they take
gradients with respect to the input only); the caller decides the modes, as each method's official
code does. Returned examples are detached and lie inside the eps ball around x and inside [0, 1].
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["linf", "l2"]
Objective = Literal["ce", "kl", "cw"]
RandomStart = Literal["none", "uniform", "normal"]

__all__ = ["cw_margin", "fgsm", "pgd", "project"]

_TINY = 1e-12


def cw_margin(logits: Tensor, y: Tensor, kappa: float = 0.0) -> Tensor:
    """Per-example CW loss to maximise: -max(z_y - max_{j!=y} z_j, -kappa), as in the CW-PGD of TRADES' eval."""
    one_hot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    correct = (logits * one_hot).sum(1)
    wrong = (logits - 1e4 * one_hot).amax(1)
    return -torch.clamp(correct - wrong, min=-kappa)


def _objective(logits: Tensor, y: Tensor, loss: Objective, p_clean: Tensor | None, kappa: float) -> Tensor:
    # Sums, not means: every example's input gradient is then independent of the batch size, and the
    # sign / per-example normalisation below makes the reduction irrelevant anyway.
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if loss == "kl":
        # KL(p_clean || p_adv) summed over classes and examples: nn.KLDivLoss(size_average=False)
        # applied to (log_softmax(f(x_adv)), softmax(f(x))) in the official TRADES/LBGAT code.
        return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="sum")
    if loss == "cw":
        return cw_margin(logits, y, kappa).sum()
    raise ValueError(f"loss: unknown attack objective {loss!r}; use 'ce', 'kl' or 'cw'")


def _l2_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project onto the eps ball around x, then onto the [0, 1] box (the official codes' order)."""
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    elif norm == "l2":
        delta = x_adv - x
        factor = torch.clamp(eps / (_l2_norm(delta) + _TINY), max=1.0)
        x_adv = x + delta * factor
    else:
        raise ValueError(f"norm: unknown norm {norm!r}; use 'linf' or 'l2'")
    return x_adv.clamp(0.0, 1.0)


def _start(
    x: Tensor, eps: float, norm: Norm, random_start: RandomStart, generator: torch.Generator | None
) -> Tensor:
    if random_start == "none":
        return x.clone()
    if random_start == "normal":
        # x + 0.001*N(0,1), not clipped, exactly as the TRADES/LBGAT training code starts.
        return x + 0.001 * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if random_start == "uniform":
        if norm == "linf":
            noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1
            return (x + eps * noise).clamp(0.0, 1.0)
        # uniform in the l_2 ball: a Gaussian direction scaled by eps * U^(1/d)
        direction = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        direction = direction / (_l2_norm(direction) + _TINY)
        dims = x[0].numel()
        radius = torch.rand(
            (x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype, generator=generator
        )
        return (x + eps * radius ** (1.0 / dims) * direction).clamp(0.0, 1.0)
    raise ValueError(f"random_start: unknown value {random_start!r}; use 'none', 'uniform' or 'normal'")


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm = "linf",
    loss: Objective = "ce",
    random_start: RandomStart = "none",
    kappa: float = 0.0,
    logits_clean: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on `loss` within the `norm` ball of radius eps around x.

    For loss='kl' the target distribution softmax(f(x)) is computed once (or taken from
    `logits_clean`) instead of at every step as the official code does: the model is in eval mode
    during the attack, so both give the same examples while this one saves `steps` forward passes.
    """
    if eps <= 0 or step_size <= 0 or steps < 0:
        raise ValueError(f"eps, step_size must be > 0 and steps >= 0 (got {eps}, {step_size}, {steps})")
    x = x.detach()
    p_clean = None
    if loss == "kl":
        if logits_clean is None:
            with torch.no_grad():
                logits_clean = model(x)
        p_clean = F.softmax(logits_clean.detach().float(), dim=1)
    x_adv = _start(x, eps, norm, random_start, generator)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            objective = _objective(model(x_adv), y, loss, p_clean, kappa)
            (grad,) = torch.autograd.grad(objective, [x_adv])
        with torch.no_grad():
            if norm == "linf":
                x_adv = x_adv.detach() + step_size * grad.sign()
            else:
                x_adv = x_adv.detach() + step_size * grad / (_l2_norm(grad) + 1e-8)
            x_adv = project(x_adv, x, eps, norm)
    return project(x_adv.detach(), x, eps, norm)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float) -> Tensor:
    """Fast Gradient Sign Method: one l_inf step of size eps on the CE loss, from x."""
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, norm="linf", loss="ce", random_start="none")
