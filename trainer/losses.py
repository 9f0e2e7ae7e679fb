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
    with the mask M held fixed (g_phi is trained by `cat_mask`, not by this loss). The weight is
    1.0000001 - p_y(x), the official code's constant (never exactly 0).
    """
    ce = F.cross_entropy(logits_nat, y, reduction="none")
    p_true = F.softmax(logits_nat, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
    return (ce * (1.0000001 - p_true)).mean() + beta * trades_kl(logits_nat, logits_cali)


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


# --------------------------------------------------------------------------- MART, Cons-AT, RAAT
#
# Appended as one block (MART, Wang et al. ICLR 2020; Cons-AT, Tack et al. AAAI 2022; RAAT and
# RAAT++, "Robust Alignment", App. C / Table 4). Constants (1.0001, 1e-12, 1.0000001, the 1e-8 clamp)
# are the official codes': they bound the logarithms and weights exactly as the reported runs did.

__all__ += ["boosted_ce", "cons_at", "dicar", "js_divergence", "mart", "mart_kl", "raat", "raat_pp"]


def boosted_ce(logits: Tensor, y: Tensor) -> Tensor:
    """MART's boosted CE (Eq. 14 of the RAAT paper): CE(p, y) - log(1 - max_{k!=y} p_k), mean over the batch.

    As the official MART code: the margin term is `nll(log(1.0001 - p + 1e-12), y')` with y' the most
    probable wrong class; y' is picked by argsort (no gradient through the choice).
    """
    probs = F.softmax(logits, dim=1)
    top2 = probs.argsort(dim=1)[:, -2:]
    wrong = top2[:, -2].where(top2[:, -1] == y, top2[:, -1])
    return F.cross_entropy(logits, y) + F.nll_loss((1.0001 - probs + 1e-12).log(), wrong)


def mart_kl(logits_nat: Tensor, logits_adv: Tensor, y: Tensor) -> Tensor:
    """MART's misclassification-aware KL: sum_k KL(p_nat || p_adv) * (1 - p_nat_y), mean over the batch.

    Official code: `sum(kl(log(adv_probs + 1e-12), nat_probs), 1) * (1.0000001 - true_probs)` / B. Both
    the clean and the adversarial logits receive gradients, the weight included (nothing is detached).
    """
    p_nat = F.softmax(logits_nat, dim=1)
    p_adv = F.softmax(logits_adv, dim=1)
    per_example = F.kl_div((p_adv + 1e-12).log(), p_nat, reduction="none").sum(1)
    true_probs = p_nat.gather(1, y.unsqueeze(1)).squeeze(1)
    return (per_example * (1.0000001 - true_probs)).mean()


def mart(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, alpha: float) -> Tensor:
    """MART: BCE(f(x_adv), y) + alpha * KL(f(x) || f(x_adv)) * (1 - p_y(x)); alpha is the official `--beta` (6)."""
    return boosted_ce(logits_adv, y) + alpha * mart_kl(logits_nat, logits_adv, y)


def js_divergence(logits_1: Tensor, logits_2: Tensor, temperature: float = 1.0) -> Tensor:
    """Jensen-Shannon divergence of softmax(logits/T), as Cons-AT's `_jensen_shannon_div`.

    0.5 * (KL(p1 || m) + KL(p2 || m)) with m = (p1 + p2)/2, log m clamped at 1e-8, summed over classes
    and averaged over the rows (`batchmean`). Symmetric; gradients flow into both arguments and m.
    An empty batch gives 0 (RAAT applies its term to a subset that can be empty).
    """
    if logits_1.shape[0] == 0:
        return logits_1.sum() * 0.0
    p1 = F.softmax(logits_1 / temperature, dim=1)
    p2 = F.softmax(logits_2 / temperature, dim=1)
    log_m = (0.5 * (p1 + p2)).clamp(min=1e-8).log()
    return 0.5 * (F.kl_div(log_m, p1, reduction="batchmean") + F.kl_div(log_m, p2, reduction="batchmean"))


def cons_at(
    logits_adv_1: Tensor, logits_adv_2: Tensor, y: Tensor, lam: float = 1.0, temperature: float = 0.5
) -> Tensor:
    """Cons-AT (Table 4): CE on the adversarial examples of both augmentations + lam * JS between them.

    `logits_adv_1[i]` and `logits_adv_2[i]` come from two augmentations of image i (label y[i]). As the
    official code, the CE is the mean over all 2B examples and the JS uses temperature T (0.5 there).
    """
    # the mean over the 2B examples, written as the mean of the two halves' means (equal sizes)
    ce = 0.5 * (F.cross_entropy(logits_adv_1, y) + F.cross_entropy(logits_adv_2, y))
    return ce + lam * js_divergence(logits_adv_1, logits_adv_2, temperature)


DicarTarget = Literal["logits", "probabilities"]


def dicar(
    logits_mix_adv: Tensor,
    logits_nat_1: Tensor,
    logits_nat_2: Tensor,
    mix: float,
    temperature: float = 0.5,
    target: DicarTarget = "logits",
) -> Tensor:
    """RAAT's DICAR term: JS(f(mix*x1' + (1-mix)*x2') || interpolation of f(x1) and f(x2)), mean over rows.

    Row i holds, for one image, the prediction on the interpolation of its two augmentations'
    adversarial examples and the clean logits of both augmentations. `target='logits'` interpolates
    the clean logits and then applies softmax(./T), as the official RAAT code; `'probabilities'`
    interpolates softmax(./T) of each, as Eq. 15-16 write it. The clean side is not detached: in the
    official code it is a training-mode forward that receives gradients. No rows gives 0.
    """
    if target == "logits":
        return js_divergence(logits_mix_adv, mix * logits_nat_1 + (1 - mix) * logits_nat_2, temperature)
    if target != "probabilities":
        raise ValueError(f"target: unknown {target!r}; use 'logits' or 'probabilities'")
    if logits_mix_adv.shape[0] == 0:
        return logits_mix_adv.sum() * 0.0
    p1 = F.softmax(logits_mix_adv / temperature, dim=1)
    p2 = mix * F.softmax(logits_nat_1 / temperature, dim=1) + (1 - mix) * F.softmax(
        logits_nat_2 / temperature, dim=1
    )
    log_m = (0.5 * (p1 + p2)).clamp(min=1e-8).log()
    return 0.5 * (F.kl_div(log_m, p1, reduction="batchmean") + F.kl_div(log_m, p2, reduction="batchmean"))


def raat(
    logits_ce: Tensor,
    y: Tensor,
    logits_mix_adv: Tensor,
    logits_nat_1: Tensor,
    logits_nat_2: Tensor,
    mix: float,
    *,
    lam: float = 1.0,
    temperature: float = 0.5,
    target: DicarTarget = "logits",
) -> Tensor:
    """RAAT (Table 4): CE on each example's training input + lam * DICAR.

    `logits_ce` are the logits of the full adversarial example for non-boundary and misclassified
    samples and of the reduced one (x + eta*delta) for boundary samples; the indicator functions that
    choose are the caller's (they use a frozen copy of the model). CE is the mean over all examples;
    DICAR rows are the images whose two augmentations are both classified correctly.
    """
    ce = F.cross_entropy(logits_ce, y)
    return ce + lam * dicar(logits_mix_adv, logits_nat_1, logits_nat_2, mix, temperature, target)


def raat_pp(
    logits_ce: Tensor,
    y: Tensor,
    logits_nat: Tensor,
    logits_adv: Tensor,
    logits_mix_adv: Tensor,
    logits_nat_1: Tensor,
    logits_nat_2: Tensor,
    mix: float,
    *,
    lam: float = 1.0,
    alpha: float = 6.0,
    temperature: float = 0.5,
    target: DicarTarget = "logits",
) -> Tensor:
    """RAAT++ (Table 4): BCE on the RAAT training inputs + alpha * MART's weighted KL + lam * DICAR.

    The KL compares the clean logits with those of the full adversarial examples (for every sample,
    boundary ones included), as MART and the official `mart_loss_bd`; `alpha` is that code's `beta`
    (6 by default there), `lam` the DICAR weight (1).
    """
    loss = boosted_ce(logits_ce, y) + alpha * mart_kl(logits_nat, logits_adv, y)
    return loss + lam * dicar(logits_mix_adv, logits_nat_1, logits_nat_2, mix, temperature, target)


def _below_1e10(term: Tensor) -> bool:
    # ReBAT's and RAAT#'s scripts add a regulariser only `if reg_loss < 1e10` (an inf or NaN term is
    # dropped, with no gradient). One host sync per step, as there.
    return bool(term.detach() < 1e10)


def rebat(logits_adv: Tensor, logits_adv_averaged: Tensor | None, y: Tensor, beta: float) -> Tensor:
    """ReBAT (PKU-ML/ReBAT train_cifar_wa.py): CE(f(x'), y) + beta * KL(f_avg(x') || f(x')).

    `logits_adv_averaged` are the weight-averaged model's logits on the same x' (no gradient); the KL
    is `F.kl_div(log_softmax(f(x')), softmax(f_avg(x')), reduction='batchmean')`, added only when
    beta > 0 (the script forwards the averaged model only then) and below 1e10 (its guard).
    """
    loss = F.cross_entropy(logits_adv, y)
    if beta == 0:
        return loss
    if logits_adv_averaged is None:
        raise ValueError("logits_adv_averaged: ReBAT's regulariser needs the averaged model's logits on x'")
    reg = trades_kl(logits_adv_averaged.detach(), logits_adv)
    return loss + beta * reg if _below_1e10(reg) else loss


def raat_sharp(
    logits_ce: Tensor,
    y: Tensor,
    logits_mix_adv: Tensor,
    logits_nat_1: Tensor,
    logits_nat_2: Tensor,
    mix: float,
    *,
    beta: float = 1.0,
    temperature: float = 0.5,
    logits_adv: Tensor | None = None,
    logits_adv_averaged: Tensor | None = None,
    boat_beta: float = 0.0,
) -> Tensor:
    """RAAT# (FlaAI/RAAT `RAAT#_Code_(Sec_5.3)/train_cifar.py`): CE on the training inputs of the first
    augmentation + beta * DICAR (logits interpolated, as RAAT) [+ boat_beta * ReBAT's KL].

    `logits_ce`/`y` are the B examples of the first view (x' or x + eta*delta per the boundary
    partition); the DICAR rows are the images whose two views are both classified correctly. Each
    regulariser is added only below 1e10, the script's guard. ReBAT's KL(f_avg(x') || f(x')) on the
    first view's x' (`logits_adv`, `logits_adv_averaged`) is commented out in the released script;
    `boat_beta` > 0 restores it.
    """
    loss = F.cross_entropy(logits_ce, y)
    con = dicar(logits_mix_adv, logits_nat_1, logits_nat_2, mix, temperature, "logits")
    if _below_1e10(con):
        loss = loss + beta * con
    if boat_beta > 0:
        if logits_adv is None or logits_adv_averaged is None:
            raise ValueError("logits_adv_averaged: ReBAT's KL term needs both models' logits on x'")
        reg = trades_kl(logits_adv_averaged.detach(), logits_adv)
        if _below_1e10(reg):
            loss = loss + boat_beta * reg
    return loss
