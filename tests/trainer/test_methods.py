"""Every method: a few real training steps, the model modes it promises, and the official math."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.trainer.helpers import digits_spec
from trainer.loop import TrainingRun
from trainer.methods import build_method, list_methods

METHOD_SPECS = {
    "natural": {"name": "natural"},
    "pgd_at": {"name": "pgd_at"},
    "trades": {"name": "trades", "alpha": 6.0},
    "alp": {"name": "alp", "alpha": 1.0},
    "lbgat": {"name": "lbgat", "regularizer": "trades", "alpha": 6.0},
    "lbgat_alp": {"name": "lbgat", "regularizer": "alp", "alpha": 1.0, "robust_ce": True},
    "lbgat_ce_attack": {"name": "lbgat"},
    "cat": {"name": "cat", "mask_model": "cat_mask_mnist_cnn", "beta1": 0.1},
    "cat_cw": {"name": "cat", "variant": "cw", "mask_model": "cat_mask_mnist_cnn"},
    "fat": {"name": "fat", "tau": 1, "tau_milestones": []},
    "fat_ce": {"name": "fat", "variant": "ce"},
}


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory):
    """A natural model checkpoint in our format: the fixed teacher for BGAT."""
    spec = digits_spec({"name": "natural"}, dataset={"train_limit": 256})
    run = TrainingRun(spec, out_dir=tmp_path_factory.mktemp("teacher"))
    for x, y in run.loader:
        run.train_step(x, y)
    return run.save(run.out_dir / "checkpoints" / "last.pt")


def _spec(key: str, teacher_checkpoint=None):
    if key == "bgat":
        method = {
            "name": "bgat",
            "teacher_checkpoints": [str(teacher_checkpoint)] * 2,
            "regularizer": "trades",
            "alpha": 1.0,
        }
        return digits_spec(method, dataset={"train_limit": 128})
    threat = {"loss": "ce"} if key == "lbgat_ce_attack" else {}
    return digits_spec(
        METHOD_SPECS[key],
        dataset={"train_limit": 128},
        threat_model={"eps": 0.1, "step_size": 0.025, "steps": 3, **threat},
    )


def test_every_method_is_registered():
    assert list_methods() == [
        "alp",
        "bgat",
        "cat",
        "cons_at",
        "fat",
        "lbgat",
        "mart",
        "natural",
        "pgd_at",
        "raat",
        "raat_pp",
        "raat_sharp",
        "rebat",
        "trades",
    ]


@pytest.mark.parametrize("key", [*METHOD_SPECS, "bgat"])
def test_method_trains_a_few_steps(key, teacher_checkpoint, tmp_path):
    run = TrainingRun(_spec(key, teacher_checkpoint), out_dir=tmp_path)
    robust_before = copy.deepcopy(run.robust.state_dict())
    teacher_before = None if run.teacher is None else copy.deepcopy(run.teacher.state_dict())
    losses = []
    for _ in range(2):
        run.loader.set_epoch(len(losses))
        for x, y in run.loader:
            loss, counts = run.train_step(x, y)
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4]), f"loss did not go down: {losses}"
    changed = [not torch.equal(robust_before[k], v) for k, v in run.robust.state_dict().items()]
    assert all(changed[i] for i, k in enumerate(robust_before) if k.endswith("weight"))
    if key.startswith("lbgat"):
        assert run.teacher is not None
        assert any(not torch.equal(teacher_before[k], v) for k, v in run.teacher.state_dict().items())
        assert len(run.optimizer.param_groups) == 2  # one optimizer, two parameter groups (official)
    elif key == "bgat":
        for k, v in run.teacher.state_dict().items():
            torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
        assert len(run.optimizer.param_groups) == 1
        assert "teacher" in counts
    else:
        assert run.teacher is None


class _ModeRecorder(nn.Module):
    def __init__(self, inner: nn.Module, tag: str, log: list):
        super().__init__()
        self.inner, self.tag, self.log = inner, tag, log

    def forward(self, x):
        self.log.append((self.tag, self.training, torch.is_grad_enabled() and x.requires_grad))
        return self.inner(x)


@pytest.mark.parametrize(
    "key,attack_robust_training,teacher_training_in_attack",
    [("trades", False, None), ("pgd_at", False, None), ("lbgat", False, True), ("bgat", False, False)],
)
def test_modes_during_attack_and_loss(
    key, attack_robust_training, teacher_training_in_attack, teacher_checkpoint, tmp_path
):
    run = TrainingRun(_spec(key, teacher_checkpoint), out_dir=tmp_path)
    log: list = []
    teacher_modes: list = []
    run.robust_fn = run.attack_fn = _ModeRecorder(run.robust, "robust", log)
    run.robust = run.robust_fn  # the loop switches modes on run.robust; the wrapper forwards them
    if run.teacher is not None:
        run.teacher.register_forward_pre_hook(lambda m, args: teacher_modes.append(m.training))
        orig_generate = run.method.generate

        def generate(robust, x, y):
            teacher_modes.append(("during-attack", run.teacher.training))
            return orig_generate(robust, x, y)

        run.method.generate = generate
    x, y = next(iter(run.loader))
    run.train_step(x, y)
    steps = run.spec.threat_model.steps
    # attack: robust model in eval mode with input gradients; then training-mode forwards
    attack_calls = [entry for entry in log if entry[2]]
    assert len(attack_calls) == steps
    assert all(training == attack_robust_training for _, training, _ in attack_calls)
    loss_calls = log[len(log) - (2 if key in ("trades", "lbgat", "bgat") else 1) :]
    assert all(training for _, training, _ in loss_calls)
    if teacher_training_in_attack is not None:
        assert teacher_modes[0] == ("during-attack", teacher_training_in_attack)
        # the teacher runs only for the loss, never inside the attack
        assert len(teacher_modes) == 2


def _official_lbgat_step(model, teacher, optimizer, x, y, *, eps, step, steps, beta):
    """dvlab-research/LBGAT lbgat.py + train(), written out as the reference (CPU instead of .cuda())."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    out_adv = model(x_adv)
    out_natural = model(x)
    out = teacher(x)
    loss_mse = nn.MSELoss()(out_adv, out) + nn.CrossEntropyLoss()(out, y)
    loss_kl = (1.0 / out.size(0)) * criterion_kl(F.log_softmax(out_adv, dim=1), F.softmax(out_natural, dim=1))
    loss = loss_mse + beta * loss_kl
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("alpha", [0.0, 6.0])
def test_lbgat_step_equals_official_code(alpha, tmp_path):
    spec = digits_spec(
        {"name": "lbgat", "regularizer": "trades", "alpha": alpha},
        dataset={"train_limit": 64},
        optimization={
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 2e-4,
            "batch_size": 32,
            "epochs": 2,
            "schedule": {"kind": "constant"},
        },
    )
    run = TrainingRun(spec, out_dir=tmp_path)
    ref_model, ref_teacher = copy.deepcopy(run.robust), copy.deepcopy(run.teacher)
    ref_opt = torch.optim.SGD(
        [{"params": ref_model.parameters()}, {"params": ref_teacher.parameters()}],
        lr=0.1,
        momentum=0.9,
        weight_decay=2e-4,
    )
    run.loader.set_epoch(0)
    for i, (x, y) in enumerate(run.loader):
        torch.manual_seed(100 + i)
        ours, _ = run.train_step(x, y)
        torch.manual_seed(100 + i)
        ref = _official_lbgat_step(
            ref_model, ref_teacher, ref_opt, x, y, eps=0.1, step=0.025, steps=3, beta=alpha
        )
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    for (name, ours_p), ref_p in zip(run.robust.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(ours_p, ref_p, rtol=1e-4, atol=1e-5, msg=name)
    for ours_p, ref_p in zip(run.teacher.state_dict().values(), ref_teacher.state_dict().values()):
        torch.testing.assert_close(ours_p, ref_p, rtol=1e-4, atol=1e-5)


def test_attack_objective_defaults_and_override():
    spec = digits_spec({"name": "lbgat"})
    config = build_method(spec.method, spec.threat_model).attack_config()
    assert (config.loss, config.random_start) == ("kl", "normal")
    spec = digits_spec({"name": "lbgat"}, threat_model={"loss": "ce", "random_start": "uniform"})
    config = build_method(spec.method, spec.threat_model).attack_config()
    assert (config.loss, config.random_start) == ("ce", "uniform")
    spec = digits_spec({"name": "pgd_at"})
    assert build_method(spec.method, spec.threat_model).attack_config().loss == "ce"
    spec = digits_spec({"name": "natural"})
    assert build_method(spec.method, spec.threat_model).attack_config() is None
