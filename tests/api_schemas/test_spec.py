"""ExperimentSpec, presets, spec files, overrides and result records. Torch-free (checked at the end)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from api_schemas import ExperimentSpec, SpecError, apply_overrides, load_spec, parse_spec, read_spec_file
from api_schemas.presets import PRESETS, get_preset, list_presets
from api_schemas.results import AttackResult, EvalReport, nrr

PAPER_METHODS = (
    "lbgat",
    "lbgat-trades-a0",
    "lbgat-trades-a6",
    "lbgat-alp",
    "bgat",
    "trades-a1",
    "trades-a6",
    "alp",
    "vanilla-at",
    "natural",
)
PAPER_DATASETS = ("cifar10", "cifar100", "tiny-imagenet")
PAPER_PRESETS = [f"{m}-{d}" for m in PAPER_METHODS for d in PAPER_DATASETS]
# Calibrated AT: Tables 2 (CIFAR-10, PreAct ResNet-18), 3 (WRN-34-10), 7 (CIFAR-100), 1 (MNIST)
CAT_PRESETS = [
    *(
        f"cat-{v}-b{b}-cifar10-{a}"
        for v in ("cent", "cw")
        for b in (0.05, 0.1, 0.3)
        for a in ("preact18", "wrn34")
    ),
    *(f"cat-{v}-b{b}-cifar100-preact18" for v in ("cent", "cw") for b in (0.05, 0.1)),
    *(f"cat-baseline-{m}-cifar10-{a}" for m in ("at", "trades") for a in ("preact18", "wrn34")),
    "cat-baseline-at-cifar100-preact18",
    "fat-trades-cifar10-preact18",
    "fat-trades-cifar10-wrn34",
    *(f"cat-{v}-eps{e}-mnist" for v in ("cent", "cw") for e in (0.3, 0.4)),
]


def _data(preset: str = "lbgat-cifar10") -> dict[str, Any]:
    """A fresh, mutable copy of a preset's spec dict."""
    return copy.deepcopy(PRESETS[preset].data)


def _errors(data: dict[str, Any]) -> list[dict[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value.errors


def _locs(data: dict[str, Any]) -> list[str]:
    return [e["loc"] for e in _errors(data)]


# ----------------------------------------------------------------------------- presets


def test_preset_names_are_the_paper_grid_plus_digits():
    lbgat = {name for name, preset in PRESETS.items() if preset.source.startswith("LBGAT")}
    # BGAT's WideResNet + InceptionResNetV2 teacher ensemble and its second teacher
    ensemble = {
        f"{key}-{dataset}"
        for key in ("natural-irv2", "bgat-ensemble", "bgat-ensemble-alp", "bgat-ensemble-trades")
        for dataset in ("cifar10", "cifar100")
    }
    assert lbgat | {"digits"} == {*PAPER_PRESETS, *ensemble, "digits"}
    assert len(lbgat) == 30 + 8
    assert set(CAT_PRESETS) <= set(PRESETS) and len(CAT_PRESETS) == 27
    assert [p.name for p in list_presets()] == sorted(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(name: str):
    preset = PRESETS[name]
    spec = preset.spec()
    assert isinstance(spec, ExperimentSpec)
    assert spec.name == name
    assert preset.source
    assert preset.description == preset.data["description"]
    assert spec == get_preset(name)

    dumped = spec.model_dump(mode="json")
    again = parse_spec(dumped)
    assert again == spec
    assert again.model_dump(mode="json") == dumped
    # through a JSON string as well (what the API and the checkpoints carry)
    assert parse_spec(json.loads(spec.model_dump_json())) == spec


def test_lbgat_trades_a0_cifar100_paper_settings():
    spec = get_preset("lbgat-trades-a0-cifar100")
    assert spec.method.name == "lbgat"
    assert spec.method.regularizer == "trades"
    assert spec.method.alpha == 0.0
    assert spec.method.beta == 1.0
    assert spec.method.robust_ce is False
    assert spec.model.robust.name == "wrn34_10"
    assert spec.model.teacher is not None
    assert spec.model.teacher.name == "lbgat_teacher_resnet18"
    assert spec.dataset.name == "cifar100"
    assert spec.dataset.resize_to is None
    assert spec.dataset.augment is True
    assert spec.dataset.crop_padding == 4
    tm = spec.threat_model
    assert (tm.norm, tm.eps, tm.step_size, tm.steps) == ("linf", 0.031, 0.007, 10)
    opt = spec.optimization
    assert opt.optimizer == "sgd"
    assert opt.lr == 0.1
    assert opt.momentum == 0.9
    assert opt.weight_decay == 2e-4
    assert opt.batch_size == 128
    assert opt.epochs == 100
    assert opt.schedule.kind == "piecewise"
    assert opt.schedule.milestones == [75, 90]
    assert opt.schedule.gamma == 0.1
    assert opt.schedule.first_epoch_lr == 0.02
    assert [a.label() for a in spec.evaluation.attacks] == ["fgsm", "pgd20", "cw20", "autoattack"]
    pgd, cw = spec.evaluation.attacks[1], spec.evaluation.attacks[2]
    assert (pgd.step_size, pgd.steps, pgd.loss) == (0.003, 20, "ce")
    assert (cw.step_size, cw.steps, cw.loss) == (0.003, 20, "cw")
    assert spec.output_dir() == Path("runs/lbgat-trades-a0-cifar100")


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_tiny_imagenet_presets_resize_to_32(method: str):
    spec = get_preset(f"{method}-tiny-imagenet")
    assert spec.dataset.name == "tiny_imagenet"
    assert spec.dataset.resize_to == 32
    for dataset in ("cifar10", "cifar100"):
        assert get_preset(f"{method}-{dataset}").dataset.resize_to is None


@pytest.mark.parametrize("dataset", PAPER_DATASETS)
def test_method_specific_preset_settings(dataset: str):
    assert get_preset(f"trades-a6-{dataset}").method.model_dump() == {"name": "trades", "alpha": 6.0}
    assert get_preset(f"trades-a1-{dataset}").method.alpha == 1.0
    assert get_preset(f"alp-{dataset}").method.model_dump() == {"name": "alp", "alpha": 1.0}
    assert get_preset(f"vanilla-at-{dataset}").method.name == "pgd_at"
    assert get_preset(f"natural-{dataset}").method.name == "natural"

    a6 = get_preset(f"lbgat-trades-a6-{dataset}").method
    assert (a6.name, a6.regularizer, a6.alpha) == ("lbgat", "trades", 6.0)
    lalp = get_preset(f"lbgat-alp-{dataset}").method
    assert (lalp.name, lalp.regularizer, lalp.alpha) == ("lbgat", "alp", 1.0)
    plain = get_preset(f"lbgat-{dataset}").method
    assert (plain.name, plain.regularizer, plain.alpha) == ("lbgat", "none", 0.0)

    bgat = get_preset(f"bgat-{dataset}")
    assert bgat.method.teacher_checkpoints == [f"runs/natural-{dataset}/checkpoints/last.pt"]
    assert bgat.model.teacher is None

    for method in PAPER_METHODS:
        spec = get_preset(f"{method}-{dataset}")
        if spec.method.name == "lbgat":
            assert spec.model.teacher.name == "lbgat_teacher_resnet18"
            assert spec.optimization.schedule.first_epoch_lr == 0.02
        else:
            assert spec.model.teacher is None
            assert spec.optimization.schedule.first_epoch_lr is None


def test_digits_preset_is_a_small_cpu_run():
    spec = get_preset("digits")
    assert spec.method.name == "lbgat"
    assert (spec.method.regularizer, spec.method.alpha) == ("trades", 0.0)
    assert spec.model.robust.kwargs() == {"width": 32}
    assert spec.model.teacher.kwargs() == {"width": 16}
    assert spec.dataset.name == "digits"
    assert spec.dataset.val_size == 150
    assert spec.selection.metric == "pgd_acc"
    assert spec.threat_model.eps == 0.1
    assert spec.optimization.epochs == 30
    assert spec.optimization.schedule.milestones == [22, 27]
    assert [a.label() for a in spec.evaluation.attacks] == ["fgsm", "pgd20", "cw20", "autoattack_custom"]


def test_get_preset_unknown_name_lists_available():
    with pytest.raises(SpecError) as info:
        get_preset("lbgat-mnist")
    (err,) = info.value.errors
    assert err["loc"] == "preset"
    assert "'lbgat-mnist'" in err["msg"]
    assert "lbgat-trades-a0-cifar10" in err["msg"]
    assert "digits" in err["msg"]


def test_get_preset_overrides_leave_the_preset_untouched():
    before = copy.deepcopy(PRESETS["digits"].data)
    spec = get_preset("digits", ["optimization.epochs=5", "optimization.schedule.milestones=[3]"])
    assert spec.optimization.epochs == 5
    assert spec.optimization.schedule.milestones == [3]
    assert PRESETS["digits"].data == before
    assert get_preset("digits").optimization.epochs == 30


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("mutate", "loc"),
    [
        (lambda d: d["method"].update(foo=1), "method.foo"),
        (lambda d: d["optimization"]["schedule"].update(bogus=1), "optimization.schedule.bogus"),
        (lambda d: d.update(epochs=10), "epochs"),
        (lambda d: d["model"]["robust"].update(widen=10), "model.robust.widen"),
        (lambda d: d["evaluation"]["attacks"][1].update(stpes=5), "evaluation.attacks[1].stpes"),
    ],
    ids=["method", "schedule", "top-level", "model-ref", "attack"],
)
def test_unknown_fields_are_refused_with_their_path(mutate, loc: str):
    data = _data()
    mutate(data)
    errors = _errors(data)
    assert errors == [{"loc": loc, "msg": "Extra inputs are not permitted"}]


def _with_method(method: dict[str, Any]) -> dict[str, Any]:
    data = _data("lbgat-cifar10")
    data["method"] = method
    if method["name"] != "lbgat":
        del data["model"]["teacher"]
    return data


@pytest.mark.parametrize(
    "method",
    [
        {"name": "natural"},
        {"name": "pgd_at"},
        {"name": "trades"},
        {"name": "alp"},
        {"name": "bgat", "teacher_checkpoints": ["t.pt"]},
        {"name": "lbgat"},
    ],
    ids=lambda m: m["name"],
)
def test_method_union_tag_is_left_out_of_paths(method: dict[str, Any]):
    assert parse_spec(_with_method(method)).method.name == method["name"]
    assert _locs(_with_method({**method, "typo": 1})) == ["method.typo"]


@pytest.mark.parametrize(
    "attack",
    [
        {"kind": "fgsm"},
        {"kind": "pgd"},
        {"kind": "autoattack"},
        {"kind": "transfer", "source_checkpoint": "src.pt"},
    ],
    ids=lambda a: a["kind"],
)
def test_attack_union_tag_is_left_out_of_paths(attack: dict[str, Any]):
    data = _data()
    data["evaluation"]["attacks"] = [{"kind": "fgsm", "name": "first"}, attack]
    assert parse_spec(data).evaluation.attacks[1].kind == attack["kind"]
    data["evaluation"]["attacks"][1] = {**attack, "typo": 1}
    assert _locs(data) == ["evaluation.attacks[1].typo"]


def _no_teacher_trades(d: dict[str, Any]) -> None:
    d["method"] = {"name": "trades", "alpha": 6}
    d["model"]["teacher"] = {"name": "resnet18"}


@pytest.mark.parametrize(
    ("mutate", "loc", "msg_part"),
    [
        (lambda d: d["optimization"].update(lr=-0.1), "optimization.lr", "greater than 0"),
        (
            lambda d: d["evaluation"]["attacks"][1].update(steps=0),
            "evaluation.attacks[1].steps",
            "greater than or equal to 1",
        ),
        (
            lambda d: d["evaluation"].update(attacks=[{"kind": "pgd", "steps": 0}]),
            "evaluation.attacks[0].steps",
            "greater than or equal to 1",
        ),
        (
            lambda d: d["optimization"]["schedule"].update(milestones=[75, 100]),
            "optimization.schedule.milestones",
            "below epochs=100",
        ),
        (
            lambda d: d["optimization"].update(epochs=90),
            "optimization.schedule.milestones",
            "below epochs=90",
        ),
        (
            lambda d: d["optimization"]["schedule"].update(milestones=[90, 75]),
            "optimization.schedule.milestones",
            "strictly increasing",
        ),
        (
            lambda d: d["optimization"]["schedule"].update(milestones=[75, 75]),
            "optimization.schedule.milestones",
            "strictly increasing",
        ),
        (lambda d: d["model"].pop("teacher"), "model.teacher", "lbgat trains a teacher"),
        (_no_teacher_trades, "model.teacher", "method 'trades' uses no teacher"),
        (lambda d: d["method"].update(alpha=1.0), "method.alpha", "set regularizer to 'alp' or 'trades'"),
        (lambda d: d["method"].update(alpha=-1), "method.alpha", "greater than or equal to 0"),
        (
            lambda d: d["model"].update(robust={"name": "wide_resnet", "depth": 30}),
            "model.robust.depth",
            "6n + 4",
        ),
        (
            lambda d: d["model"].update(robust={"name": "wrn34_10", "depth": 34}),
            "model.robust.depth",
            "only the 'wide_resnet' model",
        ),
        (lambda d: d["threat_model"].update(eps=1.5), "threat_model.eps", "above 1"),
        (
            lambda d: d.update(selection={"metric": "pgd_acc"}),
            "selection.metric",
            "dataset.val_size > 0",
        ),
        (
            lambda d: d["evaluation"].update(attacks=[{"kind": "fgsm"}, {"kind": "fgsm", "eps": 0.1}]),
            "evaluation.attacks",
            "labels must be unique",
        ),
        (
            lambda d: d["evaluation"].update(attacks=[{"kind": "autoattack", "version": "custom"}]),
            "evaluation.attacks[0].attacks",
            "version 'custom' needs a list",
        ),
        (
            lambda d: d["evaluation"].update(attacks=[{"kind": "autoattack", "attacks": ["square"]}]),
            "evaluation.attacks[0].attacks",
            "only version 'custom'",
        ),
        (
            lambda d: d["dataset"].update(name="cifar10", resize_to=32),
            "dataset.resize_to",
            "only Tiny-ImageNet",
        ),
        (lambda d: d["dataset"].update(name="imagenet"), "dataset.name", "Input should be"),
        (lambda d: d["model"]["robust"].update(name="vit_b16"), "model.robust.name", "Input should be"),
    ],
    ids=[
        "negative-lr",
        "attack-steps-0",
        "only-attack-steps-0",
        "milestone-at-epochs",
        "epochs-below-milestone",
        "decreasing-milestones",
        "repeated-milestone",
        "lbgat-no-teacher",
        "trades-with-teacher",
        "alpha-without-regularizer",
        "negative-alpha",
        "wrn-depth-30",
        "depth-on-fixed-model",
        "linf-eps-above-1",
        "selection-without-val",
        "duplicate-attack-labels",
        "autoattack-custom-empty",
        "autoattack-list-not-custom",
        "resize-cifar",
        "unknown-dataset",
        "unknown-model",
    ],
)
def test_impossible_values_are_refused_with_their_path(mutate, loc: str, msg_part: str):
    data = _data("lbgat-cifar10")
    mutate(data)
    with pytest.raises(SpecError) as info:
        parse_spec(data, source="my.yaml")
    errors = info.value.errors
    assert [e["loc"] for e in errors] == [loc], errors
    assert msg_part in errors[0]["msg"]
    text = str(info.value)
    assert text.startswith("invalid my.yaml:\n")
    assert f"  {loc}: " in text
    assert info.value.source == "my.yaml"


def test_several_problems_are_all_reported():
    data = _data()
    data["optimization"]["lr"] = -1
    data["evaluation"]["attacks"][2]["steps"] = 0
    data["method"]["foo"] = 1
    assert sorted(_locs(data)) == ["evaluation.attacks[2].steps", "method.foo", "optimization.lr"]


def test_missing_required_sections_and_non_mapping():
    assert sorted(_locs({"method": {"name": "natural"}})) == ["dataset", "model"]
    assert _locs({**_data(), "method": {"name": "madry"}}) == ["method"]
    with pytest.raises(SpecError) as info:
        parse_spec(["not", "a", "mapping"])  # type: ignore[arg-type]
    assert info.value.errors[0]["loc"] == ""
    assert "expected a mapping" in info.value.errors[0]["msg"]
    assert "<root>" in str(info.value)


def test_assignment_is_validated_too():
    spec = get_preset("lbgat-cifar10")
    with pytest.raises(ValueError):
        spec.optimization.lr = -1
    assert spec.optimization.lr == 0.1


# ----------------------------------------------------------------------------- files, overrides


def test_load_spec_yaml_and_json_agree(tmp_path: Path):
    data = _data("digits")
    yaml_path = tmp_path / "exp.yaml"
    json_path = tmp_path / "exp.json"
    yaml_path.write_text(yaml.safe_dump(data, sort_keys=False))
    json_path.write_text(json.dumps(data, indent=2))

    assert read_spec_file(yaml_path) == data
    assert read_spec_file(json_path) == data
    from_yaml = load_spec(yaml_path)
    from_json = load_spec(str(json_path))
    assert from_yaml == from_json == get_preset("digits")

    overridden = load_spec(yaml_path, ["optimization.lr=0.05"])
    assert overridden.optimization.lr == 0.05
    assert read_spec_file(yaml_path) == data  # the file is not rewritten


def test_load_spec_reports_errors_against_the_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmethod: {name: lbgat, alpha: -1}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"invalid {path}:")
    assert "method.alpha" in [e["loc"] for e in info.value.errors]


def test_yaml_syntax_error_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: {name: lbgat\nmodel: [\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    (err,) = info.value.errors
    assert err["loc"] == ""
    assert err["msg"].startswith("not valid yaml: ")


def test_json_syntax_error_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.json"
    path.write_text('{"method": ')
    with pytest.raises(SpecError) as info:
        read_spec_file(path)
    assert info.value.source == str(path)
    assert info.value.errors[0]["msg"].startswith("not valid json: ")


def test_missing_file_names_the_file(tmp_path: Path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    assert info.value.errors == [{"loc": "", "msg": f"no such spec file: {path}"}]
    assert str(path) in str(info.value)


def test_empty_file_reads_as_empty_mapping(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert read_spec_file(path) == {}
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert sorted(e["loc"] for e in info.value.errors) == ["dataset", "method", "model"]


def test_apply_overrides_values_are_parsed_as_yaml():
    data = _data("lbgat-trades-a0-cifar10")
    del data["runtime"], data["selection"]  # sections the overrides below create
    before = copy.deepcopy(data)
    out = apply_overrides(
        data,
        [
            "optimization.lr=0.05",
            "method.alpha=6",
            "optimization.schedule.milestones=[1,2]",
            "runtime.progress=false",
            "selection.attack.steps=3",
            "model.teacher.name=resnet18",
            "evaluation.attacks=[{kind: pgd, steps: 5, step_size: 0.02}]",
            "description=",
        ],
    )
    assert data == before  # the input is not mutated
    assert out["optimization"]["lr"] == 0.05
    assert out["method"] == {"name": "lbgat", "regularizer": "trades", "alpha": 6}
    assert out["optimization"]["schedule"]["milestones"] == [1, 2]
    assert out["runtime"] == {"progress": False}  # a new section
    assert out["selection"] == {"attack": {"steps": 3}}  # new nested sections
    assert out["model"]["teacher"] == {"name": "resnet18"}
    assert out["evaluation"]["attacks"] == [{"kind": "pgd", "steps": 5, "step_size": 0.02}]
    assert out["evaluation"]["batch_size"] == 500  # siblings kept
    assert out["description"] is None
    # untouched parts are equal but not shared with the input
    assert out["dataset"] == data["dataset"]
    assert out["dataset"] is not data["dataset"]

    out["description"] = ""
    spec = parse_spec(out)
    assert spec.optimization.lr == 0.05
    assert spec.method.alpha == 6.0
    assert spec.optimization.schedule.milestones == [1, 2]
    assert spec.optimization.epochs == 100
    assert spec.runtime.progress is False
    assert spec.selection.attack.steps == 3
    assert spec.selection.attack.step_size == 0.003
    assert [a.label() for a in spec.evaluation.attacks] == ["pgd5"]


def test_apply_overrides_later_wins_and_empty_list_is_noop():
    data = _data()
    assert apply_overrides(data, []) == data
    assert apply_overrides(data, ["seed=1", "seed=2"])["seed"] == 2


@pytest.mark.parametrize("bad", ["noequals", "=5"])
def test_malformed_override_is_refused(bad: str):
    data = _data()
    before = copy.deepcopy(data)
    with pytest.raises(SpecError) as info:
        apply_overrides(data, ["optimization.lr=0.05", bad])
    assert info.value.source == "--set"
    (err,) = info.value.errors
    assert err["loc"] == bad.partition("=")[0]
    assert "must look like key.path=value" in err["msg"]
    assert f"'{bad}'" in str(info.value)
    assert data == before


def test_override_through_a_value_is_refused():
    with pytest.raises(SpecError) as info:
        apply_overrides(_data(), ["optimization.lr.value=1"])
    assert info.value.errors == [{"loc": "optimization.lr.value", "msg": "'lr' is not a section"}]


def test_overrides_on_a_non_mapping_file_give_spec_error(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)  # without overrides: a SpecError, as expected
    assert "expected a mapping" in info.value.errors[0]["msg"]
    with pytest.raises(SpecError):
        load_spec(path, ["optimization.lr=0.05"])


# ----------------------------------------------------------------------------- results


def test_nrr_hand_values():
    assert nrr(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert nrr(0.8, 0.4) == pytest.approx(0.5333333333333333)
    assert nrr(0, 0) == 0.0
    assert nrr(1.0, 0.0) == 0.0
    assert nrr(0.5, 0.5) == pytest.approx(0.5)
    assert nrr(1.0, 1.0) == pytest.approx(1.0)


def test_result_records():
    pgd = AttackResult(
        name="pgd20", kind="pgd", accuracy=0.4, n_examples=10, nrr=nrr(0.8, 0.4), mean=0.6, seconds=1.0
    )
    report = EvalReport(clean_accuracy=0.8, n_examples=10, attacks=[pgd], robust_accuracy=0.4)
    assert report.attack("pgd20") is pgd
    with pytest.raises(KeyError, match="pgd20"):
        report.attack("cw20")
    with pytest.raises(ValueError):
        AttackResult(name="x", kind="pgd", accuracy=1.5, n_examples=1, nrr=0, mean=0, seconds=0)
    with pytest.raises(ValueError):
        EvalReport(clean_accuracy=0.8, n_examples=10, bogus=1)
    assert EvalReport.model_validate_json(report.model_dump_json()) == report


# ----------------------------------------------------------------------------- torch-free


def test_control_plane_imports_without_torch():
    code = (
        "import api_schemas, api_schemas.presets, service.client.cli, sys\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert service.client.cli.main(['presets', '--json']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported by lbgat presets'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["name"] == "alp-cifar10"
