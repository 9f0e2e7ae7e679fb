"""The one attack implementation: PGD (l_inf, l_2; CE, KL, CW objectives), its early-stopped form
(FAT) and FGSM / the fast gradient method.

Attacks never change a model's train/eval mode and never touch parameter gradients (they take
gradients with respect to the input only); the caller decides the modes, as each method's official
code does. Returned examples are detached and lie inside the eps ball around x and inside [0, 1]
(`clip=False` drops the box, as CAT's MNIST training attack does).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Norm = Literal["linf", "l2"]
Objective = Literal["ce", "kl", "cw"]
RandomStart = Literal["none", "uniform", "normal"]
L2Variant = Literal["default", "advertorch"]

__all__ = ["cw_margin", "fgsm", "initial_point", "pgd", "project"]

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


def project(x_adv: Tensor, x: Tensor, eps: float, norm: Norm, *, box: bool = True) -> Tensor:
    """Project onto the eps ball around x, then onto the [0, 1] box (the official codes' order).

    `box=False` skips the box: the eps ball only."""
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    elif norm == "l2":
        delta = x_adv - x
        factor = torch.clamp(eps / (_l2_norm(delta) + _TINY), max=1.0)
        x_adv = x + delta * factor
    else:
        raise ValueError(f"norm: unknown norm {norm!r}; use 'linf' or 'l2'")
    return x_adv.clamp(0.0, 1.0) if box else x_adv


def _start(
    x: Tensor,
    eps: float,
    norm: Norm,
    random_start: RandomStart,
    generator: torch.Generator | None,
    radius: float | None = None,
    box: bool = True,
) -> Tensor:
    if random_start == "none":
        return x.clone()
    if random_start == "normal":
        # x + 0.001*N(0,1), not clipped, exactly as the TRADES/LBGAT training code starts.
        return x + 0.001 * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if random_start == "uniform":
        if norm == "linf":
            # U(-r, r) with r = eps (or `radius`: CAT's MNIST code starts from U(-0.1, 0.1))
            noise = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1
            start = x + (eps if radius is None else radius) * noise
            return start.clamp(0.0, 1.0) if box else start
        if radius is not None:
            raise ValueError("start_radius: only the l_inf uniform start takes a radius")
        # uniform in the l_2 ball: a Gaussian direction scaled by eps * U^(1/d)
        direction = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        direction = direction / (_l2_norm(direction) + _TINY)
        dims = x[0].numel()
        radius = torch.rand(
            (x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype, generator=generator
        )
        return (x + eps * radius ** (1.0 / dims) * direction).clamp(0.0, 1.0)
    raise ValueError(f"random_start: unknown value {random_start!r}; use 'none', 'uniform' or 'normal'")


def initial_point(
    x: Tensor,
    *,
    eps: float,
    norm: Norm,
    random_start: RandomStart,
    generator: torch.Generator | None = None,
    start_radius: float | None = None,
    clip: bool = True,
    l2_variant: L2Variant = "default",
) -> Tensor:
    """PGD's starting point for `x`, drawn from `generator` (the global one when None): what `pgd`
    starts from with these arguments. A caller that wants each example's start to be independent of
    the batch it is attacked in draws all of them here at once and hands slices to `pgd(x_init=...)`
    (the evaluation does, so that sharding and skipped examples change no example's start)."""
    if norm == "l2" and l2_variant == "advertorch" and random_start == "uniform":
        return _advertorch_l2_start(x, eps, generator)
    return _start(x, eps, norm, random_start, generator, start_radius, clip)


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
    early_stop_tau: int | None = None,
    step_noise: float = 0.0,
    start_radius: float | None = None,
    clip: bool = True,
    l2_variant: L2Variant = "default",
    x_init: Tensor | None = None,
) -> Tensor:
    """Projected gradient ascent on `loss` within the `norm` ball of radius eps around x.

    `l2_variant='advertorch'` runs the l_2 attack as advertorch's `PGDAttack(ord=2)` (0.2.x), the
    training and evaluation attack of the RAAT / Cons-AT code for PGD-AT, Cons-AT and RAAT: the
    uniform start is a uniform point of the [0, 1] box pulled into the eps ball (`rand_init_delta`);
    each step adds step_size * g / max(||g||, 1e-6) with g the gradient of the batch-mean loss (their
    `nn.CrossEntropyLoss()`), clips to the box, then projects onto the ball (`perturb_iterative`).
    The default clips in the other order (ball, then box), from a uniform point of the ball. l_inf
    is the same either way.

    `start_radius` sets the half-width of the l_inf uniform start (default eps); `clip=False` keeps
    the iterates in the eps ball only, not in the [0, 1] box (CAT's MNIST training attack: U(-0.1, 0.1)
    start, no box).

    For loss='kl' the target distribution softmax(f(x)) is computed once (or taken from
    `logits_clean`) instead of at every step as the official code does: the model is in eval mode
    during the attack, so both give the same examples while this one saves `steps` forward passes.

    `early_stop_tau` turns this into the early-stopped PGD of Friendly Adversarial Training (Zhang
    et al., ICML 2020, Alg. 1; official `earlystop.py`): before each step every example is checked,
    and one that the model misclassifies with no budget left is frozen where it is; a misclassified
    example with budget left spends one unit and keeps going. Each example starts with a budget of
    tau, so tau=0 stops at the first misclassified iterate and tau=k takes k more steps on
    misclassified iterates. Frozen examples are not forwarded again (the official code drops them
    from the batch too). `step_noise` adds omega * N(0, 1) to every step, FAT's `omega`.

    `x_init` is the starting point, already drawn (see `initial_point`); `random_start` is then unused.
    """
    if eps <= 0 or step_size <= 0 or steps < 0:
        raise ValueError(f"eps, step_size must be > 0 and steps >= 0 (got {eps}, {step_size}, {steps})")
    if early_stop_tau is not None and early_stop_tau < 0:
        raise ValueError(f"early_stop_tau must be >= 0 or None (got {early_stop_tau})")
    if step_noise < 0:
        raise ValueError(f"step_noise must be >= 0 (got {step_noise})")
    if l2_variant not in ("default", "advertorch"):
        raise ValueError(f"l2_variant: unknown value {l2_variant!r}; use 'default' or 'advertorch'")
    advertorch = norm == "l2" and l2_variant == "advertorch"
    if advertorch and (early_stop_tau is not None or step_noise > 0 or not clip or start_radius is not None):
        raise ValueError(
            "l2_variant: advertorch's l_2 PGD has no early stop, step noise, start radius or clip=False"
        )
    x = x.detach()
    p_clean = None
    if loss == "kl":
        if logits_clean is None:
            with torch.no_grad():
                logits_clean = model(x)
        p_clean = F.softmax(logits_clean.detach().float(), dim=1)
    if x_init is not None:
        if x_init.shape != x.shape:
            raise ValueError(f"x_init: shape {tuple(x_init.shape)} differs from x's {tuple(x.shape)}")
        x_adv = x_init.detach().to(device=x.device, dtype=x.dtype).clone()
    else:
        x_adv = initial_point(
            x,
            eps=eps,
            norm=norm,
            random_start=random_start,
            generator=generator,
            start_radius=start_radius,
            clip=clip,
            l2_variant=l2_variant,
        )
    if early_stop_tau is not None:
        return _pgd_early_stopped(
            model,
            x,
            y,
            x_adv,
            p_clean,
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
            loss=loss,
            kappa=kappa,
            tau=early_stop_tau,
            step_noise=step_noise,
            generator=generator,
            clip=clip,
        )
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            objective = _objective(model(x_adv), y, loss, p_clean, kappa)
            (grad,) = torch.autograd.grad(objective, [x_adv])
        with torch.no_grad():
            if advertorch:
                x_adv = _advertorch_l2_step(x_adv.detach(), x, grad, step_size, eps)
            else:
                x_adv = _ascend(x_adv.detach(), grad, step_size, norm, step_noise, generator)
                x_adv = project(x_adv, x, eps, norm, box=clip)
    if advertorch:  # its iterates already lie in the ball and the box; it returns clamp(x + delta)
        return x_adv.detach().clamp(0.0, 1.0)
    return project(x_adv.detach(), x, eps, norm, box=clip)


def _clamp_by_l2(delta: Tensor, eps: float) -> Tensor:
    """advertorch `clamp_by_pnorm(delta, 2, eps)`: scale by min(eps / ||delta||, 1) (no epsilon added)."""
    return delta * torch.clamp(eps / _l2_norm(delta), max=1.0)


def _advertorch_l2_start(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """advertorch `rand_init_delta(ord=2)`: delta = U(box) - x, pulled into the eps ball, kept in the box."""
    delta = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) - x
    return (x + _clamp_by_l2(delta, eps)).clamp(0.0, 1.0)


def _advertorch_l2_step(x_adv: Tensor, x: Tensor, grad: Tensor, step_size: float, eps: float) -> Tensor:
    """advertorch `perturb_iterative(ord=2)`: normalised step, clip to the box, then project to the ball.

    `grad` is the gradient of the summed objective; advertorch's is of the batch mean, 1/N of it, and
    `normalize_by_pnorm` divides by max(||g||, 1e-6): the same as ||g_sum|| floored at N * 1e-6.
    """
    floor = x.shape[0] * 1e-6
    delta = x_adv - x + step_size * grad / torch.clamp(_l2_norm(grad), min=floor)
    delta = (x + delta).clamp(0.0, 1.0) - x
    return x + _clamp_by_l2(delta, eps)


def _ascend(
    x_adv: Tensor, grad: Tensor, step_size: float, norm: Norm, noise: float, generator: torch.Generator | None
) -> Tensor:
    if norm == "linf":
        x_adv = x_adv + step_size * grad.sign()
    else:
        x_adv = x_adv + step_size * grad / (_l2_norm(grad) + 1e-8)
    if noise > 0:
        x_adv = x_adv + noise * torch.randn(
            x_adv.shape, device=x_adv.device, dtype=x_adv.dtype, generator=generator
        )
    return x_adv


def _pgd_early_stopped(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    p_clean: Tensor | None,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm,
    loss: Objective,
    kappa: float,
    tau: int,
    step_noise: float,
    generator: torch.Generator | None,
    clip: bool = True,
) -> Tensor:
    """PGD whose examples stop one by one (see `pgd`); only the still-active examples are forwarded.

    Examples are independent in the attack (eval-mode model, objectives summed per example), so
    forwarding the active subset gives each one the gradient it would get in the full batch.
    """
    budget = torch.full((x.shape[0],), tau, dtype=torch.long, device=x.device)
    active = torch.arange(x.shape[0], device=x.device)
    x_adv = x_adv.detach().clone()
    for _ in range(steps):
        if active.numel() == 0:
            break
        current = x_adv[active].requires_grad_(True)
        with torch.enable_grad():
            logits = model(current)
            target = None if p_clean is None else p_clean[active]
            objective = _objective(logits, y[active], loss, target, kappa)
            (grad,) = torch.autograd.grad(objective, [current])
        with torch.no_grad():
            wrong = logits.argmax(1) != y[active]
            exhausted = budget[active] == 0
            budget[active[wrong & ~exhausted]] -= 1
            keep = ~(wrong & exhausted)
            active, grad, current = active[keep], grad[keep], current.detach()[keep]
            moved = _ascend(current, grad, step_size, norm, step_noise, generator)
            x_adv[active] = project(moved, x[active], eps, norm, box=clip)
    return project(x_adv.detach(), x, eps, norm, box=clip)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: Norm = "linf") -> Tensor:
    """Fast Gradient Sign Method: one step of size eps on the CE loss, from x.

    For norm='l2' it is the fast gradient method of the l_2 threat model: one step of length eps
    along the l_2-normalised gradient (the sign step would leave the l_2 ball).
    """
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, norm=norm, loss="ce", random_start="none")
