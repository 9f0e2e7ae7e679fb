"""RAAT paper Table 3 presets (ReBAT and RAAT# on ReBAT's code) and the ReBAT / RAAT# method specs. Torch-free."""

from __future__ import annotations

import copy

import pytest

from api_schemas import SpecError, parse_spec
from api_schemas.presets import PRESETS, get_preset

TABLE_3 = [
    f"{key}-{dataset}-preact18" for key in ("rebat", "raat-sharp") for dataset in ("cifar10", "cifar100")
]


def test_table_3_presets_exist_with_their_provenance():
    rows = {
        name
        for name, preset in PRESETS.items()
        if preset.source.startswith("RAAT (Robust Alignment, 2026) Table 3")
    }
    assert rows == set(TABLE_3)
    assert PRESETS["rebat-cifar10-preact18"].code.startswith("PKU-ML/ReBAT: train_cifar_wa.py")
    assert PRESETS["raat-sharp-cifar100-preact18"].code.startswith(
        "FlaAI/RAAT: RAAT#_Code_(Sec_5.3)/train_cifar.py"
    )
    assert all(PRESETS[name].deviations for name in TABLE_3)


@pytest.mark.parametrize("name", TABLE_3)
def test_table_3_settings_are_rebats_script(name):
    spec = get_preset(name)
    assert spec.model.robust.name == "preact_resnet18"
    assert spec.model.robust.normalize == "cifar10"  # utils.py's mu/std, for CIFAR-100 too
    ds = spec.dataset
    assert (ds.augment, ds.crop_padding, ds.padding_mode, ds.flip) == (True, 4, "reflect", True)
    threat = spec.threat_model
    assert (threat.norm, threat.eps, threat.step_size, threat.steps) == ("linf", 8 / 255, 2 / 255, 10)
    opt = spec.optimization
    assert (opt.optimizer, opt.lr, opt.momentum, opt.weight_decay, opt.batch_size, opt.epochs) == (
        "sgd",
        0.1,
        0.9,
        5e-4,
        128,
        200,
    )
    sched = opt.schedule
    assert (sched.kind, sched.milestones, sched.per_step) == ("piecewise", [100, 150], True)
    assert sched.gamma == pytest.approx(1 / 1.5)  # --lr-factor 1.5
    wa = opt.weight_averaging
    assert (wa.decay, wa.start_epoch, wa.buffers) == (0.999, 105, "average")  # --decay-rate, --warmup-epochs
    assert spec.evaluated_weights() == "averaged" and spec.selected_weights() == "averaged"
    assert spec.selection.metric == "pgd_acc" and spec.selection.attack.steps == 10
    assert spec.selection.attack.step_size == 2 / 255
    labels = [attack.label() for attack in spec.evaluation.attacks]
    assert labels == ["pgd10", "pgd20", "autoattack"]
    assert spec.runtime.precision == "fp32"
    assert spec.method.beta == 1.0  # --beta 1.0
    if name.startswith("rebat"):
        assert spec.method.name == "rebat"
        assert (spec.selection.split, spec.dataset.val_size) == ("heldout", 1000)  # --val
    else:
        assert spec.method.name == "raat_sharp"
        assert (spec.method.eta, spec.method.gamma, spec.method.temperature) == (0.1, 0.75, 0.5)
        assert spec.method.boat_beta == 0.0  # commented out in the released script
        assert (spec.selection.split, spec.dataset.val_size) == ("test", 0)  # train.sh has no --val


def _data(name: str = "rebat-cifar10-preact18"):
    return copy.deepcopy(PRESETS[name].data)


def _locs(data) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return [e["loc"] for e in info.value.errors]


@pytest.mark.parametrize("method", ["rebat", "raat_sharp"])
def test_averaging_methods_need_weight_averaging(method):
    data = _data("raat-sharp-cifar10-preact18")
    data["method"] = {"name": method}
    data["optimization"]["weight_averaging"] = None
    data["evaluation"].pop("weights")
    data["selection"].pop("weights")
    assert _locs(data) == ["optimization.weight_averaging"]


@pytest.mark.parametrize(
    ("method", "loc"),
    [
        ({"name": "rebat", "beta": -1.0}, "method.beta"),
        ({"name": "rebat", "averaged_mode": "train"}, "method.averaged_mode"),
        ({"name": "rebat", "eta": 0.1}, "method.eta"),
        ({"name": "raat_sharp", "eta": 1.0}, "method.eta"),
        ({"name": "raat_sharp", "boat_beta": -0.5}, "method.boat_beta"),
        ({"name": "raat_sharp", "lam": 1.0}, "method.lam"),
    ],
)
def test_method_fields_are_validated_with_paths(method, loc):
    data = _data("raat-sharp-cifar10-preact18")
    data["method"] = method
    assert _locs(data) == [loc]


def test_raat_sharp_needs_two_augmentations():
    data = _data("raat-sharp-cifar10-preact18")
    data["dataset"]["augment"] = False
    assert _locs(data) == ["dataset.augment"]


def test_per_step_schedule_flag():
    data = _data()
    data["optimization"]["schedule"]["per_step"] = "sometimes"
    assert _locs(data) == ["optimization.schedule.per_step"]
