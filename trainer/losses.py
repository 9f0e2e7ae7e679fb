"""Every method's training loss as a pure function of logits, in the papers' notation.

Reductions follow the official implementations, because they set the relative weight of the terms:
CE is averaged over the batch; the TRADES KL is KL(p_nat || p_adv) summed over classes and averaged
over the batch (`(1/B) * nn.KLDivLoss(size_average=False)`); MSE (LBGAT's L and ALP's pairing term)
is `nn.MSELoss()`, a mean over all B*K elements. Gradients flow into every logits tensor passed in,
except where a function says otherwise (BGAT's fixed teacher).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

Regularizer = Literal["none", "alp", "trades"] | None

__all__ = ["alp", "bgat", "cat", "cat_mask", "fat", "lbgat", "natural", "pgd_at", "trades", "trades_kl"]


def trades_kl(logits_nat: Tensor, logits_adv: Tensor) -> Tensor:
    """TRADES boundary term: KL(softmax(logits_nat) || softmax(logits_adv)), summed over classes, mean over batch."""
    per_example = F.kl_div(
        F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="none"
    ).sum(1)
    return per_example.mean()


def natural(logits: Tensor, y: Tensor) -> Tensor:
    """Standard training: CE(f(x), y)."""
    return F.cross_entropy(logits, y)


def pgd_at(logits_adv: Tensor, y: Tensor) -> Tensor:
    """Madry et al.: CE(f(x_adv), y)."""
    return F.cross_entropy(logits_adv, y)


def trades(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, alpha: float) -> Tensor:
    """TRADES: CE(f(x), y) + alpha * KL(f(x) || f(x_adv)); alpha is the official code's `--beta`."""
    return F.cross_entropy(logits_nat, y) + alpha * trades_kl(logits_nat, logits_adv)


def alp(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, alpha: float) -> Tensor:
    """ALP as the LBGAT paper writes it (Eq. 4 replaces its first term): CE(f(x_adv), y) + alpha * MSE(f(x_adv), f(x))."""
    return F.cross_entropy(logits_adv, y) + alpha * F.mse_loss(logits_adv, logits_nat)


def _regularizer(
    logits_adv: Tensor, logits_nat: Tensor | None, alpha: float, regularizer: Regularizer
) -> Tensor | float:
    if regularizer in (None, "none"):
        return 0.0
    if logits_nat is None:
        raise ValueError(f"logits_nat: the {regularizer!r} regularizer needs the robust model's clean logits")
    if regularizer == "trades":
        return alpha * trades_kl(logits_nat, logits_adv)
    if regularizer == "alp":
        return alpha * F.mse_loss(logits_adv, logits_nat)
    raise ValueError(f"regularizer: unknown {regularizer!r}; use None, 'alp' or 'trades'")


def lbgat(
    logits_adv: Tensor,
    logits_teacher: Tensor,
    y: Tensor,
    *,
    logits_nat: Tensor | None = None,
    alpha: float = 0.0,
    beta: float = 1.0,
    regularizer: Regularizer = None,
    robust_ce: bool = False,
) -> Tensor:
    """LBGAT, Eq. 3 (+ Eq. 4/5 regularizers): MSE(M_r(x_adv), M_n(x)) + beta*CE(M_n(x), y) + alpha*R.

    The teacher M_n receives gradients from both the MSE and its CE term (Algorithm 1, lines 11-12);
    `robust_ce` adds CE(M_r(x_adv), y), the ablation of Table 6.
    """
    loss = F.mse_loss(logits_adv, logits_teacher) + beta * F.cross_entropy(logits_teacher, y)
    loss = loss + _regularizer(logits_adv, logits_nat, alpha, regularizer)
    if robust_ce:
        loss = loss + F.cross_entropy(logits_adv, y)
    return loss


def bgat(
    logits_adv: Tensor,
    logits_teacher: Tensor,
    y: Tensor,
    *,
    logits_nat: Tensor | None = None,
    alpha: float = 0.0,
    regularizer: Regularizer = None,
    robust_ce: bool = False,
) -> Tensor:
    """BGAT, Eq. 2 (+ Eq. 4/5): like `lbgat` with a fixed teacher: no teacher CE, no gradient into it."""
    loss = F.mse_loss(logits_adv, logits_teacher.detach())
    loss = loss + _regularizer(logits_adv, logits_nat, alpha, regularizer)
    if robust_ce:
        loss = loss + F.cross_entropy(logits_adv, y)
    return loss


def cat(logits_nat: Tensor, logits_cali: Tensor, y: Tensor, beta: float) -> Tensor:
    """Calibrated AT, Eq. 13 (f_theta's objective): CE(f(x), y) * (1 - p_y(x)) + beta * KL.

    The first term is the paper's surrogate phi (Eq. 8), a loss in its own right, so its gradient
    flows through both factors (the weight 1 - p_y(x) is not detached). The KL is read as TRADES
    writes it in the paper's own notation (App. H: "KL(P(Y|X')||P(Y|X))" for TRADES' term, whose code
    is KL(p(x) || p(x'))): KL(softmax(f(x)) || softmax(f(x_cali))), summed over classes and averaged
    over the batch, with gradients into both logits. `logits_cali` are f's logits on x + M * delta
    with the mask M held fixed (g_phi is trained by `cat_mask`, not by this loss).
    """
    ce = F.cross_entropy(logits_nat, y, reduction="none")
    p_true = F.softmax(logits_nat, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
    return (ce * (1.0 - p_true)).mean() + beta * trades_kl(logits_nat, logits_cali)


def cat_mask(logits_cali: Tensor, logits_adv: Tensor, y: Tensor, beta1: float) -> Tensor:
    """Calibrated AT, Eq. 14 (g_phi's objective): KL(f(x') || f(x_cali)) + beta1 * CE(f(x_cali), y).

    The KL keeps x_cali close to the adversarial example x' (the inner maximisation), the CE keeps
    it in class y (the oracle constraint). x' does not depend on phi, so `logits_adv` is a fixed
    target (detached); the gradient reaches g_phi through `logits_cali` only. KL orientation and
    reduction as in `cat`.
    """
    return trades_kl(logits_adv.detach(), logits_cali) + beta1 * F.cross_entropy(logits_cali, y)


def fat(
    logits_adv: Tensor,
    y: Tensor,
    *,
    logits_nat: Tensor | None = None,
    alpha: float = 6.0,
    variant: Literal["trades", "ce"] = "trades",
) -> Tensor:
    """Friendly AT changes only the inner maximisation (early-stopped PGD); its outer loss is its base's.

    variant 'trades' (FAT for TRADES): `trades(logits_nat, logits_adv, y, alpha)`; variant 'ce'
    (FAT): CE(f(x_adv), y), as the official FAT scripts train on the friendly examples.
    """
    if variant == "ce":
        return F.cross_entropy(logits_adv, y)
    if variant == "trades":
        if logits_nat is None:
            raise ValueError("logits_nat: FAT for TRADES needs the clean logits f(x)")
        return trades(logits_nat, logits_adv, y, alpha)
    raise ValueError(f"variant: unknown FAT variant {variant!r}; use 'trades' or 'ce'")
