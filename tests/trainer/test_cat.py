"""Calibrated Adversarial Training: Eq. 13/14 by hand, the mask network, Algorithm 1's two updates, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.trainer.helpers import digits_batch, digits_spec, trained_digits_model
from trainer import attacks, losses
from trainer.loop import TrainingRun
from trainer.methods import build_method
from trainer.methods.cat import calibrate
from trainer.models import create_model, list_models, model_kind

CAT_SPEC = {"name": "cat", "mask_model": "cat_mask_mnist_cnn", "beta": 5.0, "beta1": 0.1}


def _run(tmp_path, method=None, **sections) -> TrainingRun:
    sections.setdefault("dataset", {"train_limit": 96})
    return TrainingRun(digits_spec(method or CAT_SPEC, **sections), out_dir=tmp_path)


# ----------------------------------------------------------------------------- losses by hand


def test_cat_loss_hand_value_and_gradients():
    logits_nat = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    logits_cali = torch.tensor([[0.0, 0.0], [0.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    beta = 5.0

    def sm(a, b):  # softmax of two logits
        return [math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))]

    expected = 0.0
    for zn, zc, label in (((2.0, 0.0), (0.0, 0.0), 0), ((0.0, 1.0), (0.0, 3.0), 0)):
        p, q = sm(*zn), sm(*zc)
        weighted_ce = -math.log(p[label]) * (1 - p[label])  # Eq. 8
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # KL(p(x) || p(x_cali))
        expected += (weighted_ce + beta * kl) / 2  # batch mean
    loss = losses.cat(logits_nat, logits_cali, y, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    loss.backward()
    assert logits_nat.grad is not None and logits_cali.grad is not None
    # the weight (1 - p_y) is part of the loss, not a constant: d/dz of -(1-p) log p for two classes,
    # with z = z_y - z_other and p = sigmoid(z), is p(1-p) log p - (1-p)^2 (per example, / batch).
    nat_only = logits_nat.detach().clone().requires_grad_(True)
    losses.cat(nat_only, logits_cali.detach(), y, 0.0).backward()
    p = torch.sigmoid(torch.tensor([2.0, -1.0]))
    dz = (p * (1 - p) * torch.log(p) - (1 - p) ** 2) / 2
    torch.testing.assert_close(nat_only.grad, torch.stack([dz, -dz], 1), rtol=1e-5, atol=1e-7)


def test_cat_mask_loss_hand_value_and_gradient_only_into_calibrated_logits():
    logits_cali = torch.tensor([[1.0, 0.0]], requires_grad=True)
    logits_adv = torch.tensor([[0.0, 2.0]], requires_grad=True)
    y = torch.tensor([0])
    e = math.exp
    q_cali = [e(1) / (e(1) + 1), 1 / (e(1) + 1)]
    p_adv = [1 / (1 + e(2)), e(2) / (1 + e(2))]
    kl = sum(pa * math.log(pa / qc) for pa, qc in zip(p_adv, q_cali))  # KL(p(x') || p(x_cali))
    expected = kl + 0.3 * -math.log(q_cali[0])
    loss = losses.cat_mask(logits_cali, logits_adv, y, 0.3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits_cali.grad is not None and logits_cali.grad.abs().sum() > 0
    assert logits_adv.grad is None  # x' does not depend on phi: a fixed target


# ----------------------------------------------------------------------------- mask networks


def test_mask_networks_are_registered_apart_from_classifiers():
    assert list_models(kind="mask") == ["cat_mask_mnist_cnn", "cat_mask_resnet18"]
    assert not set(list_models(kind="mask")) & set(list_models())
    assert model_kind("cat_mask_resnet18") == "mask" and model_kind("resnet18") == "classifier"
    with pytest.raises(ValueError, match="takes no num_classes"):
        create_model("cat_mask_resnet18", num_classes=10)
    with pytest.raises(TypeError, match="width"):
        create_model("cat_mask_mnist_cnn", width=4)


@pytest.mark.parametrize(
    "name,shape",
    [
        ("cat_mask_mnist_cnn", (1, 28, 28)),
        ("cat_mask_mnist_cnn", (1, 8, 8)),
        ("cat_mask_resnet18", (3, 32, 32)),
    ],
)
def test_mask_is_in_open_unit_interval_with_the_input_shape_and_trains(name, shape):
    torch.manual_seed(0)
    net = create_model(name, in_channels=shape[0]).train()
    x = torch.rand(2, *shape)
    delta = (torch.rand(2, *shape) * 2 - 1) * 0.3
    mask = net(x + delta)
    assert mask.shape == x.shape
    assert mask.min() > 0 and mask.max() < 1
    mask.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.fixture(scope="module")
def model():
    return trained_digits_model()


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_calibrated_examples_stay_in_the_eps_ball_and_the_box(model, norm, eps):
    x, y = digits_batch(32)
    x_adv = attacks.pgd(model, x, y, eps=eps, step_size=eps / 4, steps=5, norm=norm, random_start="uniform")
    torch.manual_seed(0)
    mask_net = create_model("cat_mask_mnist_cnn", in_channels=1)
    mask, x_cali = calibrate(mask_net, x, x_adv)
    assert (mask > 0).all() and (mask < 1).all()
    assert x_cali.min() >= 0 and x_cali.max() <= 1
    delta, delta_cali = (x_adv - x).flatten(1), (x_cali - x).flatten(1)
    size = (lambda d: d.abs().amax(1)) if norm == "linf" else (lambda d: d.norm(dim=1))
    assert size(delta_cali).max() <= eps + 1e-6
    # pixel-level calibration: every pixel moves in delta's direction, by less than delta
    assert ((delta_cali * delta) >= 0).all() and (delta_cali.abs() <= delta.abs() + 1e-7).all()
    assert (size(delta_cali) < size(delta) + 1e-7).all()


# ----------------------------------------------------------------------------- the method


def test_attack_follows_the_variant():
    spec = digits_spec(CAT_SPEC)
    config = build_method(spec.method, spec.threat_model).attack_config()
    assert (config.loss, config.random_start, config.kappa) == ("ce", "uniform", 0.0)
    spec = digits_spec({**CAT_SPEC, "variant": "cw", "kappa": 150.0})
    config = build_method(spec.method, spec.threat_model).attack_config()
    assert (config.loss, config.random_start, config.kappa) == ("cw", "uniform", 150.0)
    assert config.early_stop_tau is None


def test_theta_then_phi_each_by_its_own_optimizer(tmp_path):
    """g_phi's step sees the updated f, fills no gradient of f, and only its own optimizer steps."""
    run = _run(tmp_path)
    seen = {}
    main_step, aux_step = run.optimizer.step, run.auxiliary_optimizer.step
    aux_loss = run.method.auxiliary_loss

    def record_main(*a, **k):
        seen["robust_grads"] = [p.grad.clone() for p in run.robust.parameters()]
        seen["mask_grads_at_main"] = [p.grad for p in run.auxiliary.parameters()]
        return main_step(*a, **k)

    def record_aux_loss(robust, out, y):
        seen["robust_at_aux"] = {k: v.detach().clone() for k, v in run.robust.named_parameters()}
        seen["robust_training"] = run.robust.training
        return aux_loss(robust, out, y)

    def record_aux(*a, **k):
        seen["robust_grads_at_aux"] = [p.grad.clone() for p in run.robust.parameters()]
        seen["mask_grads"] = [p.grad for p in run.auxiliary.parameters()]
        return aux_step(*a, **k)

    run.optimizer.step, run.auxiliary_optimizer.step = record_main, record_aux
    run.method.auxiliary_loss = record_aux_loss
    mask_before = copy.deepcopy(run.auxiliary.state_dict())
    x, y = next(iter(run.loader))
    run.train_step(x, y)
    # Eq. 13 gives g_phi no gradient; Eq. 14 gives f none (its grads are still Eq. 13's)
    assert all(g is None for g in seen["mask_grads_at_main"])
    assert all(g is not None and g.abs().sum() > 0 for g in seen["mask_grads"])
    for before, after in zip(seen["robust_grads"], seen["robust_grads_at_aux"]):
        torch.testing.assert_close(before, after, rtol=0, atol=0)
    for key, value in run.robust.named_parameters():  # the weights after theta's step
        torch.testing.assert_close(seen["robust_at_aux"][key], value.detach(), rtol=0, atol=0)
    assert seen["robust_training"]
    assert any(not torch.equal(mask_before[k], v) for k, v in run.auxiliary.state_dict().items())
    assert run.auxiliary_optimizer.state  # momentum buffers exist: its optimizer stepped


def test_mask_learning_rate_follows_the_schedule(tmp_path):
    run = _run(
        tmp_path,
        method={**CAT_SPEC, "mask_lr": 0.01},
        optimization={
            "lr": 0.1,
            "batch_size": 32,
            "epochs": 2,
            "schedule": {"kind": "piecewise", "milestones": [1]},
        },
    )
    run.train_epoch()
    assert run.auxiliary_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    run.train_epoch()
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert run.auxiliary_optimizer.param_groups[0]["lr"] == pytest.approx(0.001)


def test_resume_restores_mask_network_and_its_optimizer(tmp_path):
    spec = digits_spec(
        CAT_SPEC,
        dataset={"train_limit": 96},
        optimization={"lr": 0.05, "batch_size": 32, "epochs": 2, "schedule": {"kind": "constant"}},
    )
    full = TrainingRun(spec, out_dir=tmp_path / "full")
    full.fit(evaluate_at_end=False)
    half = spec.model_copy(update={"optimization": spec.optimization.model_copy(update={"epochs": 1})})
    TrainingRun(half, out_dir=tmp_path / "part").fit(evaluate_at_end=False)
    torch.manual_seed(999)
    resumed = TrainingRun(spec, out_dir=tmp_path / "part")
    resumed.fit(resume=tmp_path / "part" / "checkpoints" / "last.pt", evaluate_at_end=False)
    for module in ("robust", "auxiliary"):
        for key, value in getattr(full, module).state_dict().items():
            torch.testing.assert_close(
                getattr(resumed, module).state_dict()[key], value, rtol=0, atol=0, msg=key
            )
    payload = resumed.checkpoint_payload()
    assert payload["auxiliary"] is not None and payload["auxiliary_optimizer"]["state"]


def test_eval_suite_cat_is_the_papers_protocol():
    import argparse

    from trainer.cli import _suite

    suite = _suite(argparse.Namespace(suite="cat", n_examples=None), own=None)
    assert [a.label() for a in suite.attacks] == ["fgsm", "pgd20", "pgd100", "cw30", "square5000"]
