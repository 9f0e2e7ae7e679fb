"""Friendly Adversarial Training: early-stopped PGD per example, the official code, tau schedule, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.trainer.helpers import digits_batch, digits_spec, tiny_model, trained_digits_model
from trainer import attacks, losses
from trainer.loop import TrainingRun
from trainer.methods import build_method


class _Margin(nn.Module):
    """logits = [sum(x) - 2, 0]: class 0 while the pixel sum exceeds 2; every CE step lowers it by 4*step."""

    def forward(self, x):
        s = x.flatten(1).sum(1) - 2.0
        return torch.stack([s, torch.zeros_like(s)], 1)


def _margin_batch():
    # margins 0.1, 0.3, 0.5 (correct, crossing after 1, 2, 3 steps of 0.2) and -0.1 (already wrong)
    margins = torch.tensor([0.1, 0.3, 0.5, -0.1])
    x = (0.5 + margins / 4).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    return x, torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize(
    "tau,expected",
    [
        (0, [-0.1, -0.1, -0.1, -0.1]),  # stop at the first misclassified iterate (the last one: no step)
        (1, [-0.3, -0.3, -0.3, -0.3]),  # one more step after it
        (None, [-0.9, -0.7, -0.5, -1.1]),  # plain PGD: 5 steps of 0.2 for every example
    ],
)
def test_early_stopping_is_per_example(tau, expected):
    x, y = _margin_batch()
    x_adv = attacks.pgd(_Margin(), x, y, eps=0.5, step_size=0.05, steps=5, early_stop_tau=tau)
    margins = x_adv.flatten(1).sum(1) - 2.0
    steps_taken = torch.tensor([0.1, 0.3, 0.5, -0.1]) - torch.tensor(expected)
    torch.testing.assert_close(margins, torch.tensor(expected), rtol=0, atol=1e-5)
    if tau == 0:
        assert torch.equal(x_adv[3], x[3])  # misclassified from the start: never moved
        torch.testing.assert_close(steps_taken, torch.tensor([0.2, 0.4, 0.6, 0.0]), rtol=0, atol=1e-5)


def _official_earlystop(model, data, target, step_size, epsilon, perturb_steps, tau, loss_fn):
    """FAT's earlystop.py (rand_init=False, omega=0), CPU and any image shape: the reference.

    Returns (adv, natural, target) in the official (reordered) order.
    """
    model.eval()
    K = perturb_steps
    out_adv, out_nat, out_tgt = [], [], []
    control = torch.ones(len(target)) * tau
    iter_adv, iter_clean, iter_target = data.detach(), data.detach(), target.detach()
    output_iter_clean_data = model(data)
    while K > 0:
        iter_adv.requires_grad_()
        output = model(iter_adv)
        pred = output.max(1, keepdim=True)[1]
        output_index, iter_index = [], []
        for idx in range(len(pred)):
            if pred[idx] != iter_target[idx]:
                if control[idx] == 0:
                    output_index.append(idx)
                else:
                    control[idx] -= 1
                    iter_index.append(idx)
            else:
                iter_index.append(idx)
        if output_index:
            out_adv.append(iter_adv[output_index].detach())
            out_nat.append(iter_clean[output_index])
            out_tgt.append(iter_target[output_index])
        if loss_fn == "cent":
            loss_adv = nn.CrossEntropyLoss(reduction="mean")(output, iter_target)
        else:
            loss_adv = nn.KLDivLoss(reduction="sum")(
                F.log_softmax(output, dim=1), F.softmax(output_iter_clean_data, dim=1)
            )
        grad = torch.autograd.grad(loss_adv, [iter_adv], retain_graph=True)[0]
        if not iter_index:
            return torch.cat(out_adv), torch.cat(out_nat), torch.cat(out_tgt)
        control, iter_adv, iter_clean = control[iter_index], iter_adv[iter_index], iter_clean[iter_index]
        iter_target, grad = iter_target[iter_index], grad[iter_index]
        output_iter_clean_data = output_iter_clean_data[iter_index]
        iter_adv = iter_adv.detach() + step_size * grad.sign()
        iter_adv = torch.min(torch.max(iter_adv, iter_clean - epsilon), iter_clean + epsilon).clamp(0, 1)
        K -= 1
    out_adv.append(iter_adv.detach())
    out_nat.append(iter_clean)
    out_tgt.append(iter_target)
    return torch.cat(out_adv), torch.cat(out_nat), torch.cat(out_tgt)


@pytest.fixture(scope="module")
def model():
    return trained_digits_model()


@pytest.mark.parametrize("tau", [0, 2])
@pytest.mark.parametrize("loss,official_loss", [("ce", "cent"), ("kl", "kl")])
def test_matches_the_official_early_stopped_pgd(model, tau, loss, official_loss):
    x, y = digits_batch(48, seed=7)
    ours = attacks.pgd(model, x, y, eps=0.1, step_size=0.02, steps=10, loss=loss, early_stop_tau=tau)
    ref_adv, ref_nat, ref_tgt = _official_earlystop(model, x, y, 0.02, 0.1, 10, tau, official_loss)
    # the official code reorders the batch; match rows by their clean image
    order = [int(torch.nonzero((ref_nat.flatten(1) == row).all(1))[0]) for row in x.flatten(1)]
    torch.testing.assert_close(ours, ref_adv[order], rtol=0, atol=1e-6)
    assert torch.equal(ref_tgt[order], y)
    # early stopping left some examples short of where plain PGD takes them
    plain = attacks.pgd(model, x, y, eps=0.1, step_size=0.02, steps=10, loss=loss)
    assert not torch.equal(ours, plain)


def test_early_stopped_attack_keeps_modes_grads_and_ball():
    m = tiny_model().train()
    x, y = digits_batch(16)
    x_adv = attacks.pgd(
        m,
        x,
        y,
        eps=0.1,
        step_size=0.03,
        steps=4,
        loss="kl",
        random_start="normal",
        early_stop_tau=1,
        step_noise=0.01,
    )
    assert m.training and all(p.grad is None for p in m.parameters())
    assert not x_adv.requires_grad and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with pytest.raises(ValueError, match="early_stop_tau"):
        attacks.pgd(m, x, y, eps=0.1, step_size=0.03, steps=1, early_stop_tau=-1)


def test_fat_loss_is_its_base_loss():
    torch.manual_seed(0)
    nat = torch.randn(4, 3, requires_grad=True)
    adv = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    trades = losses.fat(adv, y, logits_nat=nat, alpha=6.0, variant="trades")
    assert trades.item() == pytest.approx(losses.trades(nat, adv, y, 6.0).item())
    trades.backward()
    assert nat.grad is not None and adv.grad is not None
    adv2 = adv.detach().clone().requires_grad_(True)
    ce = losses.fat(adv2, y, variant="ce")
    assert ce.item() == pytest.approx(F.cross_entropy(adv2, y).item())
    with pytest.raises(ValueError, match="logits_nat"):
        losses.fat(adv, y, variant="trades")


@pytest.mark.parametrize(
    "variant,official",
    [
        # FAT_for_TRADES.py adjust_tau(epoch + 1): <=30: 0, <=50: 1, <=70: 2, else 3
        ("trades", {0: 0, 29: 0, 30: 1, 49: 1, 50: 2, 69: 2, 70: 3, 84: 3}),
        # FAT.py adjust_tau(epoch + 1): <=50: 0, <=90: 1, else 2
        ("ce", {0: 0, 49: 0, 50: 1, 89: 1, 90: 2, 119: 2}),
    ],
)
def test_dynamic_tau_matches_the_official_scripts(variant, official):
    spec = digits_spec({"name": "fat", "variant": variant})
    method = build_method(spec.method, spec.threat_model)
    for epoch, tau in official.items():
        method.set_epoch(epoch)
        assert method.attack_config().early_stop_tau == tau, epoch


def test_attack_settings_per_variant():
    spec = digits_spec({"name": "fat", "tau": 2, "tau_milestones": [1]})
    config = build_method(spec.method, spec.threat_model).attack_config()
    assert (config.loss, config.random_start, config.step_noise, config.early_stop_tau) == (
        "kl",
        "normal",
        0.0,
        2,
    )
    spec = digits_spec({"name": "fat", "variant": "ce", "omega": 0.0})
    config = build_method(spec.method, spec.threat_model).attack_config()
    assert (config.loss, config.random_start, config.step_noise, config.early_stop_tau) == (
        "ce",
        "uniform",
        0.0,
        0,
    )
    spec = digits_spec({"name": "fat", "variant": "ce"})
    assert build_method(spec.method, spec.threat_model).attack_config().step_noise == 0.001


def test_the_loop_tells_the_method_its_epoch(tmp_path):
    spec = digits_spec(
        {"name": "fat", "tau_milestones": [1]},
        dataset={"train_limit": 64},
        optimization={"lr": 0.05, "batch_size": 32, "epochs": 2, "schedule": {"kind": "constant"}},
    )
    run = TrainingRun(spec, out_dir=tmp_path)
    taus = []
    generate = run.method.generate

    def record(robust, x, y):
        taus.append(run.method.attack_config().early_stop_tau)
        return generate(robust, x, y)

    run.method.generate = record
    run.fit(evaluate_at_end=False)
    assert taus == [0, 0, 1, 1]
