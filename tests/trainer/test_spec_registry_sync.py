"""The torch-free spec duplicates a few trainer registries; these tests keep the two in step."""

from __future__ import annotations

import typing

from api_schemas import spec as spec_module
from api_schemas.presets import PRESETS
from trainer.data import DATASET_INFO, canonical_name
from trainer.methods import list_methods
from trainer.models import list_models


def _literal_values(literal) -> list[str]:
    assert typing.get_origin(literal) is typing.Literal
    return list(typing.get_args(literal))


def _method_names() -> list[str]:
    union, _field = typing.get_args(spec_module.MethodSpec)  # Annotated[Union[...], Field(...)]
    return [cls.model_fields["name"].default for cls in typing.get_args(union)]


def test_model_names_match_the_model_registry():
    names = _literal_values(spec_module.ModelName)
    assert len(names) == len(set(names))
    assert sorted(names) == list_models()


def test_dataset_names_match_the_dataset_registry():
    names = _literal_values(spec_module.DatasetName)
    for name in names:
        assert name in DATASET_INFO
        assert canonical_name(name) == name  # loadable under the very name the spec uses
    assert sorted(names) == sorted(DATASET_INFO)


def test_method_names_match_the_method_registry():
    names = _method_names()
    assert len(names) == len(set(names))
    assert list_methods() == sorted(names)
    assert set(spec_module.TEACHER_METHODS) <= set(names)


def test_every_preset_names_registered_models():
    registered = set(list_models())
    for preset in PRESETS.values():
        spec = preset.spec()
        assert spec.model.robust.name in registered
        if spec.model.teacher is not None:
            assert spec.model.teacher.name in registered
        assert spec.method.name in list_methods()
        assert canonical_name(spec.dataset.name) == spec.dataset.name
