"""Evaluation jobs on a real local Ray (token auth) with real S3 (SeaweedFS): sharding changes no
record, a stopped job resumes from its stored shards, added attacks run on the still-robust examples,
transfer, and a crafted checkpoint is refused before anything runs."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from api_schemas.evaluations import EvaluationJobSpec, EvaluationSummary, ShardInfo
from api_schemas.protocols import EvaluationSuite, custom_protocol_version
from tests.trainer.helpers import digits_spec
from tests.waiting import wait_for
from trainer.checkpoint import read_checkpoint
from workers import run as entry
from workers.evaluation import (
    job_attempt,
    npz_arrays,
    progress_key,
    run_evaluation,
    shard_key,
    summary_key,
)
from workers.storage import experiment_prefix, open_store

pytestmark = pytest.mark.usefixtures("ray_cluster")

REPO = Path(__file__).resolve().parents[2]
THREAT = {"norm": "linf", "eps": 0.1, "step_size": 0.02, "steps": 10}
#: the run-to-run varying parts of a summary
VARYING = {"evaluation_id", "seconds", "provenance"}


def _suite(attacks, n_examples=200, shard_size=100) -> EvaluationSuite:
    return EvaluationSuite(
        threat_model=THREAT, attacks=attacks, n_examples=n_examples, shard_size=shard_size, batch_size=100
    )


WHITE_BOX = [
    {"kind": "fgsm"},
    {"kind": "pgd", "steps": 10, "step_size": 0.02},
    {"kind": "autoattack", "version": "custom", "attacks": ["apgd-ce"]},
]


def _train(tmp: Path, seed: int) -> Path:
    """A natural tiny_cnn on digits, trained in this process by the trainer for a few hundred steps."""
    from trainer.loop import TrainingRun

    spec = digits_spec(
        {"name": "natural"},
        seed=seed,
        optimization={"lr": 0.05, "batch_size": 32, "epochs": 6, "schedule": {"kind": "constant"}},
    )
    TrainingRun(spec, out_dir=tmp).fit(evaluate_at_end=False)
    return tmp / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, bytes]:
    return {
        name: _train(tmp_path_factory.mktemp(name), seed).read_bytes()
        for name, seed in (("target", 0), ("source", 1))
    }


def _upload(store, data: bytes) -> tuple[str, str]:
    sha = hashlib.sha256(data).hexdigest()
    key = f"checkpoints/{sha}.pt"
    store.put_bytes(key, data)
    return key, sha


def _job(store, job_id: str, checkpoint: bytes, suite: EvaluationSuite, **fields) -> EvaluationJobSpec:
    key, sha = _upload(store, checkpoint)
    spec = EvaluationJobSpec(
        name=job_id,
        protocol_id="custom",
        protocol_version=custom_protocol_version(suite),
        suite=suite,
        dataset={"name": "digits"},
        checkpoint={"key": key, "sha256": sha, "label": "digits/natural"},
        cpus_per_worker=1,
        cpu_threads=1,
        **fields,
    )
    store.put_json(experiment_prefix(job_id) + "spec.json", spec.model_dump(mode="json"))
    return spec


def _shards(store, job_id: str, n: int) -> list[tuple[ShardInfo, dict[str, np.ndarray]]]:
    out = []
    for k in range(n):
        info = ShardInfo.model_validate(store.get_json(shard_key(job_id, k, "json")))
        out.append((info, npz_arrays(store.get_bytes(shard_key(job_id, k, "npz")))))
    return out


def _numbers(summary: EvaluationSummary) -> dict:
    return summary.model_dump(mode="json", exclude=VARYING)


def test_one_and_two_workers_give_identical_records(s3_env, checkpoints):
    store = open_store(s3_env)
    suite = _suite(WHITE_BOX)
    one = _job(store, "ev-w1", checkpoints["target"], suite, num_workers=1)
    two = _job(store, "ev-w2", checkpoints["target"], suite, num_workers=2)
    s1 = run_evaluation(one, evaluation_id="ev-w1", store=store, settings=s3_env, attempt=1)
    s2 = run_evaluation(two, evaluation_id="ev-w2", store=store, settings=s3_env, attempt=1)

    for (info1, rec1), (info2, rec2) in zip(
        _shards(store, "ev-w1", 2), _shards(store, "ev-w2", 2), strict=True
    ):
        assert (info1.start, info1.stop) == (info2.start, info2.stop)
        assert set(rec1) == {"index", "label", "clean", "robust", "broken_by"}
        for name in rec1:
            np.testing.assert_array_equal(rec1[name], rec2[name], err_msg=name)
        assert rec1["robust"].dtype == np.int8 and rec1["broken_by"].dtype == np.int16
        assert info1.attacks == ["fgsm", "pgd10", "autoattack_custom"] and info1.attempt == 1
    assert _numbers(s1) == _numbers(s2)

    # the summary is what the stored records say, number by number
    records = [r for _, r in _shards(store, "ev-w1", 2)]
    clean = np.concatenate([r["clean"] for r in records])
    robust = np.concatenate([r["robust"] for r in records])
    np.testing.assert_array_equal(np.concatenate([r["index"] for r in records]), np.arange(200))
    # a custom suite of 200 examples: those are its full set
    assert s1.n_examples == 200 and s1.n_total == 200 and not s1.partial and s1.n_shards == 2
    assert s1.clean_accuracy == clean.mean() > 0.8
    for j, attack in enumerate(s1.attacks):
        assert attack.accuracy == (robust[:, j] == 1).mean() and attack.n_attacked == 200
    assert 0 < s1.robust_accuracy == (clean & (robust == 1).all(1)).mean()
    assert s1.robust_accuracy <= min(a.accuracy for a in s1.attacks)
    assert s1.autoattack_accuracy == s1.attacks[2].accuracy
    assert s1.checkpoint_sha256 == one.checkpoint.sha256 and s1.protocol_id == "custom"
    assert EvaluationSummary.model_validate(store.get_json(summary_key("ev-w1"))) == s1
    progress = [json.loads(line) for line in store.get_bytes(progress_key("ev-w2")).decode().splitlines()]
    assert [p["shards_done"] for p in progress] == [1, 2] and progress[-1]["n_shards"] == 2
    assert progress[-1]["accuracy"]["clean"] == pytest.approx(s1.clean_accuracy)
    assert progress[-1]["accuracy"]["robust"] == pytest.approx(s1.robust_accuracy)


def _submit(ray_head, job_id: str, attempt: int, env: dict[str, str]) -> tuple[object, str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url)
    submission = client.submit_job(
        entrypoint=f"cd {REPO} && {sys.executable} -m workers.run --job-id {job_id}",
        submission_id=f"{job_id}-a{attempt}",
        runtime_env={"env_vars": env},
        entrypoint_num_cpus=0,
    )
    return client, submission


def test_a_stopped_job_resumes_from_its_stored_shards(s3_env, checkpoints, ray_head, caplog, monkeypatch):
    store = open_store(s3_env)
    suite = _suite(WHITE_BOX, n_examples=180, shard_size=60)
    _job(store, "ev-stop", checkpoints["target"], suite, num_workers=1)
    reference = _job(store, "ev-whole", checkpoints["target"], suite, num_workers=1)

    # a Ray job as the scheduler submits attempt 2 (submission id ev-stop-a2), stopped after one shard
    env = {**s3_env.as_env(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    client, submission = _submit(ray_head, "ev-stop", 2, env)
    wait_for(lambda: store.exists(shard_key("ev-stop", 0, "json")), timeout_s=120, what="the first shard")
    client.stop_job(submission)
    wait_for(lambda: client.get_job_status(submission).is_terminal(), timeout_s=60, what="the job to stop")
    time.sleep(2)  # the job's actors die with their driver
    stored = {k for k in range(3) if store.exists(shard_key("ev-stop", k, "json"))}
    assert 0 in stored and len(stored) < 3, stored
    first = ShardInfo.model_validate(store.get_json(shard_key("ev-stop", 0, "json")))
    assert first.attempt == 2  # read from the Ray job's submission id

    # attempt 3 computes only the shards not stored
    monkeypatch.setenv("LBGAT_ATTEMPT", "3")
    with caplog.at_level(logging.INFO, logger="workers.evaluation"):
        assert entry.main(["--job-id", "ev-stop"]) == 0
    infos = [info for info, _ in _shards(store, "ev-stop", 3)]
    assert {k for k, info in enumerate(infos) if info.attempt == 2} == stored
    assert {k for k, info in enumerate(infos) if info.attempt == 3} == {0, 1, 2} - stored
    assert infos[0] == first
    assert f"{len(stored)} already stored, {3 - len(stored)} to run" in caplog.text
    done_lines = [r.getMessage() for r in caplog.records if " done: " in r.getMessage()]
    assert len(done_lines) == 3 - len(stored), done_lines

    resumed = EvaluationSummary.model_validate(store.get_json(summary_key("ev-stop")))
    whole = run_evaluation(reference, evaluation_id="ev-whole", store=store, settings=s3_env, attempt=1)
    assert _numbers(resumed) == _numbers(whole)
    assert resumed.provenance["attempts"] == [2, 3]


def test_an_added_attack_runs_on_the_still_robust_examples_only(s3_env, checkpoints):
    store = open_store(s3_env)
    base_suite = _suite(WHITE_BOX[:2], n_examples=150, shard_size=75)
    _job(store, "ev-base", checkpoints["target"], base_suite, num_workers=2)
    base = run_evaluation(
        EvaluationJobSpec.model_validate(store.get_json(experiment_prefix("ev-base") + "spec.json")),
        evaluation_id="ev-base",
        store=store,
        settings=s3_env,
        attempt=1,
    )
    added = {"kind": "pgd", "steps": 20, "step_size": 0.01, "loss": "cw"}
    suite = _suite([*WHITE_BOX[:2], added], n_examples=150, shard_size=75)
    spec = _job(
        store,
        "ev-more",
        checkpoints["target"],
        suite,
        num_workers=2,
        base={"evaluation_id": "ev-base", "n_attacks": 2},
    )
    more = run_evaluation(spec, evaluation_id="ev-more", store=store, settings=s3_env, attempt=1)

    for (base_info, old), (info, new) in zip(
        _shards(store, "ev-base", 2), _shards(store, "ev-more", 2), strict=True
    ):
        assert info.reused_attacks == 2 and info.attacks == ["fgsm", "pgd10", "cw20"]
        np.testing.assert_array_equal(new["robust"][:, :2], old["robust"])
        np.testing.assert_array_equal(new["clean"], old["clean"])
        still = old["clean"] & (old["robust"] == 1).all(1)
        assert (new["robust"][~still, 2] == -1).all() and set(new["robust"][still, 2]) <= {0, 1}
        assert info.attack_seconds["fgsm"] == 0.0 and base_info.attack_seconds["fgsm"] > 0
    assert [a.incremental for a in more.attacks] == [False, False, True]
    assert more.attacks[2].n_attacked == sum(
        int(((o["clean"]) & (o["robust"] == 1).all(1)).sum()) for _, o in _shards(store, "ev-base", 2)
    )
    assert more.robust_accuracy <= min(a.accuracy for a in more.attacks)
    assert more.robust_accuracy <= base.robust_accuracy
    assert more.clean_accuracy == base.clean_accuracy


def test_transfer_from_a_source_model(s3_env, checkpoints):
    store = open_store(s3_env)
    key, sha = _upload(store, checkpoints["source"])
    transfer = {"kind": "transfer", "source_checkpoint": "source", "steps": 10, "step_size": 0.02}
    suite = _suite([WHITE_BOX[1], transfer], n_examples=100, shard_size=100)
    spec = _job(
        store,
        "ev-transfer",
        checkpoints["target"],
        suite,
        transfer_source={"key": key, "sha256": sha, "label": "src"},
    )
    summary = run_evaluation(spec, evaluation_id="ev-transfer", store=store, settings=s3_env, attempt=1)
    white, black = summary.attacks
    assert summary.transfer_source == "src" and black.kind == "transfer"
    assert white.accuracy < black.accuracy <= summary.clean_accuracy


def test_a_crafted_checkpoint_is_refused_before_anything_runs(s3_env, checkpoints, tmp_path, capsys):
    from tests.trainer.test_checkpoint_safety import _writes

    store = open_store(s3_env)
    genuine = tmp_path / "genuine.pt"
    genuine.write_bytes(checkpoints["target"])
    payload = read_checkpoint(genuine)
    marker = tmp_path / "ran"
    payload["provenance"]["note"] = _writes(marker)
    crafted = tmp_path / "crafted.pt"
    torch.save(payload, crafted)
    _job(store, "ev-crafted", crafted.read_bytes(), _suite(WHITE_BOX[:1], n_examples=50, shard_size=50))
    assert entry.main(["--job-id", "ev-crafted"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint digits/natural:") and "refused and nothing in it ran" in err
    assert not marker.exists()
    assert not store.list(experiment_prefix("ev-crafted") + "eval/")

    # a checkpoint whose bytes are not the sha256 the job names is refused too
    spec = _job(store, "ev-sha", checkpoints["target"], _suite(WHITE_BOX[:1], n_examples=50, shard_size=50))
    data = spec.model_dump(mode="json")
    data["checkpoint"]["sha256"] = "0" * 64
    store.put_json(experiment_prefix("ev-sha") + "spec.json", data)
    assert entry.main(["--job-id", "ev-sha"]) == 2
    assert "has sha256" in capsys.readouterr().err


def test_the_attempt_comes_from_the_scheduler(monkeypatch):
    assert job_attempt({}) == 1
    assert job_attempt({"LBGAT_ATTEMPT": "3"}) == 3
    config = json.dumps({"metadata": {"job_submission_id": "ev-1-a4"}})
    assert job_attempt({"RAY_JOB_CONFIG_JSON_ENV_VAR": config}) == 4


def test_a_training_summary_names_its_protocol():
    from api_schemas.presets import get_preset
    from workers.train_worker import training_protocol

    assert training_protocol(get_preset("digits", ["evaluation={protocol: digits}"])) == ("digits", "1")
    spec = get_preset("digits")
    protocol_id, version = training_protocol(spec)
    suite = EvaluationSuite.model_construct(
        threat_model=spec.threat_model, attacks=spec.evaluation.attacks, n_examples=spec.evaluation.n_examples
    )
    assert protocol_id == "custom" and version == custom_protocol_version(suite)
    # an inline suite an evaluation job could also run gets the version that job's results carry
    plain = get_preset("digits", ["evaluation.attacks=[{kind: fgsm}]", "evaluation.n_examples=100"])
    job_suite = EvaluationSuite(threat_model=plain.threat_model, attacks=[{"kind": "fgsm"}], n_examples=100)
    assert training_protocol(plain) == ("custom", custom_protocol_version(job_suite))


def test_a_protocols_full_set_decides_partial():
    from api_schemas.protocols import get_protocol
    from workers.evaluation import full_size

    protocol = get_protocol("digits")
    fewer = protocol.suite.model_copy(update={"n_examples": 100})
    spec = EvaluationJobSpec(
        name="p",
        protocol_id="digits",
        protocol_version="1",
        suite=fewer,
        dataset={"name": "digits"},
        checkpoint={"key": "checkpoints/x.pt"},
    )
    assert full_size(spec, 450) == 450 and spec.n_examples(450) == 100  # partial
    custom = spec.model_copy(update={"protocol_id": "custom", "protocol_version": "abc"})
    assert full_size(custom, 450) == 100  # an explicit suite's own n_examples is its full set
    synthetic = custom.model_copy(update={"dataset": custom.dataset.model_copy(update={"name": "synthetic"})})
    assert full_size(synthetic, 64) == 64
