"""MART, Cons-AT, RAAT and RAAT++ losses against hand-derived values and the official formulas.

The references are written as the official code computes them (YisenWang/MART mart.py,
alinlab/consistency-adversarial training/__init__.py, FlaAI/RAAT adv_train_bd.py), so a reduction
or a detach that differs shows up as a value or gradient mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import losses


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).mul(2).requires_grad_(True) for s in shapes]


def _official_mart(logits, logits_adv, y, beta):
    # YisenWang/MART mart.py, from `adv_probs = ...` to `loss = loss_adv + beta * loss_robust`
    kl = nn.KLDivLoss(reduction="none")
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / len(y)) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs)
    )
    return loss_adv + float(beta) * loss_robust


def _official_js(logit1, logit2, T=1.0):
    # alinlab/consistency-adversarial training/__init__.py::_jensen_shannon_div
    prob1 = F.softmax(logit1 / T, dim=1)
    prob2 = F.softmax(logit2 / T, dim=1)
    mean_prob = 0.5 * (prob1 + prob2)
    logsoftmax = torch.log(mean_prob.clamp(min=1e-8))
    jsd = F.kl_div(logsoftmax, prob1, reduction="batchmean")
    jsd += F.kl_div(logsoftmax, prob2, reduction="batchmean")
    return jsd * 0.5


def _js_hand(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda u, v: sum(a * math.log(a / b) for a, b in zip(u, v))  # noqa: E731
    return 0.5 * (kl(p, m) + kl(q, m))


# --------------------------------------------------------------------------- MART


def test_boosted_ce_hand_values():
    # p = (0.5, 0.3, 0.2): for y=0 the most probable wrong class has 0.3, for y=1 it has 0.5
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    ce0 = -math.log(0.5) - math.log(1.0001 - 0.3 + 1e-12)
    ce1 = -math.log(0.3) - math.log(1.0001 - 0.5 + 1e-12)
    assert losses.boosted_ce(logits, torch.tensor([0])).item() == pytest.approx(ce0, rel=1e-6)
    assert losses.boosted_ce(logits, torch.tensor([1])).item() == pytest.approx(ce1, rel=1e-6)
    # mean over the batch
    both = losses.boosted_ce(logits.repeat(2, 1), torch.tensor([0, 1]))
    assert both.item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def test_mart_kl_hand_value_weight_and_direction():
    # p_nat = (0.5, 0.5), p_adv = (0.75, 0.25); KL(p_nat || p_adv) weighted by 1 - p_nat_y = 0.5
    nat = torch.tensor([[0.0, 0.0]])
    adv = torch.tensor([[math.log(3.0), 0.0]])
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    got = losses.mart_kl(nat, adv, torch.tensor([0]))
    assert got.item() == pytest.approx(kl * (1.0000001 - 0.5), rel=1e-5)
    # a confidently correct clean prediction switches the term off
    confident = torch.tensor([[30.0, 0.0]])
    assert losses.mart_kl(confident, adv, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)
    # mean over the batch
    got2 = losses.mart_kl(nat.repeat(2, 1), adv.repeat(2, 1), torch.tensor([0, 0]))
    assert got2.item() == pytest.approx(got.item(), rel=1e-6)


def test_mart_matches_official_values_and_gradients():
    nat, adv = _leaves((16, 10), (16, 10), seed=5)
    y = torch.arange(16) % 10
    ours = losses.mart(nat, adv, y, alpha=6.0)
    ref = _official_mart(nat, adv, y, 6.0)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    ours_grads = torch.autograd.grad(ours, [nat, adv])
    ref_grads = torch.autograd.grad(ref, [nat, adv])
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b)
    # the clean logits are not detached: they get gradient from the KL and from its weight
    assert torch.count_nonzero(ours_grads[0]) > 0
    assert losses.mart(nat, adv, y, alpha=0.0).item() == pytest.approx(losses.boosted_ce(adv, y).item())


# --------------------------------------------------------------------------- JS, Cons-AT


def test_js_divergence_hand_value_symmetry_and_temperature():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[math.log(3.0), 0.0]])
    expected = _js_hand([0.5, 0.5], [0.75, 0.25])
    assert losses.js_divergence(a, b).item() == pytest.approx(expected, rel=1e-5)
    assert losses.js_divergence(b, a).item() == pytest.approx(expected, rel=1e-5)
    assert losses.js_divergence(a, a).item() == pytest.approx(0.0, abs=1e-7)
    # temperature T divides the logits: softmax(b / 0.5) = (0.9, 0.1)
    sharp = _js_hand([0.5, 0.5], [0.9, 0.1])
    assert losses.js_divergence(a, b, temperature=0.5).item() == pytest.approx(sharp, rel=1e-5)
    empty = torch.zeros(0, 3, requires_grad=True)
    assert losses.js_divergence(empty, empty).item() == 0.0


def test_js_divergence_matches_official_values_and_gradients():
    l1, l2 = _leaves((8, 10), (8, 10), seed=6)
    ours = losses.js_divergence(l1, l2, 0.5)
    ref = _official_js(l1, l2, 0.5)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [l1, l2]), torch.autograd.grad(ref, [l1, l2])):
        torch.testing.assert_close(a, b)


def test_cons_at_is_ce_over_both_views_plus_js():
    adv1, adv2 = _leaves((4, 5), (4, 5), seed=7)
    y = torch.tensor([0, 1, 2, 3])
    got = losses.cons_at(adv1, adv2, y, lam=2.0, temperature=0.5)
    # official: criterion(outputs_adv, labels.repeat(2)) on the stacked 2B batch + lam * JS
    ref = F.cross_entropy(torch.cat([adv1, adv2]), y.repeat(2)) + 2.0 * _official_js(adv1, adv2, 0.5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    g1, g2 = torch.autograd.grad(got, [adv1, adv2])
    r1, r2 = torch.autograd.grad(ref, [adv1, adv2])
    torch.testing.assert_close(g1, r1)
    torch.testing.assert_close(g2, r2)
    # hand case: identical views, uniform logits -> CE = log K, JS = 0
    flat = torch.zeros(2, 4)
    assert losses.cons_at(flat, flat, torch.tensor([0, 3])).item() == pytest.approx(math.log(4), rel=1e-6)


# --------------------------------------------------------------------------- DICAR, RAAT, RAAT++


def test_dicar_interpolates_clean_logits_or_probabilities():
    mix_adv = torch.tensor([[0.0, 0.0]])
    n1 = torch.tensor([[2.0 * math.log(3.0), 0.0]])
    n2 = torch.tensor([[0.0, 0.0]])
    # logits (official code): 0.5*n1 + 0.5*n2 = (log 3, 0) -> p = (0.75, 0.25) at T = 1
    got = losses.dicar(mix_adv, n1, n2, mix=0.5, temperature=1.0, target="logits")
    assert got.item() == pytest.approx(_js_hand([0.5, 0.5], [0.75, 0.25]), rel=1e-5)
    # probabilities (Eq. 15): 0.5*softmax(n1) + 0.5*softmax(n2) = 0.5*(0.9, 0.1) + 0.5*(0.5, 0.5) = (0.7, 0.3)
    got = losses.dicar(mix_adv, n1, n2, mix=0.5, temperature=1.0, target="probabilities")
    assert got.item() == pytest.approx(_js_hand([0.5, 0.5], [0.7, 0.3]), rel=1e-5)
    # mix = 1 compares with the first view's clean prediction only
    got = losses.dicar(mix_adv, n1, n2, mix=1.0, temperature=1.0)
    assert got.item() == pytest.approx(_js_hand([0.5, 0.5], [0.9, 0.1]), rel=1e-5)
    with pytest.raises(ValueError, match="target"):
        losses.dicar(mix_adv, n1, n2, mix=0.5, target="bogus")


@pytest.mark.parametrize("target", ["logits", "probabilities"])
def test_dicar_gradients_reach_adversarial_and_both_clean_sides(target):
    mix_adv, n1, n2 = _leaves((6, 5), (6, 5), (6, 5), seed=8)
    loss = losses.dicar(mix_adv, n1, n2, mix=0.7, temperature=0.5, target=target)
    grads = torch.autograd.grad(loss, [mix_adv, n1, n2])
    assert all(torch.count_nonzero(g) > 0 for g in grads)
    if target == "logits":  # exactly the official ICT_output_1/ICT_output_2 computation
        ref = _official_js(mix_adv, 0.7 * n1 + 0.3 * n2, 0.5)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_raat_is_ce_plus_lambda_dicar_and_empty_dicar_is_zero():
    train, mix_adv, n1, n2 = _leaves((8, 4), (3, 4), (3, 4), (3, 4), seed=9)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    got = losses.raat(train, y, mix_adv, n1, n2, 0.6, lam=1.5, temperature=0.5)
    ref = F.cross_entropy(train, y) + 1.5 * _official_js(mix_adv, 0.6 * n1 + 0.4 * n2, 0.5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    g_train, g_mix, g1, g2 = torch.autograd.grad(got, [train, mix_adv, n1, n2])
    assert all(torch.count_nonzero(g) > 0 for g in (g_train, g_mix, g1, g2))
    empty = train[:0]
    alone = losses.raat(train, y, empty, empty, empty, 1.0)
    assert alone.item() == pytest.approx(F.cross_entropy(train, y).item(), rel=1e-6)


def test_raat_pp_is_bce_plus_mart_kl_plus_dicar():
    train, nat, adv, mix_adv, n1, n2 = _leaves((8, 4), (8, 4), (8, 4), (2, 4), (2, 4), (2, 4), seed=10)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    got = losses.raat_pp(train, y, nat, adv, mix_adv, n1, n2, 0.8, lam=1.0, alpha=6.0, temperature=0.5)
    # official mart_loss_bd: BCE on data_bce, beta * weighted KL on the full x_adv; + lam * ICT JS
    mart_full = _official_mart(nat, adv, y, 6.0)
    bce_adv_only = _official_mart(nat, adv, y, 0.0)
    ref = (
        _official_mart(nat, train, y, 0.0)
        + (mart_full - bce_adv_only)
        + _official_js(mix_adv, 0.8 * n1 + 0.2 * n2, 0.5)
    )
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    grads = torch.autograd.grad(got, [train, nat, adv, mix_adv, n1, n2])
    assert all(torch.count_nonzero(g) > 0 for g in grads)
