"""Attack invariants: inside the eps ball and [0,1], loss goes up, deterministic, modes untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.trainer.helpers import batch, digits_batch, tiny_model, trained_digits_model
from trainer import attacks


@pytest.fixture(scope="module")
def model():
    return trained_digits_model()


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "kl", "cw"])
@pytest.mark.parametrize("start", ["none", "uniform", "normal"])
def test_pgd_stays_in_ball_and_box(model, norm, eps, loss, start):
    x, y = digits_batch(32)
    x_adv = attacks.pgd(
        model,
        x,
        y,
        eps=eps,
        step_size=eps / 4,
        steps=5,
        norm=norm,
        loss=loss,
        random_start=start,
        kappa=100.0,
    )
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max().item() <= eps + 1e-5
    # it moved: PGD with 5 steps does not leave every example where it started
    assert size.mean().item() > eps / 10


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_pgd_ce_increases_loss_and_beats_fgsm(model, norm, eps):
    x, y = digits_batch(64, seed=1)
    clean = _ce(model, x, y).mean()
    adv = attacks.pgd(model, x, y, eps=eps, step_size=eps / 4, steps=10, norm=norm, loss="ce")
    assert _ce(model, adv, y).mean() > clean + 0.05
    if norm == "linf":
        fg = attacks.fgsm(model, x, y, eps=eps)
        assert _ce(model, fg, y).mean() > clean
        # FGSM is exactly one signed step of size eps from x (then clipped to the box)
        assert torch.all(((fg - x).abs() - eps).abs()[(fg > 0) & (fg < 1)] < 1e-6)


def test_kl_attack_increases_divergence_from_clean_prediction(model):
    x, y = digits_batch(64, seed=2)
    p = F.softmax(model(x), 1).detach()
    adv = attacks.pgd(model, x, y, eps=0.1, step_size=0.025, steps=10, loss="kl", random_start="normal")
    kl = F.kl_div(F.log_softmax(model(adv), 1), p, reduction="batchmean")
    assert kl.item() > 1e-3


def test_cw_attack_lowers_margin(model):
    x, y = digits_batch(64, seed=3)
    margin_clean = -attacks.cw_margin(model(x).detach(), y, kappa=1e9)
    adv = attacks.pgd(model, x, y, eps=0.1, step_size=0.025, steps=10, loss="cw", kappa=1e9)
    margin_adv = -attacks.cw_margin(model(adv).detach(), y, kappa=1e9)
    assert margin_adv.mean() < margin_clean.mean()


def test_cw_margin_hand_value():
    logits = torch.tensor([[3.0, 1.0, 2.0]])
    # z_y - max_{j != y} z_j = 3 - 2 = 1; loss = -max(1, -kappa)
    assert attacks.cw_margin(logits, torch.tensor([0]), kappa=0.0).item() == -1.0
    assert attacks.cw_margin(logits, torch.tensor([1]), kappa=0.0).item() == 0.0  # 1 - 3 = -2 -> clamp at -0
    assert attacks.cw_margin(logits, torch.tensor([1]), kappa=50.0).item() == 2.0


def test_deterministic_with_seed_and_without_random_start(model):
    x, y = digits_batch(16, seed=4)
    a = attacks.pgd(model, x, y, eps=0.1, step_size=0.02, steps=3)
    b = attacks.pgd(model, x, y, eps=0.1, step_size=0.02, steps=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(7)
    c = attacks.pgd(model, x, y, eps=0.1, step_size=0.02, steps=3, random_start="uniform")
    torch.manual_seed(7)
    d = attacks.pgd(model, x, y, eps=0.1, step_size=0.02, steps=3, random_start="uniform")
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    e = attacks.pgd(model, x, y, eps=0.1, step_size=0.02, steps=3, random_start="normal", generator=g)
    assert not torch.equal(e, c)


def test_attack_keeps_model_mode_and_parameter_grads():
    m = tiny_model().train()
    x, y = batch(8)
    attacks.pgd(m, x, y, eps=0.1, step_size=0.02, steps=2, loss="kl", random_start="normal")
    assert m.training
    assert all(p.grad is None for p in m.parameters())
    m.eval()
    attacks.fgsm(m, x, y, eps=0.1)
    assert not m.training
    assert all(p.grad is None for p in m.parameters())


def test_matches_official_trades_loop_which_recomputes_clean_logits(model):
    """Ours computes softmax(f(x)) once; the official loop recomputes it every step. Same examples."""
    x, y = digits_batch(16, seed=5)
    torch.manual_seed(3)
    noise = 0.001 * torch.randn(x.shape)
    eps, step = 0.1, 0.02
    x_ref = x + noise
    for _ in range(5):
        x_ref.requires_grad_()
        loss = torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(model(x_ref), 1), F.softmax(model(x), 1))
        grad = torch.autograd.grad(loss, [x_ref])[0]
        x_ref = x_ref.detach() + step * grad.sign()
        x_ref = torch.min(torch.max(x_ref, x - eps), x + eps).clamp(0, 1)
    torch.manual_seed(3)
    ours = attacks.pgd(model, x, y, eps=eps, step_size=step, steps=5, loss="kl", random_start="normal")
    torch.testing.assert_close(ours, x_ref, rtol=0, atol=1e-6)


def test_bad_arguments():
    m = tiny_model()
    x, y = batch(2)
    with pytest.raises(ValueError, match="norm"):
        attacks.pgd(m, x, y, eps=0.1, step_size=0.1, steps=1, norm="l1")
    with pytest.raises(ValueError, match="random_start"):
        attacks.pgd(m, x, y, eps=0.1, step_size=0.1, steps=1, random_start="gauss")
    with pytest.raises(ValueError, match="eps"):
        attacks.pgd(m, x, y, eps=0.0, step_size=0.1, steps=1)
