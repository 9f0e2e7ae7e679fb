"""BGAT's teacher ensemble: members of different architectures, the mean of their logits, the presets."""

from __future__ import annotations

import pytest
import torch

from api_schemas import SpecError, parse_spec
from api_schemas.presets import PRESETS, get_preset
from tests.trainer.helpers import digits_spec
from trainer.loop import TrainingRun
from trainer.methods.bgat import LogitEnsemble
from trainer.models import create_model


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _natural(tmp_path, width: int):
    """A briefly trained natural tiny_cnn of `width` in our checkpoint format."""
    spec = digits_spec(
        {"name": "natural"},
        model={"robust": {"name": "tiny_cnn", "width": width}},
        dataset={"train_limit": 128},
    )
    run = TrainingRun(spec, out_dir=tmp_path / f"natural{width}")
    for x, y in run.loader:
        run.train_step(x, y)
    return run, run.save(run.out_dir / "checkpoints" / "last.pt")


def test_logit_ensemble_is_the_mean_of_its_members_and_frozen():
    torch.manual_seed(0)
    members = [create_model("tiny_cnn", num_classes=10, width=w).eval() for w in (8, 16, 32)]
    ensemble = LogitEnsemble(members)
    x = torch.rand(5, 1, 8, 8)
    expected = (members[0](x) + members[1](x) + members[2](x)) / 3
    torch.testing.assert_close(ensemble(x), expected)
    assert not any(p.requires_grad for p in ensemble.parameters())


def test_bgat_teacher_averages_checkpoints_of_different_architectures(tmp_path):
    """Our checkpoint (it names its tiny_cnn width 16) and a plain state dict of another architecture
    (width 24, named by method.teacher_models) form the teacher; its logits are their mean."""
    first, first_path = _natural(tmp_path, 16)
    second, _ = _natural(tmp_path, 24)
    plain = tmp_path / "plain_state_dict.pt"
    torch.save(second.robust.state_dict(), plain)
    method = {
        "name": "bgat",
        "teacher_checkpoints": [str(first_path), str(plain)],
        "teacher_models": [{"name": "tiny_cnn"}, {"name": "tiny_cnn", "width": 24}],  # the first is ignored
    }
    run = TrainingRun(digits_spec(method, dataset={"train_limit": 64}), out_dir=tmp_path / "bgat")
    assert len(run.teacher.members) == 2
    run.teacher.eval()  # as the loop keeps BGAT's fixed teacher
    x = next(iter(run.loader))[0]
    first.robust.eval()
    second.robust.eval()
    with torch.no_grad():
        expected = (first.robust(x) + second.robust(x)) / 2
        torch.testing.assert_close(run.teacher(x), expected)
    # the loss is computed against that mean: the teacher logits the step reports are the average
    seen = {}
    original = run.method.teacher_logits

    def teacher_logits(teacher, inputs):
        seen["logits"] = original(teacher, inputs)
        return seen["logits"]

    run.method.teacher_logits = teacher_logits
    run.train_step(*next(iter(run.loader)))
    with torch.no_grad():
        torch.testing.assert_close(seen["logits"], (first.robust(x) + second.robust(x)) / 2)


def test_a_plain_state_dict_needs_its_architecture(tmp_path):
    _, path = _natural(tmp_path, 16)
    data = digits_spec({"name": "bgat", "teacher_checkpoints": [str(path)]}).model_dump()
    data["method"]["teacher_models"] = [{"name": "tiny_cnn"}, {"name": "tiny_cnn"}]
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert [e["loc"] for e in info.value.errors] == ["method.teacher_models"]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_ensemble_presets(dataset):
    teacher = get_preset(f"natural-irv2-{dataset}")
    assert teacher.method.name == "natural" and teacher.model.robust.name == "inception_resnet_v2"
    wrn = get_preset(f"natural-{dataset}")
    assert wrn.model.robust.name == "wrn34_10"
    for key, regularizer, alpha in (
        ("bgat-ensemble", "none", 0.0),
        ("bgat-ensemble-alp", "alp", 1.0),
        ("bgat-ensemble-trades", "trades", 6.0),
    ):
        spec = get_preset(f"{key}-{dataset}")
        assert spec.method.name == "bgat"
        assert (spec.method.regularizer, spec.method.alpha) == (regularizer, alpha)
        assert spec.method.teacher_checkpoints == [
            f"{wrn.output.dir}/checkpoints/last.pt",
            f"{teacher.output.dir}/checkpoints/last.pt",
        ]
        assert spec.model.robust.name == "wrn34_10"
        assert PRESETS[f"{key}-{dataset}"].deviations  # the teachers' recipe is not the paper's
