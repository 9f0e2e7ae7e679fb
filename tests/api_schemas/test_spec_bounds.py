"""Specs that validate can run: every number is bounded and finite, every growing list and string has
a length limit, sweep values are typed, and submission tags are short labels."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from api_schemas import ExperimentSpec, SpecError, parse_spec
from api_schemas import spec as spec_module
from api_schemas.jobs import ExperimentCreate
from api_schemas.presets import PRESETS
from api_schemas.spec import INT64_MAX, SEED_MAX


def base() -> dict[str, Any]:
    return copy.deepcopy(PRESETS["digits"].data)


def refused(data: dict[str, Any]) -> list[dict[str, str]]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return info.value.errors


def put(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    node = data
    *sections, last = path.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = value
    return data


# (path, largest accepted, what the issue saw accepted or a value just past the bound)
BOUNDS = [
    ("seed", SEED_MAX, 2**70),
    ("seed", SEED_MAX, SEED_MAX + 1),
    ("runtime.cpu_threads", 1024, 1_000_000),
    ("evaluation.batch_size", 65_536, 10**12),
    ("evaluation.n_examples", 10_000_000, 10**12),
    ("optimization.batch_size", 65_536, 10**6),
    ("optimization.epochs", 10_000, 10**9),
    ("resources.num_workers", 1024, 10**6),
    ("resources.max_failures", 100, 10**9),
    ("dataset.train_limit", 10_000_000, 2**63),
    ("dataset.val_size", 10_000_000, 2**64),
    ("dataset.synthetic_size", 1_000_000, 10**9),
    ("checkpoint.keep_last", 10_000, 10**9),
    ("checkpoint.every_n_epochs", 10_000, 10**9),
    ("selection.every_n_epochs", 10_000, 10**9),
]


@pytest.mark.parametrize(("path", "largest", "too_big"), BOUNDS)
def test_integers_past_their_bound_are_refused_with_the_field_path(
    path: str, largest: int, too_big: int
) -> None:
    errors = refused(put(base(), path, too_big))
    assert errors == [{"loc": path, "msg": f"Input should be less than or equal to {largest}"}]
    if path not in {"optimization.epochs", "checkpoint.keep_last"}:  # these interact with milestones
        parse_spec(put(base(), path, largest))


def test_nested_integers_are_bounded_too() -> None:
    data = base()
    data["evaluation"] = {
        "attacks": [
            {"kind": "square", "seed": 2**40, "n_examples": 10**12, "n_restarts": 10**6},
            {"kind": "pgd", "steps": 10**6},
            {"kind": "transfer", "source_checkpoint": "src.pt", "steps": 10**6},
        ]
    }
    data["optimization"]["schedule"] = {"milestones": [5, 2**70]}
    data["method"] = {"name": "fat", "tau_milestones": [1, 10**9]}
    data.pop("model", None)
    data["model"] = {"robust": {"name": "wide_resnet", "depth": 10**6 + 4, "widen_factor": 10**6}}
    locs = {e["loc"] for e in refused(data)}
    assert locs == {
        "evaluation.attacks[0].seed",
        "evaluation.attacks[0].n_examples",
        "evaluation.attacks[0].n_restarts",
        "evaluation.attacks[1].steps",
        "evaluation.attacks[2].steps",
        "optimization.schedule.milestones[1]",
        "method.tau_milestones[1]",
        "model.robust.depth",
        "model.robust.widen_factor",
    }


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_floats_must_be_finite(value: float) -> None:
    for path in ("optimization.lr", "threat_model.eps", "resources.gpus_per_worker", "method.alpha"):
        errors = refused(put(base(), path, value))
        assert errors == [{"loc": path, "msg": "Input should be a finite number"}]


def test_yaml_infinity_is_refused_too() -> None:
    from api_schemas.yaml_safe import load_yaml

    data = load_yaml("optimization: {lr: .inf}\nthreat_model: {eps: .nan}\n")
    spec = base()
    spec["optimization"].update(data["optimization"])
    spec["threat_model"].update(data["threat_model"])
    assert {e["loc"] for e in refused(spec)} == {"optimization.lr", "threat_model.eps"}


def test_lists_and_paths_have_length_limits() -> None:
    data = base()
    data["optimization"]["schedule"] = {"milestones": list(range(1, 70))}
    data["optimization"]["epochs"] = 100
    data["evaluation"] = {"attacks": [{"kind": "pgd", "name": f"p{i}"} for i in range(65)]}
    data["dataset"]["root"] = "d/" * 2049
    data["output"] = {"dir": "o" * 4097}
    locs = {e["loc"] for e in refused(data)}
    assert locs == {"optimization.schedule.milestones", "evaluation.attacks", "dataset.root", "output.dir"}


def sweep(values: list[Any], kind: str = "grid", path: str = "method.alpha") -> dict[str, Any]:
    data = base()
    data["dataset"]["val_size"] = 100
    data["sweep"] = {"parameters": {path: {"kind": kind, "values": values}}}
    if kind != "grid":
        data["sweep"]["search"] = "random"
    return data


def test_sweep_values_are_typed_scalars_or_lists_of_them() -> None:
    ok = parse_spec(sweep([0, 1.5, True, None, "six", [75, 90], -(2**63), 2**63 - 1]))
    assert ok.sweep is not None
    assert ok.sweep.parameters["method.alpha"].values == [
        0,
        1.5,
        True,
        None,
        "six",
        [75, 90],
        -(2**63),
        2**63 - 1,
    ]

    errors = refused(sweep([1, {"a": 1}, 2**70, "x" * 257, [1, [2]], math.inf, list(range(65))]))
    where = "sweep.parameters.method.alpha.values"
    assert errors == [
        {
            "loc": f"{where}[1]",
            "msg": "must be a number, string, boolean or null, or a list of them (got a mapping)",
        },
        {"loc": f"{where}[2]", "msg": "integers must fit in 64 bits"},
        {"loc": f"{where}[3]", "msg": "strings hold at most 256 characters (got 257)"},
        {"loc": f"{where}[4]", "msg": "item 1: a list value cannot hold lists"},
        {"loc": f"{where}[5]", "msg": "numbers must be finite"},
        {"loc": f"{where}[6]", "msg": "a list value holds at most 64 items (got 65)"},
    ]
    # the domain's tag ('grid', 'choice') is not part of the path, as for methods and attacks
    assert refused(sweep([{"a": 1}], kind="choice"))[0]["loc"] == f"{where}[0]"


def test_sweep_sizes_are_bounded() -> None:
    errors = refused(sweep(list(range(257))))
    assert [e["loc"] for e in errors] == ["sweep.parameters.method.alpha.values"]
    assert "at most 256 items" in errors[0]["msg"]

    data = sweep([1.0])
    data["sweep"]["parameters"] = {f"method.p{i}": {"kind": "grid", "values": [1]} for i in range(33)}
    assert [e["loc"] for e in refused(data)] == ["sweep.parameters"]

    assert refused(sweep([1], path="method alpha; rm -rf"))[0]["loc"].startswith("sweep.parameters.")

    data = sweep([1])
    data["sweep"] = {"parameters": {"seed": {"kind": "randint", "low": 0, "high": 2**64}}, "search": "random"}
    assert [e["loc"] for e in refused(data)] == ["sweep.parameters.seed.high"]
    data["sweep"]["parameters"]["seed"] = {"kind": "loguniform", "low": 1e-3, "high": math.inf}
    assert [e["loc"] for e in refused(data)] == ["sweep.parameters.seed.high"]


def _int_fields() -> list[tuple[str, str]]:
    """(model, field) for every int field (int, int | None) of every model of the spec module."""
    found = []
    for model in vars(spec_module).values():
        if (
            isinstance(model, type)
            and issubclass(model, BaseModel)
            and model.__module__ == spec_module.__name__
        ):
            for name, field in model.model_fields.items():
                annotation = repr(field.annotation)
                if annotation in {"<class 'int'>", "int | None", "typing.Optional[int]"}:
                    found.append((model.__name__, name))
    return found


def test_every_integer_field_of_the_spec_has_an_upper_bound() -> None:
    unbounded = []
    fields = _int_fields()
    assert ("ExperimentSpec", "seed") in fields and ("RuntimeSpec", "cpu_threads") in fields
    for model_name, name in fields:
        field = getattr(spec_module, model_name).model_fields[name]
        upper = [m for m in field.metadata if hasattr(m, "le") or hasattr(m, "lt")]
        if not upper:
            unbounded.append(f"{model_name}.{name}")
    assert unbounded == []


def test_bounds_fit_a_64_bit_column() -> None:
    for model_name, name in _int_fields():
        for meta in getattr(spec_module, model_name).model_fields[name].metadata:
            if getattr(meta, "le", None) is not None:
                assert meta.le <= INT64_MAX, (model_name, name)


def test_every_preset_still_validates() -> None:
    for preset in PRESETS.values():
        assert isinstance(preset.spec(), ExperimentSpec)


# -- submission options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    ["", "x" * 65, "with space", "-leading-dash", "tab\there", "caf\u00e9", "semi;colon", "new\nline"],
)
def test_bad_tags_are_refused_with_their_index(tag: str) -> None:
    with pytest.raises(ValidationError) as info:
        ExperimentCreate(spec={}, tags=["fine", tag])
    assert [e["loc"] for e in info.value.errors()] == [("tags", 1)]


def test_tags_within_bounds() -> None:
    good = ["paper", "t1", "lr=0.1", "team/run:2", "a" * 64, "v1.2_b-3+x@y"]
    assert ExperimentCreate(spec={}, tags=good).tags == good
    with pytest.raises(ValidationError) as info:
        ExperimentCreate(spec={}, tags=["t"] * 17)
    assert [e["loc"] for e in info.value.errors()] == [("tags",)]
    with pytest.raises(ValidationError):
        ExperimentCreate(spec={}, tags=[""] * 16)  # the 16 empty tags
