"""The bounded YAML loader (api_schemas.yaml_safe) and its use by spec files and `--set` overrides."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from api_schemas import SpecError, apply_overrides, read_spec_file
from api_schemas.presets import PRESETS
from api_schemas.yaml_safe import DEFAULT_LIMITS, YAMLLimitError, YAMLLimits, load_yaml


def alias_bomb(levels: int = 7, width: int = 10) -> str:
    """The issue's document: `&a0 [x, ...]`, `&a1 [*a0, ...]`, ... `levels` levels of `width`
    (10**7 leaves once expanded, from about a kilobyte)."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_the_alias_bomb_is_refused_while_composing_without_expanding() -> None:
    bomb = alias_bomb()
    assert len(bomb) < 1500
    started = time.perf_counter()
    with pytest.raises(YAMLLimitError) as info:
        load_yaml(bomb)
    assert time.perf_counter() - started < 0.5  # refused on the way, never expanded
    error = info.value
    assert error.too_large
    # keys count too: a3 stands for 11111 nodes, so 12351 are composed when a4's first alias of a3
    # passes 20000
    assert error.path == "a4[0]"
    assert f"more than {DEFAULT_LIMITS.max_nodes} nodes" in error.problem
    assert "line 5, column" in error.problem
    assert isinstance(error, yaml.YAMLError)  # callers that catch YAMLError still do


def test_aliases_count_as_what_they_expand_to() -> None:
    # the root; key a, its list and 4 items; key b, its list and twice a's 5 nodes: 19
    text = "a: &a [1, 2, 3, 4]\nb: [*a, *a]\n"
    with pytest.raises(YAMLLimitError) as info:
        load_yaml(text, limits=YAMLLimits(max_nodes=18))
    assert info.value.path == "b[1]" and info.value.too_large
    assert load_yaml(text, limits=YAMLLimits(max_nodes=19)) == {"a": [1, 2, 3, 4], "b": [[1, 2, 3, 4]] * 2}


def test_nesting_depth_counts_expanded_aliases() -> None:
    limits = YAMLLimits(max_depth=6)
    deep = "a: [[[[[1]]]]]\n"  # root, a's list and four more levels, the scalar: 7
    with pytest.raises(YAMLLimitError) as info:
        load_yaml(deep, limits=limits)
    assert info.value.path == "a[0][0][0][0][0]" and not info.value.too_large
    assert "nested deeper than 6 levels" in info.value.problem

    # each part shallow enough, the alias puts a 4-level list 3 levels down: 7
    with pytest.raises(YAMLLimitError) as info:
        load_yaml("x: &d [[[1]]]\ny: [[*d]]\n", limits=limits)
    assert info.value.path == "y[0][0]"
    assert load_yaml("x: &d [[[1]]]\ny: [*d]\n", limits=limits) == {"x": [[[1]]], "y": [[[[1]]]]}

    # far past Python's recursion limit: refused by the depth bound, not a RecursionError
    with pytest.raises(YAMLLimitError):
        load_yaml("a: " + "[" * 5000 + "]" * 5000)


def test_alias_count_and_recursive_documents() -> None:
    many = "s: &s 1\nk: [" + ", ".join(["*s"] * 101) + "]\n"
    with pytest.raises(YAMLLimitError) as info:
        load_yaml(many)
    assert info.value.path == "k[100]" and "more than 100 aliases" in info.value.problem
    assert not info.value.too_large

    with pytest.raises(YAMLLimitError) as info:
        load_yaml("a: &r [1, *r]\n")
    assert info.value.path == "a[1]" and "refers to a node that contains it" in info.value.problem

    with pytest.raises(yaml.YAMLError, match="undefined alias"):
        load_yaml("a: *nowhere\n")


def test_ordinary_yaml_loads_like_safe_load() -> None:
    text = (
        "defaults: &attack {kind: pgd, steps: 20}\n"
        "attacks: [*attack, {<<: *attack, loss: cw}]\n"
        "date: 2024-01-01\nempty:\nflag: yes\n"
    )
    assert load_yaml(text) == yaml.safe_load(text)
    for preset in PRESETS.values():
        dumped = yaml.safe_dump(preset.data)
        assert load_yaml(dumped) == yaml.safe_load(dumped)
    assert load_yaml(b"a: 1\n") == {"a": 1} and load_yaml("") is None
    with pytest.raises(yaml.constructor.ConstructorError):  # still safe: no Python objects
        load_yaml("!!python/object/apply:os.system ['true']")


def test_spec_files_go_through_the_bounded_loader(tmp_path: Path) -> None:
    spec = copy.deepcopy(PRESETS["digits"].data)
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(spec) + alias_bomb())
    with pytest.raises(SpecError) as info:
        read_spec_file(path)
    assert info.value.too_large
    assert info.value.errors[0]["loc"] == "a4[0]"

    path.write_text("name: deep\nsweep: " + "[" * 40 + "]" * 40 + "\n")
    with pytest.raises(SpecError) as info:
        read_spec_file(path)
    assert not info.value.too_large
    assert info.value.errors[0]["loc"].startswith("sweep[0][0]")
    assert "nested deeper than 32 levels" in info.value.errors[0]["msg"]


def test_overrides_go_through_the_bounded_loader() -> None:
    data = copy.deepcopy(PRESETS["digits"].data)
    bomb = "{" + alias_bomb().replace("\n", ", ").rstrip(", ") + "}"
    with pytest.raises(SpecError) as info:
        apply_overrides(data, [f"description={bomb}"])
    assert info.value.too_large and info.value.errors[0]["loc"] == "description.a4[0]"

    with pytest.raises(SpecError) as info:
        apply_overrides(data, ["optimization.lr=[unclosed"])
    assert info.value.errors[0]["loc"] == "optimization.lr"
    assert info.value.errors[0]["msg"].startswith("not valid YAML")
