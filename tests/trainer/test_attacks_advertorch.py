"""advertorch's l_2 PGD (the RAAT / Cons-AT code's attack): start and step order against a transcription."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from api_schemas import PGDATMethod, PGDAttackSpec, ThreatModel
from tests.trainer.helpers import digits_batch, trained_digits_model
from trainer import attacks
from trainer.evaluation import _pgd_kwargs
from trainer.methods import build_method


def _advertorch_pgd_l2(predict, x, y, *, eps, eps_iter, nb_iter):
    """Transcription of advertorch 0.2.x `PGDAttack(predict, loss_fn=nn.CrossEntropyLoss(), eps,
    nb_iter, eps_iter, rand_init=True, clip_min=0., clip_max=1., ord=2).perturb(x, y)` as the RAAT code
    builds it (adv_lib/attack.py), with `delta.data.uniform_(clip_min, clip_max)` drawn by our RNG call."""

    def get_norm_batch(t):  # utils._get_norm_batch(x, 2)
        return t.abs().pow(2).view(t.size(0), -1).sum(dim=1).pow(1.0 / 2)

    def batch_multiply(factor, t):
        return (t.transpose(0, -1) * factor).transpose(0, -1)

    def clamp_by_pnorm(t, r):
        norm = get_norm_batch(t)
        factor = torch.min(r / norm, torch.ones_like(norm))
        return batch_multiply(factor, t)

    def normalize_by_pnorm(t, small_constant=1e-6):
        norm = get_norm_batch(t)
        norm = torch.max(norm, torch.ones_like(norm) * small_constant)
        return batch_multiply(1.0 / norm, t)

    # PGDAttack.perturb -> rand_init_delta(delta, x, 2, eps, 0, 1)
    delta = torch.zeros_like(x)
    delta.data = torch.rand(x.shape)  # delta.data.uniform_(clip_min, clip_max)
    delta.data = delta.data - x
    delta.data = clamp_by_pnorm(delta.data, eps)
    delta.data = torch.clamp(x + delta.data, min=0.0, max=1.0) - x
    delta.data = torch.clamp(x + delta.data, min=0.0, max=1.0) - x  # perturb() clamps once more
    # perturb_iterative(ord=2)
    delta = nn.Parameter(delta)
    for _ in range(nb_iter):
        outputs = predict(x + delta)
        loss = nn.CrossEntropyLoss()(outputs, y)
        loss.backward()
        grad = normalize_by_pnorm(delta.grad.data)
        delta.data = delta.data + batch_multiply(eps_iter, grad)
        delta.data = torch.clamp(x.data + delta.data, 0.0, 1.0) - x.data
        delta.data = clamp_by_pnorm(delta.data, eps)
        delta.grad.data.zero_()
    return torch.clamp(x + delta, 0.0, 1.0).detach()


@pytest.mark.parametrize(("eps", "step"), [(0.5, 0.125), (2.0, 0.5)])  # the ball binds / the box binds too
def test_advertorch_l2_pgd_equals_the_transcription(eps, step):
    model = trained_digits_model(steps=60).eval()
    x, y = digits_batch(48)
    torch.manual_seed(3)
    ours = attacks.pgd(
        model,
        x,
        y,
        eps=eps,
        step_size=step,
        steps=7,
        norm="l2",
        random_start="uniform",
        l2_variant="advertorch",
    )
    torch.manual_seed(3)
    theirs = _advertorch_pgd_l2(model, x, y, eps=eps, eps_iter=step, nb_iter=7)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
    assert (ours - x).flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert ours.min() >= 0 and ours.max() <= 1
    torch.manual_seed(3)
    default = attacks.pgd(model, x, y, eps=eps, step_size=step, steps=7, norm="l2", random_start="uniform")
    assert not torch.allclose(default, theirs, atol=1e-3)  # the default order is not advertorch's


def test_start_is_a_uniform_box_point_pulled_into_the_ball():
    x = torch.full((64, 1, 8, 8), 0.5)
    torch.manual_seed(0)
    start = attacks.pgd(
        nn.Flatten(), x, torch.zeros(64, dtype=torch.long), eps=0.4, step_size=0.1, steps=0,
        norm="l2", random_start="uniform", l2_variant="advertorch",
    )  # fmt: skip
    torch.manual_seed(0)
    u = torch.rand(x.shape)
    direction = (u - x) / (u - x).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    # every box point of 64 pixels lies far outside a 0.4-ball: the start sits on its surface, towards u
    torch.testing.assert_close(start, x + 0.4 * direction)


class _Sum(nn.Module):
    """Class 1's logit is w * (x_1 + x_2), class 0's its negative: CE of label 0 rises along (1, 1)."""

    def forward(self, x):
        z = 5 * x.flatten(1).sum(1, keepdim=True)
        return torch.cat([-z, z], dim=1)


def test_one_step_clips_to_the_box_then_projects_onto_the_ball():
    """x = (0.9, 0.1), a step of length 1 along (1, 1)/sqrt(2), eps 0.5:
    advertorch: box first -> delta (0.1, 0.807), then the ball -> x' = (0.970, 0.595);
    the default: ball first -> delta (0.354, 0.354), then the box -> x' = (1.0, 0.454)."""
    x = torch.tensor([[0.9, 0.1]])
    y = torch.zeros(1, dtype=torch.long)
    common = {"eps": 0.5, "step_size": 1.0, "steps": 1, "norm": "l2", "random_start": "none"}
    advertorch = attacks.pgd(_Sum(), x, y, **common, l2_variant="advertorch")
    box = torch.tensor([1.0 - 0.9, 1 / 2**0.5])  # delta after the box clip
    expected = x + box * (0.5 / box.norm())
    torch.testing.assert_close(advertorch, expected)
    default = attacks.pgd(_Sum(), x, y, **common)
    torch.testing.assert_close(default, torch.tensor([[1.0, 0.1 + 0.5 / 2**0.5]]))


def test_the_variant_reaches_the_training_attack_and_the_evaluation_attacks():
    threat = ThreatModel(norm="l2", eps=128 / 255, step_size=32 / 255, l2_variant="advertorch")
    assert build_method(PGDATMethod(), threat).attack_config().l2_variant == "advertorch"
    assert _pgd_kwargs(PGDAttackSpec(step_size=None, steps=10), threat)["l2_variant"] == "advertorch"
    own = PGDAttackSpec(step_size=None, steps=10, l2_variant="default")
    assert _pgd_kwargs(own, threat)["l2_variant"] == "default"
    plain = ThreatModel(norm="l2", eps=0.5, step_size=0.1)
    assert _pgd_kwargs(PGDAttackSpec(step_size=None), plain)["l2_variant"] == "default"


def test_l_inf_is_the_same_in_both_variants():
    model = trained_digits_model(steps=60).eval()
    x, y = digits_batch(16)
    runs = []
    for variant in ("default", "advertorch"):
        torch.manual_seed(1)
        runs.append(
            attacks.pgd(
                model, x, y, eps=0.1, step_size=0.025, steps=5, random_start="uniform", l2_variant=variant
            )
        )
    assert torch.equal(*runs)


def test_advertorch_variant_refuses_options_it_does_not_have():
    x, y = torch.rand(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="l2_variant"):
        attacks.pgd(
            nn.Flatten(), x, y, eps=1, step_size=0.1, steps=1, norm="l2", clip=False, l2_variant="advertorch"
        )
    with pytest.raises(ValueError, match="l2_variant"):
        attacks.pgd(nn.Flatten(), x, y, eps=1, step_size=0.1, steps=1, norm="l2", l2_variant="foolbox")
