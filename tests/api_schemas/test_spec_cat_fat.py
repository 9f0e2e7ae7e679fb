"""Spec parts for CAT, FAT, Square and the l_2 threat model: validation with field paths, CAT presets."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from api_schemas import SpecError, parse_spec
from api_schemas.presets import PRESETS, get_preset


def _data(preset: str = "cat-cent-b0.05-cifar10-preact18") -> dict[str, Any]:
    return copy.deepcopy(PRESETS[preset].data)


def _errors(data: dict[str, Any]) -> list[dict[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value.errors


def test_cat_cifar10_preset_is_table_2():
    spec = get_preset("cat-cent-b0.05-cifar10-preact18")
    assert PRESETS["cat-cent-b0.05-cifar10-preact18"].source == "CAT Table 2"
    m = spec.method
    assert (m.name, m.variant, m.beta, m.beta1, m.mask_model) == (
        "cat",
        "cent",
        5.0,
        0.05,
        "cat_mask_resnet18",
    )
    assert spec.model.robust.name == "preact_resnet18"
    t = spec.threat_model
    assert (t.norm, t.eps, t.step_size, t.steps) == ("linf", 8 / 255, 2 / 255, 10)
    o = spec.optimization
    assert (o.optimizer, o.lr, o.momentum, o.weight_decay, o.epochs) == ("sgd", 0.1, 0.9, 5e-4, 140)
    assert o.schedule.milestones == [100, 120] and o.schedule.gamma == 0.1
    labels = [a.label() for a in spec.evaluation.attacks]
    assert labels == ["fgsm", "pgd20", "pgd100", "cw30", "square5000"]
    pgd20, pgd100, cw, square = spec.evaluation.attacks[1:]
    assert pgd20.random_start == pgd100.random_start == "none" and pgd20.step_size == 0.003
    assert (cw.loss, cw.kappa, cw.eps, cw.step_size, cw.steps) == ("cw", 50, 0.031, 0.003, 30)
    assert (square.n_queries, square.eps) == (5000, 8 / 255)
    # Train_CIFAR10.py: best clean + PGD-10 accuracy on the test set, every epoch; no held-out images
    assert spec.selection.metric == "clean_plus_pgd" and spec.selection.split == "test"
    assert spec.dataset.val_size == 0
    assert spec.selection.attack.steps == 10 and spec.selection.attack.step_size is None  # = 2/255


def test_cat_wrn_cw_and_cifar100_presets():
    spec = get_preset("cat-cw-b0.1-cifar10-wrn34")
    assert PRESETS["cat-cw-b0.1-cifar10-wrn34"].source == "CAT Table 3"
    assert spec.model.robust.name == "wrn34_10" and spec.method.variant == "cw" and spec.method.kappa == 50
    spec = get_preset("cat-cent-b0.1-cifar100-preact18")
    assert PRESETS["cat-cent-b0.1-cifar100-preact18"].source == "CAT Table 7"
    assert spec.dataset.name == "cifar100" and spec.optimization.epochs == 120
    assert spec.optimization.schedule.milestones == [100, 110]
    assert "cat-cent-b0.3-cifar100-preact18" not in PRESETS  # Table 7 has beta1 0.05 and 0.1 only
    spec = get_preset("cat-cw-eps0.4-mnist")
    assert (spec.method.beta, spec.method.beta1, spec.method.kappa) == (1.0, 0.3, 150.0)
    assert spec.method.mask_model == "cat_mask_mnist_cnn" and spec.optimization.optimizer == "adam"
    assert spec.threat_model.eps == 0.4 and spec.threat_model.step_size == pytest.approx(0.02)
    assert all(a.eps == 0.3 for a in spec.evaluation.attacks)  # tested at 0.3 (Sec. 5.1.1)


def test_fat_trades_preset_is_the_official_script():
    spec = get_preset("fat-trades-cifar10-wrn34")
    m = spec.method
    assert (m.name, m.variant, m.alpha, m.tau, m.tau_milestones) == ("fat", "trades", 6.0, 0, [30, 50, 70])
    assert spec.optimization.epochs == 85 and spec.optimization.schedule.milestones == [74]
    assert (spec.threat_model.eps, spec.threat_model.step_size) == (0.031, 0.007)


@pytest.mark.parametrize(
    ("mutate", "loc", "msg_part"),
    [
        (lambda d: d["method"].update(kappa=10.0), "method.kappa", "only CAT-cw"),
        (lambda d: d["method"].update(variant="pgd"), "method.variant", "'cent' or 'cw'"),
        (lambda d: d["method"].update(beta1=-1), "method.beta1", "greater than or equal to 0"),
        (lambda d: d["method"].update(mask_model="resnet18"), "method.mask_model", "cat_mask_mnist_cnn"),
        (lambda d: d["threat_model"].update(loss="kl"), "threat_model.loss", "method.variant"),
        (lambda d: d["threat_model"].update(kappa=5.0), "threat_model.kappa", "method.kappa"),
        (lambda d: d["selection"].update(metric="sum"), "selection.metric", "clean_plus_pgd"),
        (
            lambda d: d["evaluation"]["attacks"][4].update(n_queries=0),
            "evaluation.attacks[4].n_queries",
            "greater",
        ),
    ],
)
def test_cat_and_attack_errors_name_the_field(mutate, loc, msg_part):
    data = _data()
    mutate(data)
    errors = _errors(data)
    assert [e["loc"] for e in errors] == [loc], errors
    assert msg_part in errors[0]["msg"]


@pytest.mark.parametrize(
    ("method", "loc", "msg_part"),
    [
        ({"name": "fat", "variant": "ce", "alpha": 6.0}, "method.alpha", "'ce' variant"),
        ({"name": "fat", "tau": -1}, "method.tau", "greater than or equal to 0"),
        ({"name": "fat", "tau_milestones": [50, 30]}, "method.tau_milestones", "strictly increasing"),
        ({"name": "fat", "omega": -0.1}, "method.omega", "greater than or equal to 0"),
        ({"name": "fat", "variant": "mart"}, "method.variant", "'trades' or 'ce'"),
    ],
)
def test_fat_errors_name_the_field(method, loc, msg_part):
    data = _data("fat-trades-cifar10-preact18")
    data["method"] = method
    errors = _errors(data)
    assert [e["loc"] for e in errors] == [loc], errors
    assert msg_part in errors[0]["msg"]


def test_l2_threat_model_needs_l2_sizes():
    data = _data()
    data["threat_model"] = {"norm": "l2", "steps": 10}
    assert [e["loc"] for e in _errors(data)] == ["threat_model.eps"]
    data["threat_model"] = {"norm": "l2", "eps": 128 / 255, "steps": 10}
    assert [e["loc"] for e in _errors(data)] == ["threat_model.step_size"]
    data["threat_model"] = {"norm": "l2", "eps": 128 / 255, "step_size": 32 / 255, "steps": 10}
    # the CAT suite's PGD/CW steps are explicit l_inf steps with their own eps; the default-step PGD is refused
    data["evaluation"]["attacks"] = [{"kind": "fgsm"}, {"kind": "pgd", "steps": 20}]
    errors = _errors(data)
    assert [e["loc"] for e in errors] == ["evaluation.attacks[1].step_size"]
    assert "l_inf step" in errors[0]["msg"]
    data["evaluation"]["attacks"][1]["step_size"] = None  # the threat model's step
    spec = parse_spec(data)
    assert spec.threat_model.norm == "l2" and spec.selection.attack.step_size is None
    data["evaluation"]["attacks"][1]["step_size"] = 0.1
    assert parse_spec(data).evaluation.attacks[1].step_size == 0.1
    # the default evaluation suite (LBGAT's PGD-20 step 0.003) is refused under l_2 too
    del data["evaluation"]
    assert [e["loc"] for e in _errors(data)] == ["evaluation.attacks[1].step_size"]


def test_square_spec_defaults_and_label():
    data = _data()
    data["evaluation"]["attacks"] = [
        {"kind": "square"},
        {"kind": "square", "n_queries": 100, "norm": "l2", "eps": 0.5},
    ]
    first, second = parse_spec(data).evaluation.attacks
    assert (first.n_queries, first.p_init, first.n_restarts, first.label()) == (5000, 0.8, 1, "square5000")
    assert (second.norm, second.label()) == ("l2", "square100")
