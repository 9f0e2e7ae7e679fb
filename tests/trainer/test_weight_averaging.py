"""optimization.weight_averaging: the EMA formula, checkpoint/resume, and evaluation on the averaged weights."""

from __future__ import annotations

import copy

import pytest
import torch

from api_schemas import SpecError
from tests.trainer.helpers import digits_spec
from trainer.checkpoint import CheckpointError, load_model, read_checkpoint
from trainer.evaluation import accuracy
from trainer.loop import TrainingRun, stack_views


def _spec(weight_averaging=None, **sections):
    optimization = {"lr": 0.1, "batch_size": 32, "epochs": 3, "schedule": {"kind": "constant"}}
    optimization.update(sections.pop("optimization", {}))
    if weight_averaging is not None:
        optimization["weight_averaging"] = weight_averaging
    return digits_spec(
        {"name": "pgd_at"},
        dataset={"train_limit": 128, **sections.pop("dataset", {})},
        optimization=optimization,
        threat_model={"eps": 0.1, "step_size": 0.05, "steps": 2},
        **sections,
    )


def _steps(run: TrainingRun, n: int):
    """Yield after each of n optimizer steps with (averaged before, model after)."""
    batches = iter(run.loader)
    for _ in range(n):
        x, y = stack_views(next(batches))
        before = copy.deepcopy(run.averaged.state_dict())
        run.train_step(x, y)
        yield before, run.robust.state_dict()


@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_averaged_weights_follow_the_ema_formula(buffers, tmp_path):
    decay = 0.9
    run = TrainingRun(_spec({"decay": decay, "buffers": buffers}), out_dir=tmp_path)
    for key, value in run.robust.state_dict().items():  # starts as a copy of the model
        assert torch.equal(run.averaged.state_dict()[key], value)
    buffer_names = {name for name, _ in run.robust.named_buffers()}
    assert any("running_mean" in name for name in buffer_names)
    for before, model in _steps(run, 3):
        averaged = run.averaged.state_dict()
        for key, value in model.items():
            if not value.is_floating_point() or (buffers == "copy" and key in buffer_names):
                assert torch.equal(averaged[key], value), key
            else:
                expected = decay * before[key] + (1 - decay) * value
                torch.testing.assert_close(averaged[key], expected, rtol=1e-6, atol=1e-7, msg=key)
                assert not torch.equal(averaged[key], value), key  # really averaged, not copied
    assert not run.averaged.training
    assert all(not p.requires_grad for p in run.averaged.parameters())
    assert all(p.requires_grad for p in run.robust.parameters())


def test_before_start_epoch_the_average_is_the_model(tmp_path):
    run = TrainingRun(_spec({"decay": 0.99, "start_epoch": 1}), out_dir=tmp_path)
    for _, model in _steps(run, 2):
        for key, value in model.items():
            assert torch.equal(run.averaged.state_dict()[key], value), key
    run.epoch = 1  # from the start epoch on, the average lags behind
    for _, model in _steps(run, 1):
        weight = next(k for k in model if k.endswith("weight"))
        assert not torch.equal(run.averaged.state_dict()[weight], model[weight])


def test_averaged_weights_survive_checkpoint_and_resume_bitwise(tmp_path):
    spec = _spec({"decay": 0.95})
    full = TrainingRun(spec, out_dir=tmp_path / "full")
    full.fit(evaluate_at_end=False)
    short = spec.model_copy(update={"optimization": spec.optimization.model_copy(update={"epochs": 2})})
    TrainingRun(short, out_dir=tmp_path / "part").fit(evaluate_at_end=False)
    saved = read_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert saved["robust_ema"] is not None
    torch.manual_seed(999)
    resumed = TrainingRun(spec, out_dir=tmp_path / "part")
    resumed.fit(resume="auto", evaluate_at_end=False)
    for key, value in full.averaged.state_dict().items():
        torch.testing.assert_close(resumed.averaged.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for key, value in full.robust.state_dict().items():
        torch.testing.assert_close(resumed.robust.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # the averaged weights can be rebuilt from the checkpoint alone
    ema = load_model(tmp_path / "full" / "checkpoints" / "last.pt", weights="ema")
    for key, value in full.averaged.state_dict().items():
        assert torch.equal(ema.state_dict()[key], value), key


def test_resume_with_averaging_needs_averaged_weights(tmp_path):
    TrainingRun(_spec(), out_dir=tmp_path).fit(evaluate_at_end=False)
    with pytest.raises(CheckpointError, match="no averaged weights"):
        TrainingRun(_spec({"decay": 0.9}), out_dir=tmp_path).fit(resume="auto", evaluate_at_end=False)


def test_evaluation_and_selection_use_the_averaged_weights_when_asked(tmp_path):
    spec = _spec(
        {"decay": 0.9},
        dataset={"val_size": 32},
        selection={"metric": "clean_acc", "attack": {"steps": 2, "step_size": 0.05}},
    )
    assert spec.evaluated_weights() == "averaged" and spec.selected_weights() == "averaged"
    run = TrainingRun(spec, out_dir=tmp_path)
    summary = run.fit()
    assert summary.final.weights == "averaged" and summary.best.weights == "averaged"
    evaluated = run.data.test.subset(torch.arange(spec.evaluation.n_examples))
    ema_acc = accuracy(run.averaged, evaluated)
    model_acc = accuracy(run.robust, evaluated)
    assert summary.final.clean_accuracy == pytest.approx(ema_acc)
    assert ema_acc != model_acc  # otherwise this test could not tell them apart
    # selection validated the averaged weights: the best epoch's val accuracy is the EMA's
    best = read_checkpoint(tmp_path / "checkpoints" / "best.pt")
    best_ema = load_model(tmp_path / "checkpoints" / "best.pt", weights="ema")
    assert accuracy(best_ema, run.data.val) == pytest.approx(summary.best_metric)
    assert run.history[best["epoch"] - 1]["val"]["clean_acc"] == pytest.approx(summary.best_metric)
    assert all("test_clean_accuracy_averaged" in line["extra"] for line in run.history)

    # and the model's own weights when the spec says so
    spec = _spec({"decay": 0.9}, evaluation={"weights": "model", "attacks": []})
    run = TrainingRun(spec, out_dir=tmp_path / "model")
    summary = run.fit()
    assert summary.final.weights == "model"
    assert summary.final.clean_accuracy == pytest.approx(
        accuracy(run.robust, run.data.test.subset(torch.arange(64)))
    )


def test_weight_averaging_spec_is_validated():
    with pytest.raises(SpecError) as err:
        _spec({"decay": 1.0})
    assert err.value.errors[0]["loc"] == "optimization.weight_averaging.decay"
    with pytest.raises(SpecError) as err:
        _spec(evaluation={"weights": "averaged"})
    assert err.value.errors[0]["loc"] == "evaluation.weights"
    with pytest.raises(SpecError) as err:
        _spec(selection={"weights": "averaged"})
    assert err.value.errors[0]["loc"] == "selection.weights"
    with pytest.raises(SpecError) as err:
        _spec({"decay": 0.9, "buffers": "reset"})
    assert err.value.errors[0]["loc"] == "optimization.weight_averaging.buffers"
    assert _spec().evaluated_weights() == "model"


def test_lbgat_eval_reads_the_averaged_weights(tmp_path, capsys):
    import json

    from service.client.cli import main

    spec = _spec({"decay": 0.9}, optimization={"epochs": 1})
    run = TrainingRun(spec, out_dir=tmp_path)
    run.fit(evaluate_at_end=False)
    last = str(tmp_path / "checkpoints" / "last.pt")
    assert (
        main(["eval", last, "--weights", "averaged", "--json", "--n-examples", "40", "--device", "cpu"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    first = run.data.test.subset(torch.arange(40))
    assert report["weights"] == "averaged"
    assert report["clean_accuracy"] == pytest.approx(accuracy(run.averaged, first))

    plain = TrainingRun(_spec(optimization={"epochs": 1}), out_dir=tmp_path / "plain")
    plain.fit(evaluate_at_end=False)
    # a checkpoint without averaged weights: one error line and exit 2, no traceback
    assert main(["eval", str(tmp_path / "plain" / "checkpoints" / "last.pt"), "--weights", "averaged"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: checkpoint ") and "holds no 'robust_ema' weights" in err[-1]
