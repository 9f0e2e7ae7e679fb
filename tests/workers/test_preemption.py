"""A training job preempted the way the scheduler does it, on the session's real Ray head: the Ray job
(`python -m workers.run --job-id X`) is stopped with JobSubmissionClient.stop_job mid-epoch; the
driver's SIGTERM handler has the Ray Train worker report a just-in-time checkpoint and write
preempted.json; run again under the same id, the job finishes with each epoch once in metrics.jsonl
and final weights equal to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

from api_schemas.presets import get_preset
from trainer.checkpoint import read_checkpoint
from trainer.loop import TrainingRun
from workers.preemption import PREEMPTED_FILE
from workers.settings import StoreSettings
from workers.storage import open_store
from workers.training import absolute_paths

REPO = Path(__file__).resolve().parents[2]
SPEC = [
    "optimization.epochs=3",
    "optimization.schedule.milestones=[2]",
    "optimization.weight_averaging={decay: 0.9}",
    "threat_model.steps=3",
    "runtime.progress=false",
    "runtime.device=cpu",
    "evaluation.attacks=[{kind: fgsm}]",
    "evaluation.n_examples=64",
    "evaluation.on_best=false",
    "checkpoint.every_n_epochs=1",
    "resources.num_workers=1",
    "resources.cpus_per_worker=1",
]
TIMINGS = {"seconds", "images_per_second", "checkpoint_at", "extra"}


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_stopped_job_saves_mid_epoch_and_resumes_exactly(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    settings = StoreSettings(_env_file=None, artifact_store=f"file://{tmp_path / 'store'}")
    store = open_store(settings)
    spec = absolute_paths(get_preset("digits", SPEC), base=REPO)
    job = "preempt1"
    prefix = f"experiments/{job}/main/"
    store.put_json(f"experiments/{job}/spec.json", spec.model_dump(mode="json"))
    client = JobSubmissionClient(ray_cluster)
    env = {**settings.as_env(), "RAY_JOB_STOP_WAIT_TIME_S": "120", "OMP_NUM_THREADS": "1"}
    entrypoint = f"cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} -m workers.run --job-id {job}"

    def submit(attempt: int) -> str:
        return client.submit_job(
            entrypoint=entrypoint, submission_id=f"{job}-a{attempt}", runtime_env={"env_vars": env}
        )

    def status(sid: str) -> JobStatus:
        return client.get_job_status(sid)

    def lines() -> list[dict]:
        if not store.exists(prefix + "metrics.jsonl"):
            return []
        return [json.loads(line) for line in store.get_bytes(prefix + "metrics.jsonl").decode().splitlines()]

    first = submit(1)
    try:
        _wait(lambda: len(lines()) >= 1 or status(first).is_terminal(), 240, "epoch 1's metrics")
    finally:
        assert lines(), client.get_job_logs(first)
    stopped_at = time.time()
    assert client.stop_job(first)
    # a generous grace: on a loaded machine the checkpoint must not lose the race with SIGKILL
    _wait(lambda: status(first).is_terminal(), 150, "the stopped job to end")
    logs = client.get_job_logs(first)
    assert status(first) == JobStatus.STOPPED, logs
    assert "just-in-time checkpoint reported" in logs, logs
    assert store.exists(prefix + PREEMPTED_FILE), logs
    marker = store.get_json(prefix + PREEMPTED_FILE)
    assert marker["saved_at"] == marker["checkpoint_at"] >= stopped_at - 1
    assert marker["epoch"] >= 1 and marker["step"] >= 0 and "SIGTERM" in marker["reason"]
    events = [json.loads(e) for e in store.get_bytes(prefix + "events.jsonl").decode().splitlines()]
    assert any(e["event"] == "checkpoint" and e["kind"] == "preempted" for e in events), events
    assert any(k.startswith(prefix + "ray/checkpoint_") for k in (o.key for o in store.list(prefix)))
    assert not store.exists(prefix + "summary.json")

    second = submit(2)
    _wait(lambda: status(second).is_terminal(), 300, "the resumed job to end")
    assert status(second) == JobStatus.SUCCEEDED, client.get_job_logs(second)
    events = [json.loads(e) for e in store.get_bytes(prefix + "events.jsonl").decode().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and (resumed[0]["epoch"], resumed[0]["step"]) == (marker["epoch"], marker["step"])

    # an uninterrupted run of the same spec in this process: the same weights, the same metrics
    reference = TrainingRun(spec, out_dir=tmp_path / "reference")
    reference.fit(evaluate_at_end=False)
    stored = tmp_path / "last.pt"
    store.get_file(prefix + "checkpoints/last.pt", stored)
    payload = read_checkpoint(stored)
    for key, value in reference.robust.state_dict().items():
        assert torch.equal(payload["robust"][key], value), key
    for key, value in reference.averaged.state_dict().items():
        assert torch.equal(payload["robust_ema"][key], value), key
    got = lines()
    assert [line["epoch"] for line in got] == [1, 2, 3]
    assert all(line["checkpoint_at"] for line in got)
    want = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]  # noqa: E731
    assert strip(got) == strip(want)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    os.environ.get("OMP_NUM_THREADS")
