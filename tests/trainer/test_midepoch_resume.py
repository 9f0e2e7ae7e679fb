"""Just-in-time checkpoints mid-epoch: a run stopped before any step and resumed in a new run ends
bit-identical to an uninterrupted one (weights, EMA, teacher, optimizer) with each epoch's metrics
line exactly once and equal (timings aside)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.trainer.helpers import digits_spec
from trainer.checkpoint import read_checkpoint
from trainer.loop import INTERRUPTED, CheckpointRequested, TrainingRun

TIMINGS = {"seconds", "images_per_second", "checkpoint_at"}


def _spec(method=None, **kw):
    base = {
        # augmentation on: the loader must replay its generator to the stop's batch
        "dataset": {"name": "digits", "augment": True, "crop_padding": 1, "train_limit": 320},
        "optimization": {
            "lr": 0.05,
            "batch_size": 32,
            "epochs": 3,
            "schedule": {"kind": "cosine", "milestones": []},  # an lr that moves every step
            "weight_averaging": {"decay": 0.9, "start_epoch": 1},
        },
        "checkpoint": {"every_n_epochs": 1},
    }
    base.update(kw)
    return digits_spec(method or {"name": "lbgat", "regularizer": "trades", "alpha": 1.0}, **base)


def _stop_at(run: TrainingRun, global_step: int) -> None:
    """Request a checkpoint when the run is about to take its `global_step`-th step (0-based)."""
    count = {"n": 0}

    def hook(reason):
        if count["n"] == global_step:
            reason = reason or "test"
        count["n"] += 1
        return reason

    run.checkpoint_hooks.append(hook)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same_metrics(a, b):
    assert [x["epoch"] for x in a] == [y["epoch"] for y in b] == list(range(1, len(a) + 1))
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in TIMINGS} == {
            k: v for k, v in y.items() if k not in TIMINGS
        }


def _assert_same_state(full: TrainingRun, other: TrainingRun):
    for name in ("robust", "teacher", "averaged"):
        mine, theirs = getattr(full, name).state_dict(), getattr(other, name).state_dict()
        for key, value in mine.items():
            assert torch.equal(theirs[key], value), (name, key)
    for a, b in zip(
        full.optimizer.state_dict()["state"].values(), other.optimizer.state_dict()["state"].values()
    ):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    run = TrainingRun(_spec(), out_dir=out)
    run.fit(evaluate_at_end=False)
    return run, _lines(out / "metrics.jsonl")


# 10 steps per epoch: the first step of the run, the first and the last step of an epoch, the middle
@pytest.mark.parametrize("stop", [0, 10, 19, 24])
def test_stopped_anywhere_resumes_bit_identical(tmp_path, uninterrupted, stop):
    full, full_lines = uninterrupted
    steps = len(full.loader)
    assert steps == 10
    spec = _spec()
    first = TrainingRun(spec, out_dir=tmp_path)
    _stop_at(first, stop)
    with pytest.raises(CheckpointRequested) as stopped:
        first.fit(evaluate_at_end=False)
    assert (stopped.value.epoch, stopped.value.step) == divmod(stop, steps)
    saved = read_checkpoint(tmp_path / "checkpoints" / INTERRUPTED)
    assert saved["epoch"] == stop // steps and saved["epoch_progress"]["step"] == stop % steps

    torch.manual_seed(999)  # scramble the global RNG: resume must restore it
    resumed = TrainingRun(spec, out_dir=tmp_path)
    assert resumed.latest_checkpoint() == tmp_path / "checkpoints" / INTERRUPTED
    summary = resumed.fit(resume="auto", evaluate_at_end=False)
    assert summary.epochs == 3
    _assert_same_state(full, resumed)
    lines = _lines(tmp_path / "metrics.jsonl")
    _same_metrics(lines, full_lines)
    assert all(line["checkpoint_at"] is not None for line in lines)
    assert not (tmp_path / "checkpoints" / INTERRUPTED).exists()


def test_two_stops_and_continuing_in_process(tmp_path, uninterrupted):
    """Stopped twice in one epoch, resumed in between; and a stop the run goes on after in-process
    (what a worker does after a node-drain checkpoint) changes nothing either."""
    full, full_lines = uninterrupted
    spec = _spec()
    run = TrainingRun(spec, out_dir=tmp_path)
    _stop_at(run, 13)
    with pytest.raises(CheckpointRequested):
        run.fit(evaluate_at_end=False)
    again = TrainingRun(spec, out_dir=tmp_path)
    _stop_at(again, 3)  # 3 steps after the resume: step 6 of epoch 2
    with pytest.raises(CheckpointRequested) as stopped:
        again.fit(resume="auto", evaluate_at_end=False)
    assert (stopped.value.epoch, stopped.value.step) == (1, 6)
    # what a worker reports, then it trains on (a copy: the payload holds the live tensors)
    payload = copy.deepcopy(again.checkpoint_payload())
    again.resume_after_checkpoint()
    while again.epoch < spec.optimization.epochs:
        again.train_epoch()
    _assert_same_state(full, again)

    last = TrainingRun(spec, out_dir=tmp_path / "from-payload")
    last.load_payload(payload)
    while last.epoch < spec.optimization.epochs:
        metrics = last.train_epoch()
        last.score_epoch(metrics)
        last.history.append(metrics.model_dump(mode="json"))
    _assert_same_state(full, last)
    _same_metrics(
        [{**h, "checkpoint_at": None} for h in last.history],
        [{**h, "checkpoint_at": None} for h in full_lines],
    )


def test_request_checkpoint_from_another_thread(tmp_path):
    import threading

    run = TrainingRun(_spec(optimization={"epochs": 1, "batch_size": 32, "lr": 0.05}), out_dir=tmp_path)
    threading.Thread(target=run.request_checkpoint, args=("preempted by job-x",)).start()
    with pytest.raises(CheckpointRequested, match="preempted by job-x"):
        while True:
            run.train_epoch()
    assert (
        run.progress is not None and run.checkpoint_payload()["epoch_progress"]["step"] == run.progress.step
    )
