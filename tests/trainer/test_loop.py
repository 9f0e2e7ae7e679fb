"""The shared loop: schedules, checkpoints, exact resume, metrics and summary files, best model."""

from __future__ import annotations

import json

import pytest
import torch

from api_schemas import OptimizationSpec, TrainSummary
from tests.trainer.helpers import digits_spec
from trainer.checkpoint import CheckpointError, load_model, read_checkpoint
from trainer.loop import TrainingRun
from trainer.schedules import learning_rate


def test_piecewise_schedule_matches_official_lbgat_script():
    # train_lbgat_cifar100.py (1-based epochs): 0.02 in epoch 1, 0.1 until 75, 0.01 from 76, 0.001 from 91
    opt = OptimizationSpec(epochs=100, schedule={"milestones": [75, 90], "first_epoch_lr": 0.02})
    official = {1: 0.02, 2: 0.1, 75: 0.1, 76: 0.01, 90: 0.01, 91: 0.001, 100: 0.001}
    for epoch_1based, lr in official.items():
        assert learning_rate(opt, epoch_1based - 1) == pytest.approx(lr)


def test_cosine_and_constant_schedules():
    opt = OptimizationSpec(lr=0.2, epochs=10, schedule={"kind": "cosine", "milestones": []})
    assert learning_rate(opt, 0, 0, 100) == pytest.approx(0.2)
    assert learning_rate(opt, 5, 0, 100) == pytest.approx(0.1)
    assert learning_rate(opt, 9, 99, 100) < 0.001
    assert learning_rate(OptimizationSpec(lr=0.3, schedule={"kind": "constant"}), 50) == 0.3


def test_per_step_piecewise_schedule_matches_rebat_and_rice_et_al():
    """PKU-ML/ReBAT train_cifar_wa.py (Rice et al.'s form): lr_schedule(epoch + (i + 1) / len(batches))
    with lr_max until --stage1, / --lr-factor until --stage2, / factor**2 after; the last batch of
    epochs 99 and 149 already runs at the decayed rate."""

    def official(t, lr_max=0.1, factor=1.5, stage1=100, stage2=150):
        if t < stage1:
            return lr_max
        if t < stage2:
            return lr_max / factor
        return lr_max / factor**2

    schedule = {"kind": "piecewise", "milestones": [100, 150], "gamma": 1 / 1.5, "per_step": True}
    opt = OptimizationSpec(lr=0.1, epochs=200, schedule=schedule)
    n = 391
    for epoch in (0, 98, 99, 100, 148, 149, 150, 199):
        for i in (0, 1, n - 2, n - 1):
            assert learning_rate(opt, epoch, i, n) == pytest.approx(official(epoch + (i + 1) / n)), (epoch, i)
    assert learning_rate(opt, 99, n - 1, n) < learning_rate(opt, 99, n - 2, n)
    per_epoch = OptimizationSpec(lr=0.1, epochs=200, schedule={**schedule, "per_step": False})
    assert learning_rate(per_epoch, 99, n - 1, n) == pytest.approx(0.1)


def _spec(**kw):
    base = {
        "dataset": {"train_limit": 576, "val_size": 64},
        "optimization": {
            "lr": 0.1,
            "batch_size": 32,
            "epochs": 4,
            "schedule": {"kind": "piecewise", "milestones": [3]},
        },
        "selection": {"metric": "pgd_acc", "attack": {"steps": 2, "step_size": 0.05}},
        "checkpoint": {"every_n_epochs": 1, "keep_last": 2},
    }
    base.update(kw)
    return digits_spec({"name": "lbgat", "regularizer": "trades", "alpha": 1.0}, **base)


def test_resume_equals_uninterrupted_run(tmp_path):
    spec = _spec()
    full = TrainingRun(spec, out_dir=tmp_path / "full")
    full.fit(evaluate_at_end=False)

    # an interrupted run: 2 epochs, then a new process-like object resumes from the checkpoint
    first = TrainingRun(
        spec.model_copy(
            update={
                "optimization": spec.optimization.model_copy(update={"epochs": 2}),
            }
        ),
        out_dir=tmp_path / "part",
    )
    first.fit(evaluate_at_end=False)
    torch.manual_seed(12345)  # scramble the global RNG: resume must restore it
    resumed = TrainingRun(spec, out_dir=tmp_path / "part")
    summary = resumed.fit(resume=tmp_path / "part" / "checkpoints" / "last.pt", evaluate_at_end=False)

    assert summary.epochs == 4
    for key, value in full.robust.state_dict().items():
        torch.testing.assert_close(resumed.robust.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for key, value in full.teacher.state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[key], value, rtol=0, atol=0, msg=key)
    full_lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    part_lines = [json.loads(l) for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in part_lines] == [1, 2, 3, 4]
    assert [l["loss"] for l in part_lines] == pytest.approx([l["loss"] for l in full_lines], rel=1e-12)
    assert full.best_epoch == resumed.best_epoch


def test_fit_writes_metrics_checkpoints_and_summary(tmp_path):
    spec = _spec()
    summary = TrainingRun(spec, out_dir=tmp_path).fit()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3, 4]
    assert [l["lr"] for l in lines] == pytest.approx([0.1, 0.1, 0.1, 0.01])
    for line in lines:
        assert 0 <= line["train_adv_accuracy"] <= 1 and 0 <= line["teacher_accuracy"] <= 1
        assert line["images_per_second"] > 0 and set(line["val"]) == {"clean_acc", "pgd_acc", "nrr"}
    # periodic checkpoints pruned to keep_last=2 (the last epoch is saved as last.pt instead)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"]
    best_val = max(l["val"]["pgd_acc"] for l in lines)
    assert summary.best_metric == pytest.approx(best_val)
    assert lines[summary.best_epoch - 1]["val"]["pgd_acc"] == pytest.approx(best_val)
    assert read_checkpoint(tmp_path / "checkpoints" / "best.pt")["epoch"] == summary.best_epoch
    on_disk = TrainSummary.model_validate_json((tmp_path / "summary.json").read_text())
    assert on_disk.final.attacks[0].name == "pgd3" and on_disk.best is not None
    assert on_disk.final.clean_accuracy > 0.5
    assert on_disk.provenance["torch"] == torch.__version__
    assert on_disk.spec["method"]["name"] == "lbgat"
    # both models can be rebuilt from the checkpoint alone
    teacher = load_model(tmp_path / "checkpoints" / "last.pt", which="teacher")
    assert sum(p.numel() for p in teacher.parameters()) < sum(
        p.numel() for p in load_model(summary.last_checkpoint).parameters()
    )


def test_resume_auto_picks_newest_and_refuses_other_method(tmp_path):
    spec = _spec(optimization={"lr": 0.05, "batch_size": 32, "epochs": 3, "schedule": {"kind": "constant"}})
    TrainingRun(spec, out_dir=tmp_path).fit(evaluate_at_end=False)
    again = TrainingRun(spec, out_dir=tmp_path)
    summary = again.fit(resume="auto", evaluate_at_end=False)
    assert summary.epochs == 3 and len(again.history) == 3  # nothing left to train
    other = digits_spec({"name": "trades"}, dataset={"train_limit": 64})
    with pytest.raises(CheckpointError, match="different method"):
        TrainingRun(other, out_dir=tmp_path).fit(
            resume=tmp_path / "checkpoints" / "last.pt", evaluate_at_end=False
        )


def test_truncated_checkpoint_is_reported(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"broken\.pt"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")


def test_val_size_too_large(tmp_path):
    spec = digits_spec({"name": "natural"}, dataset={"train_limit": 50, "val_size": 60})
    with pytest.raises(ValueError, match="val_size"):
        TrainingRun(spec, out_dir=tmp_path)
