"""Presets follow the official codes (issue 14): schedules, selection protocol, precision, provenance;
and the spec fields those presets use refuse what cannot be meant."""

from __future__ import annotations

import copy

import pytest

from api_schemas import SpecError, parse_spec
from api_schemas.presets import PRESETS, _build, _cat_presets, _raat_presets, get_preset

LBGAT_DATASETS = ("cifar10", "cifar100", "tiny-imagenet")
CAT_CIFAR = sorted(name for name, p in PRESETS.items() if p.source.startswith("CAT") and "mnist" not in name)


def _lr(spec, epoch: int) -> float:
    sched = spec.optimization.schedule
    return spec.optimization.lr * sched.gamma ** sum(1 for m in sched.milestones if epoch >= m)


@pytest.mark.parametrize("name", [f"trades-a{a}-{d}" for a in (1, 6) for d in ("cifar10", "cifar100")])
def test_lbgat_family_trades_presets_follow_train_trades_cifar10(name):
    """train_trades_cifar10.py: `for epoch in range(1, 77)`, lr x0.1 once `epoch >= 75` (1-based)."""
    spec = get_preset(name)
    assert spec.optimization.epochs == 76
    assert spec.optimization.schedule.milestones == [74]
    official = [0.1 * (0.1 if epoch >= 75 else 1.0) for epoch in range(1, 77)]
    assert [_lr(spec, e) for e in range(76)] == pytest.approx(official)
    assert spec.selection.metric is None and spec.selection.epoch is None  # the last epoch, as the code


def test_lbgat_presets_report_the_epoch_the_autoattack_script_loads():
    for dataset in LBGAT_DATASETS:
        for key in ("lbgat", "lbgat-alp", "lbgat-trades-a0"):
            spec = get_preset(f"{key}-{dataset}")
            assert spec.selection.epoch == 92 and spec.evaluation.on_best
        assert get_preset(f"lbgat-trades-a6-{dataset}").selection.epoch == 91
        lbgat = get_preset(f"lbgat-{dataset}").optimization
        assert lbgat.epochs == 100 and lbgat.schedule.milestones == [75, 90]


def test_cat_cifar_presets_follow_train_cifar10():
    for name in CAT_CIFAR:
        spec = get_preset(name)
        assert spec.selection.split == "test" and spec.selection.metric == "clean_plus_pgd", name
        assert spec.dataset.val_size == 0 and spec.runtime.precision == "fp32", name
    for name in (n for n in CAT_CIFAR if n.startswith("cat-c")):
        spec = get_preset(name)
        assert spec.model.robust.normalize == spec.dataset.name
        assert spec.dataset.padding_mode == "reflect"
        assert spec.threat_model.model_mode is None  # CAT's own default: training mode
        expected = {
            ("cifar10", "preact_resnet18"): (140, [100, 120]),
            ("cifar10", "wrn34_10"): (140, [100, 110]),  # the code; the paper says 100 and 120
            ("cifar100", "preact_resnet18"): (120, [100, 110]),
        }[(spec.dataset.name, spec.model.robust.name)]
        assert (spec.optimization.epochs, spec.optimization.schedule.milestones) == expected
    assert any("110" in note for note in PRESETS["cat-cent-b0.05-cifar10-wrn34"].deviations)


def test_cat_baselines_follow_their_own_code():
    at = get_preset("cat-baseline-at-cifar10-preact18")
    assert at.threat_model.model_mode == "train" and at.model.robust.normalize == "cifar10"
    assert at.dataset.padding_mode == "reflect" and at.optimization.schedule.per_step
    assert (at.optimization.epochs, at.optimization.schedule.milestones) == (200, [100, 150])
    at100 = get_preset("cat-baseline-at-cifar100-preact18")
    assert at100.model.robust.normalize == "cifar100" and at100.dataset.padding_mode == "zeros"
    assert any("RandomRotation" in note for note in PRESETS["cat-baseline-at-cifar100-preact18"].deviations)
    trades = get_preset("cat-baseline-trades-cifar10-wrn34")
    assert (trades.optimization.epochs, trades.optimization.schedule.milestones) == (80, [74])
    assert trades.model.robust.normalize == "none" and trades.dataset.padding_mode == "zeros"
    assert trades.threat_model.model_mode is None


def test_cat_mnist_presets_follow_train_mnist():
    for variant in ("cent", "cw"):
        for eps in (0.3, 0.4):
            spec = get_preset(f"cat-{variant}-eps{eps}-mnist")
            t = spec.threat_model
            assert (t.start_radius, t.clip, t.steps) == (0.1, False, 20)
            o = spec.optimization
            assert (o.batch_size, o.epochs, o.schedule.milestones) == (100, 40, [31])
            sel = spec.selection
            assert (sel.split, sel.metric, sel.attack.steps, sel.attack.eps) == (
                "test",
                "clean_plus_pgd",
                20,
                0.3,
            )
            assert sel.attack.random_start == "none" and sel.attack.step_size == 0.015


def test_raat_presets_select_on_the_test_set():
    spec = get_preset("raat-cifar10-resnet18-linf")
    assert spec.selection.split == "test" and spec.dataset.val_size == 0


#: the paper-table presets of the LBGAT, CAT and RAAT (Tables 1, 5) families
PAPER_PRESETS = sorted(set(_build()) - {"digits"} | set(_cat_presets()) | set(_raat_presets()))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_names_its_source_code_and_deviations(name):
    preset = PRESETS[name]
    assert preset.source
    assert isinstance(preset.code, str) and isinstance(preset.deviations, tuple)
    assert all(isinstance(note, str) and note.endswith(".") for note in preset.deviations)


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_train_in_fp32_and_say_so(name):
    preset = PRESETS[name]
    assert preset.spec().runtime.precision == "fp32"
    assert "fp32" in preset.description
    assert preset.code or preset.deviations  # without official code, the deviations say so


# ----------------------------------------------------------------------------- spec refusals


def _cat(**sections) -> dict:
    data = copy.deepcopy(PRESETS["cat-cent-b0.05-cifar10-preact18"].data)
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


@pytest.mark.parametrize(
    ("sections", "loc", "part"),
    [
        ({"dataset": {"val_size": 1000}}, "dataset.val_size", "selects on the test set"),
        ({"selection": {"metric": None}}, "selection.split", "name a metric"),
        ({"selection": {"split": "heldout"}}, "selection.metric", "held-out split"),
        (
            {"selection": {"metric": None, "split": "heldout", "epoch": 141}},
            "selection.epoch",
            "past the last",
        ),
        ({"selection": {"epoch": 10}}, "selection.epoch", "exclude each other"),
        (
            {"threat_model": {"norm": "l2", "eps": 0.5, "step_size": 0.1, "start_radius": 0.1}},
            "threat_model.start_radius",
            "l_inf",
        ),
        ({"runtime": {"precision": "fp16"}}, "runtime.precision", ""),
        (
            {"model": {"robust": {"name": "preact_resnet18", "normalize": "imagenet"}}},
            "model.robust.normalize",
            "",
        ),
    ],
)
def test_fidelity_fields_refuse_with_field_paths(sections, loc, part):
    with pytest.raises(SpecError) as info:
        parse_spec(_cat(**sections))
    errors = info.value.errors
    assert any(e["loc"] == loc and part in e["msg"] for e in errors), errors
