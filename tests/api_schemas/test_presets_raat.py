"""RAAT paper presets (Tables 1 and 5) and the specs of MART, Cons-AT, RAAT, RAAT++ and weight
averaging: settings, and refusals with field paths. Torch-free."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from api_schemas import SpecError, parse_spec
from api_schemas.presets import PRESETS, get_preset

METHODS = ("pgd-at", "trades", "mart", "cons-at", "raat", "raat-pp")
DATASETS = ("cifar10", "cifar100", "tiny-imagenet")
TABLE_1 = [f"{m}-{d}-{a}-linf" for m in METHODS for d in DATASETS for a in ("resnet18", "wrn28-10")]
TABLE_5 = [f"{m}-{d}-resnet18-l2" for m in METHODS for d in DATASETS]
# ReBAT and RAAT# on ReBAT's code (tests/api_schemas/test_presets_table3.py)
TABLE_3 = [f"{m}-{d}-preact18" for m in ("rebat", "raat-sharp") for d in ("cifar10", "cifar100")]


def test_raat_presets_are_tables_1_and_5():
    raat = {name for name, preset in PRESETS.items() if preset.source.startswith("RAAT")}
    assert raat == {*TABLE_1, *TABLE_5, *TABLE_3}
    assert (
        PRESETS["raat-cifar10-resnet18-linf"].source
        == "RAAT (Robust Alignment, 2026) Table 1 (linf, ResNet-18)"
    )
    assert PRESETS["raat-pp-cifar100-wrn28-10-linf"].source.endswith("Table 1 (linf, WideResNet-28-10)")
    assert PRESETS["mart-tiny-imagenet-resnet18-l2"].source.endswith("Table 5 (l2, ResNet-18)")


@pytest.mark.parametrize("name", sorted({*TABLE_1, *TABLE_5}))
def test_raat_preset_settings(name: str):
    spec = get_preset(name)
    opt = spec.optimization
    assert (opt.lr, opt.momentum, opt.weight_decay, opt.batch_size, opt.epochs) == (0.1, 0.9, 5e-4, 128, 110)
    assert (opt.schedule.kind, opt.schedule.milestones, opt.schedule.gamma) == ("piecewise", [100, 105], 0.1)
    assert opt.weight_averaging is None and spec.evaluated_weights() == "model"
    threat = spec.threat_model
    if name.endswith("-linf"):
        assert (threat.norm, threat.eps, threat.step_size, threat.steps) == ("linf", 8 / 255, 2 / 255, 10)
    else:
        assert (threat.norm, threat.eps, threat.step_size, threat.steps) == ("l2", 128 / 255, 32 / 255, 10)
    # FlaAI/RAAT models/: its ResNet-18 is the Bottleneck network; Tiny-ImageNet gets the stride-2 stem
    arch = "wrn28_10" if "-wrn28-10-" in name else "resnet18_bottleneck"
    if "-tiny-imagenet-" in name:
        arch += "_stem2"
    assert spec.model.robust.name == arch
    # l_2: advertorch's PGD (clip to the box, then the ball) where the RAAT code attacks with it
    pgds = [attack for attack in spec.evaluation.attacks if attack.kind == "pgd"] + [spec.selection.attack]
    if name.endswith("-l2"):
        advertorch_training = name.startswith(("pgd-at-", "cons-at-", "raat-cifar", "raat-tiny"))
        assert spec.threat_model.l2_variant == ("advertorch" if advertorch_training else "default")
        assert {attack.l2_variant for attack in pgds} == {"advertorch"}
    else:
        assert spec.threat_model.l2_variant == "default"
        assert {attack.l2_variant for attack in pgds} == {None}
    assert spec.model.teacher is None
    assert spec.dataset.augment and spec.dataset.flip and spec.dataset.crop_padding == 4
    assert spec.dataset.resize_to is None  # Tiny-ImageNet at 64x64, as the RAAT code
    labels = [attack.label() for attack in spec.evaluation.attacks]
    assert labels == ["pgd10", "pgd100", "cw30", "autoattack"]
    assert spec.selection.metric == "pgd_acc" and spec.selection.attack.steps == 10
    # the paper's protocol (FlaAI/RAAT train.py): best PGD-10 checkpoint on the test set, fp32
    assert spec.selection.split == "test" and spec.dataset.val_size == 0
    assert spec.runtime.precision == "fp32"


def test_raat_preset_methods_and_hyper_parameters():
    method = lambda name: get_preset(f"{name}-cifar10-resnet18-linf").method.model_dump()  # noqa: E731
    assert method("pgd-at") == {"name": "pgd_at"}
    assert method("trades") == {"name": "trades", "alpha": 6.0}
    assert method("mart") == {"name": "mart", "alpha": 6.0}
    assert method("cons-at") == {"name": "cons_at", "lam": 1.0, "temperature": 0.5}
    raat = method("raat")
    assert raat == {
        "name": "raat",
        "lam": 1.0,
        "eta": 0.1,
        "gamma": 0.75,
        "temperature": 0.5,
        "dicar_target": "logits",
    }
    assert method("raat-pp") == {**raat, "name": "raat_pp", "alpha": 6.0}


# --------------------------------------------------------------------------- refusals with field paths


def _data(method: dict[str, Any] | None = None) -> dict[str, Any]:
    data = copy.deepcopy(PRESETS["raat-cifar10-resnet18-linf"].data)
    if method is not None:
        data["method"] = method
    return data


def _locs(data: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return [e["loc"] for e in info.value.errors]


@pytest.mark.parametrize(
    "method,loc",
    [
        ({"name": "raat", "eta": 1.0}, "method.eta"),
        ({"name": "raat", "eta": 0.0}, "method.eta"),
        ({"name": "raat", "gamma": 0.0}, "method.gamma"),
        ({"name": "raat", "lam": -1.0}, "method.lam"),
        ({"name": "raat", "temperature": 0.0}, "method.temperature"),
        ({"name": "raat", "dicar_target": "labels"}, "method.dicar_target"),
        ({"name": "raat", "alpha": 6.0}, "method.alpha"),  # RAAT has no MART KL term
        ({"name": "raat_pp", "alpha": -1.0}, "method.alpha"),
        ({"name": "mart", "alpha": -6.0}, "method.alpha"),
        ({"name": "mart", "lam": 1.0}, "method.lam"),
        ({"name": "cons_at", "eta": 0.1}, "method.eta"),
        ({"name": "cons_at", "temperature": -0.5}, "method.temperature"),
    ],
)
def test_method_hyper_parameters_are_validated_with_field_paths(method, loc):
    assert _locs(_data(method)) == [loc]


@pytest.mark.parametrize("name", ["cons_at", "raat", "raat_pp"])
def test_two_view_methods_need_augmentation(name):
    data = _data({"name": name})
    data["dataset"]["augment"] = False
    assert _locs(data) == ["dataset.augment"]


def test_methods_without_teacher_refuse_one():
    data = _data()
    data["model"]["teacher"] = {"name": "resnet18"}
    assert _locs(data) == ["model.teacher"]


def test_weight_averaging_options():
    data = _data()
    data["optimization"]["weight_averaging"] = {"decay": 0.999, "start_epoch": 105}
    spec = parse_spec(data)
    assert spec.optimization.weight_averaging.buffers == "average"
    assert spec.evaluated_weights() == "averaged" and spec.selected_weights() == "averaged"
    data["evaluation"]["weights"] = "model"
    assert parse_spec(data).evaluated_weights() == "model"
    data["optimization"]["weight_averaging"] = {"decay": 0.0}
    assert _locs(data) == ["optimization.weight_averaging.decay"]
    data["optimization"]["weight_averaging"] = {"decay": 0.99, "momentum": 0.9}
    assert _locs(data) == ["optimization.weight_averaging.momentum"]
    data["optimization"]["weight_averaging"] = None
    data["selection"]["weights"] = "averaged"
    assert _locs(data) == ["selection.weights"]
