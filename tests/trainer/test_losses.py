"""trainer.losses against hand-derived values and the official implementations' formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import losses


def _official_kl(logits_nat, logits_adv):
    # TRADES / LBGAT code: (1/B) * nn.KLDivLoss(size_average=False)(log_softmax(adv), softmax(nat))
    return nn.KLDivLoss(reduction="sum")(
        F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1)
    ) / len(logits_adv)


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).mul(2).requires_grad_(True) for s in shapes]


def test_natural_and_pgd_at_hand_values():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert losses.natural(logits, y).item() == pytest.approx(expected, rel=1e-6)
    assert losses.pgd_at(logits, y).item() == pytest.approx(expected, rel=1e-6)


def test_trades_kl_hand_value_and_direction():
    # p_nat = (0.5, 0.5), p_adv = softmax(log 3, 0) = (0.75, 0.25):
    # KL(p_nat || p_adv) = 0.5 log(0.5/0.75) + 0.5 log(0.5/0.25); it is not symmetric.
    nat = torch.tensor([[0.0, 0.0]])
    adv = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0)
    assert losses.trades_kl(nat, adv).item() == pytest.approx(expected, rel=1e-6)
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.trades_kl(adv, nat).item() == pytest.approx(reverse, rel=1e-6)
    # averaged over the batch: two copies give the same value
    assert losses.trades_kl(nat.repeat(2, 1), adv.repeat(2, 1)).item() == pytest.approx(expected, rel=1e-6)


def test_trades_matches_official_values_and_gradients():
    nat, adv = _leaves((8, 10), (8, 10))
    y = torch.arange(8) % 10
    ours = losses.trades(nat, adv, y, alpha=6.0)
    ours_grads = torch.autograd.grad(ours, [nat, adv])
    ref = F.cross_entropy(nat, y) + 6.0 * _official_kl(nat, adv)
    ref_grads = torch.autograd.grad(ref, [nat, adv])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b)
    # the KL is not detached on the clean side: the clean logits get gradient from both terms
    ce_only = torch.autograd.grad(F.cross_entropy(nat, y), [nat])[0]
    assert not torch.allclose(ours_grads[0], ce_only)


def test_alp_is_ce_adv_plus_mean_squared_error():
    nat = torch.tensor([[1.0, 0.0]])
    adv = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    ce = math.log(1 + math.e)  # -log softmax(0,1)[0]
    mse = (1.0 + 1.0) / 2  # mean over the B*K = 2 elements
    assert losses.alp(nat, adv, y, alpha=1.0).item() == pytest.approx(ce + mse, rel=1e-6)
    assert losses.alp(nat, adv, y, alpha=0.0).item() == pytest.approx(ce, rel=1e-6)


def _official_lbgat(out_adv, out_natural, out_teacher, y, beta):
    # dvlab-research/LBGAT lbgat.py: loss = mse(out_adv, out) + ce(out, y) + beta * (1/B) * KL_sum
    return (
        nn.MSELoss()(out_adv, out_teacher)
        + nn.CrossEntropyLoss()(out_teacher, y)
        + beta * _official_kl(out_natural, out_adv)
    )


@pytest.mark.parametrize("alpha", [0.0, 6.0])
def test_lbgat_trades_matches_official_values_and_gradients(alpha):
    adv, nat, teacher = _leaves((16, 10), (16, 10), (16, 10), seed=1)
    y = torch.arange(16) % 10
    ours = losses.lbgat(adv, teacher, y, logits_nat=nat, alpha=alpha, regularizer="trades")
    ref = _official_lbgat(adv, nat, teacher, y, alpha)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(
        torch.autograd.grad(ours, [adv, nat, teacher]), torch.autograd.grad(ref, [adv, nat, teacher])
    ):
        torch.testing.assert_close(a, b)


def test_lbgat_teacher_gets_gradient_from_mse_and_ce():
    adv, teacher = _leaves((4, 3), (4, 3), seed=2)
    y = torch.tensor([0, 1, 2, 0])
    g_full = torch.autograd.grad(losses.lbgat(adv, teacher, y), [teacher])[0]
    g_ce = torch.autograd.grad(F.cross_entropy(teacher, y), [teacher])[0]
    # d MSE / d teacher = -2 (adv - teacher) / (B*K)
    g_mse = -2 * (adv - teacher).detach() / adv.numel()
    torch.testing.assert_close(g_full, g_ce + g_mse)
    # beta scales the CE term only
    g_beta0 = torch.autograd.grad(losses.lbgat(adv, teacher, y, beta=0.0), [teacher])[0]
    torch.testing.assert_close(g_beta0, g_mse)


def test_lbgat_hand_value_pure_eq3():
    adv = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0]])
    y = torch.tensor([1])
    # MSE = (1 + 0)/2 = 0.5, CE(teacher) = log 2
    assert losses.lbgat(adv, teacher, y).item() == pytest.approx(0.5 + math.log(2), rel=1e-6)
    assert losses.lbgat(adv, teacher, y, beta=2.0).item() == pytest.approx(0.5 + 2 * math.log(2), rel=1e-6)


def test_lbgat_alp_regularizer_and_robust_ce():
    adv, nat, teacher = _leaves((4, 5), (4, 5), (4, 5), seed=3)
    y = torch.tensor([0, 1, 2, 3])
    base = F.mse_loss(adv, teacher) + F.cross_entropy(teacher, y)
    got = losses.lbgat(adv, teacher, y, logits_nat=nat, alpha=1.5, regularizer="alp", robust_ce=True)
    expected = base + 1.5 * F.mse_loss(adv, nat) + F.cross_entropy(adv, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_regularizer_needs_clean_logits():
    adv, teacher = _leaves((2, 3), (2, 3))
    with pytest.raises(ValueError, match="logits_nat"):
        losses.lbgat(adv, teacher, torch.tensor([0, 1]), regularizer="trades", alpha=1.0)
    with pytest.raises(ValueError, match="regularizer"):
        losses.lbgat(adv, teacher, torch.tensor([0, 1]), logits_nat=adv, regularizer="bogus")


def test_bgat_no_teacher_ce_and_no_teacher_gradient():
    adv, nat, teacher = _leaves((4, 5), (4, 5), (4, 5), seed=4)
    y = torch.tensor([0, 1, 2, 3])
    got = losses.bgat(adv, teacher, y, logits_nat=nat, alpha=6.0, regularizer="trades")
    expected = F.mse_loss(adv, teacher) + 6.0 * _official_kl(nat, adv)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    g_adv, g_teacher = torch.autograd.grad(got, [adv, teacher], allow_unused=True)
    assert g_teacher is None or torch.count_nonzero(g_teacher) == 0
    assert torch.count_nonzero(g_adv) > 0
