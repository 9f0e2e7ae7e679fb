"""Evaluation jobs end to end: HTTP -> service -> the queue -> Ray (shards on Ray workers) -> SeaweedFS.

Two digits models train through the service; their checkpoints are then evaluated under the digits
protocol as evaluation jobs: sharded over 2 workers and over 1 (identical records), stopped after a
shard and retried (only the missing shards run), strengthened with an added attack, transferred
between the two models, uploaded as a file, and exported in RobustBench's format. Every number of a
summary is recomputed here from the per-example records downloaded from the store.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from api_schemas.evaluations import summarize
from tests.e2e.conftest import LocalService, auth
from tests.e2e.test_service import digits_spec, state_is, submit
from tests.waiting import wait_for

SHARD = 150  # the digits test split has 450 images: 3 shards


@pytest.fixture
def database_url(tmp_path) -> Iterator[str]:
    """SQLite only: the evaluation flow does not depend on the backend (both run in tests/service)."""
    from tests.databases import database

    with database("sqlite", tmp_path) as url:
        yield url


@pytest.fixture
def eval_service(service_env, tmp_path) -> Iterator[LocalService]:
    env = {**service_env, "LBGAT_MAX_RUNNING_JOBS": "2", "LBGAT_USER_MAX_RUNNING_JOBS": "2"}
    proc = LocalService(env, tmp_path / "service.log").start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()


def _evaluate(client: httpx.Client, token: str, body: dict, expect: int = 201) -> dict:
    r = client.post("/v1/evaluations", json=body, headers=auth(token))
    assert r.status_code == expect, r.text
    return r.json()


def _finished(client, token, job_id, timeout_s=240) -> dict:
    body = wait_for(
        state_is(client, token, job_id, "succeeded", "failed", "cancelled"),
        timeout_s=timeout_s,
        what=f"{job_id} finished",
        interval_s=0.3,
    )
    assert body["state"] == "succeeded", (body.get("error"), body.get("error_log_tail"))
    r = client.get(f"/v1/evaluations/{job_id}", headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()


def _records(client, token, job_id) -> tuple[dict[str, np.ndarray], list[dict]]:
    """All shards' records and infos of an evaluation, downloaded through the artifacts API."""
    listing = client.get(f"/v1/experiments/{job_id}/artifacts", headers=auth(token)).json()
    npz = sorted(
        a["path"] for a in listing if a["path"].startswith("eval/shards/") and a["path"].endswith(".npz")
    )
    arrays: dict[str, list[np.ndarray]] = {}
    infos = []
    for path in npz:
        r = client.get(f"/v1/experiments/{job_id}/artifacts/{path}", headers=auth(token))
        assert r.status_code == 200, r.text
        with np.load(io.BytesIO(r.content)) as data:
            for key in ("index", "label", "clean", "robust", "broken_by"):
                arrays.setdefault(key, []).append(data[key])
        r = client.get(f"/v1/experiments/{job_id}/artifacts/{path[:-4]}.json", headers=auth(token))
        infos.append(r.json())
    return {k: np.concatenate(v) for k, v in arrays.items()}, infos


def _check_summary(summary: dict, records: dict[str, np.ndarray]) -> None:
    """Every number of the summary follows from the records."""
    attacks = [{"label": a["name"], "kind": a["kind"], **a["params"]} for a in summary["attacks"]]
    incremental = [i for i, a in enumerate(summary["attacks"]) if a["incremental"]]
    again = summarize(
        labels=records["label"].tolist(),
        clean=records["clean"].astype(bool).tolist(),
        robust=records["robust"].tolist(),
        attacks=attacks,
        incremental_from=incremental[0] if incremental else None,
        **{
            k: summary[k]
            for k in summary
            if k not in ("clean_accuracy", "attacks", "autoattack_accuracy", "robust_accuracy")
            and k not in ("worst_attack", "nrr", "n_examples")
        },
    )
    mine = again.model_dump(mode="json")
    for key in (
        "clean_accuracy",
        "robust_accuracy",
        "autoattack_accuracy",
        "nrr",
        "n_examples",
        "worst_attack",
    ):
        assert mine[key] == pytest.approx(summary[key]), key
    assert [(a["name"], a["accuracy"], a["n_attacked"]) for a in mine["attacks"]] == [
        (a["name"], pytest.approx(a["accuracy"]), a["n_attacked"]) for a in summary["attacks"]
    ]
    assert np.array_equal(np.sort(records["index"]), np.arange(summary["n_examples"]))


def _train_two(client, token) -> tuple[str, str]:
    ids = [
        submit(client, token, digits_spec(f"eval-src-{i}", f"seed={i}", "evaluation.n_examples=100"))["id"]
        for i in range(2)
    ]
    for exp_id in ids:
        body = wait_for(
            state_is(client, token, exp_id, "succeeded", "failed", "cancelled"),
            timeout_s=300,
            what=f"{exp_id} trained",
            interval_s=0.5,
        )
        assert body["state"] == "succeeded", body.get("error_log_tail")
    return ids[0], ids[1]


def test_evaluation_jobs_shard_resume_strengthen_transfer_upload_export(
    eval_service: LocalService, service_env
):
    admin = service_env["LBGAT_ADMIN_TOKEN"]
    with httpx.Client(base_url=eval_service.url, timeout=60) as client:
        a, b = _train_two(client, admin)
        cpu = {"gpus_per_worker": 0, "cpus_per_worker": 1, "use_gpu": False}

        # 2 workers, 3 shards, through REST; SSE-visible progress; records reproduce the summary
        two = _evaluate(
            client,
            admin,
            {"target": {"experiment": a, "weights": "best"}, "protocol": "digits", "shard_size": SHARD,
             "resources": {"num_workers": 2, **cpu}},
        )  # fmt: skip
        done2 = _finished(client, admin, two["id"])
        summary2 = done2["summary"]
        assert summary2["protocol_id"] == "digits" and summary2["protocol_version"] == "1"
        assert summary2["n_shards"] == 3 and summary2["n_examples"] == 450 and summary2["partial"] is False
        assert len(summary2["checkpoint_sha256"]) == 64
        rec2, infos2 = _records(client, admin, two["id"])
        _check_summary(summary2, rec2)
        assert sorted(i["shard"] for i in infos2) == [0, 1, 2] and {i["attempt"] for i in infos2} == {1}
        # progress rows (what the SSE stream shows): one per shard, ending with all shards done
        progress = done2["progress"]
        assert [p["shards_done"] for p in progress] == [1, 2, 3] and progress[-1]["n_shards"] == 3

        # 1 worker, stopped after its first shard, then retried: only the other shards run
        one = _evaluate(
            client,
            admin,
            {"target": {"experiment": a, "weights": "best"}, "protocol": "digits", "shard_size": SHARD,
             "resources": {"num_workers": 1, **cpu}},
        )  # fmt: skip

        def first_shard_done():
            listing = client.get(f"/v1/experiments/{one['id']}/artifacts", headers=auth(admin)).json()
            return any(x["path"] == "eval/shards/00000.json" for x in listing)

        wait_for(first_shard_done, timeout_s=180, what="the first shard stored", interval_s=0.1)
        r = client.post(f"/v1/experiments/{one['id']}/cancel", headers=auth(admin))
        assert r.status_code in (200, 202), r.text
        wait_for(state_is(client, admin, one["id"], "cancelled"), timeout_s=60, what="cancelled")
        _, before = _records(client, admin, one["id"])
        assert 1 <= len(before) < 3
        r = client.post(f"/v1/experiments/{one['id']}/retry", headers=auth(admin))
        assert r.status_code in (200, 202), r.text
        done1 = _finished(client, admin, one["id"])
        rec1, infos1 = _records(client, admin, one["id"])
        first_runs = {i["shard"]: i["attempt"] for i in before}
        computed_again = [
            i["shard"] for i in infos1 if i["attempt"] != first_runs.get(i["shard"], i["attempt"])
        ]
        assert computed_again == [], "a stored shard was computed again"
        assert len([i for i in infos1 if i["shard"] not in first_runs]) == 3 - len(before)
        # sharding and resumption change no number: 1 worker == 2 workers, per example
        for key in ("index", "label", "clean", "robust", "broken_by"):
            assert np.array_equal(rec1[key], rec2[key]), key
        keep = ("clean_accuracy", "robust_accuracy", "autoattack_accuracy", "attacks", "nrr")
        assert {k: done1["summary"][k] for k in keep} == {k: summary2[k] for k in keep}

        # an added attack runs on the still-robust examples only
        stronger = _evaluate(
            client,
            admin,
            {"target": {"experiment": a, "weights": "best"}, "extends": two["id"],
             "add_attacks": [{"kind": "pgd", "steps": 50, "step_size": 0.005, "name": "pgd50"}],
             "resources": {"num_workers": 2, **cpu}},
        )  # fmt: skip
        s3 = _finished(client, admin, stronger["id"])["summary"]
        added = s3["attacks"][-1]
        assert added["name"] == "pgd50" and added["incremental"] is True
        assert added["n_attacked"] == round(summary2["robust_accuracy"] * 450)
        assert all(s3["robust_accuracy"] <= x["accuracy"] + 1e-12 for x in s3["attacks"])
        assert s3["robust_accuracy"] <= summary2["robust_accuracy"]
        rec3, infos3 = _records(client, admin, stronger["id"])
        assert all(i["reused_attacks"] == len(summary2["attacks"]) for i in infos3)
        assert np.array_equal(rec3["robust"][:, :-1], rec2["robust"])
        _check_summary(s3, rec3)

        # transfer: PGD made on b, applied to a
        r = client.post(
            "/v1/evaluations",
            json={"target": {"experiment": a}, "transfer_from": {"experiment": b},
                  "suite": {"threat_model": {"eps": 0.1, "step_size": 0.01, "steps": 20},
                            "attacks": [{"kind": "transfer", "source_checkpoint": "transfer_from",
                                         "steps": 20, "step_size": 0.01}],
                            "shard_size": 450},
                  "resources": {"num_workers": 1, **cpu}},
            headers=auth(admin),
        )  # fmt: skip
        assert r.status_code == 201, r.text
        transfer = _finished(client, admin, r.json()["id"])["summary"]
        assert transfer["transfer_source"] and transfer["protocol_id"] == "custom"
        # black-box transfer is weaker than the white-box PGD-20 of the same size
        white = next(x for x in summary2["attacks"] if x["name"] == "pgd20")
        assert transfer["attacks"][0]["accuracy"] >= white["accuracy"]

        # the same checkpoint uploaded as a file: stored once by its sha256, same records
        best = client.get(f"/v1/experiments/{a}/artifacts/main/checkpoints/best.pt", headers=auth(admin))
        assert best.status_code == 200
        up = client.post(
            "/v1/checkpoints",
            content=best.content,
            headers={**auth(admin), "Content-Type": "application/octet-stream"},
        )
        assert up.status_code in (200, 201), up.text
        assert up.json()["sha256"] == summary2["checkpoint_sha256"]
        again = client.post(
            "/v1/checkpoints",
            content=best.content,
            headers={**auth(admin), "Content-Type": "application/octet-stream"},
        )
        assert again.status_code in (200, 201) and again.json()["created"] is False
        uploaded = _evaluate(
            client,
            admin,
            {"target": {"sha256": summary2["checkpoint_sha256"]}, "protocol": "digits", "shard_size": SHARD,
             "resources": {"num_workers": 2, **cpu}},
        )  # fmt: skip
        done_up = _finished(client, admin, uploaded["id"])
        assert {k: done_up["summary"][k] for k in keep} == {k: summary2[k] for k in keep}

        # another team sees none of it and cannot reach the checkpoint
        r = client.post("/v1/users", json={"name": "mallory", "team": "other"}, headers=auth(admin))
        assert r.status_code == 201, r.text
        mallory = r.json()["token"]["token"]
        r = client.post(
            "/v1/evaluations",
            json={"target": {"sha256": summary2["checkpoint_sha256"]}, "protocol": "digits"},
            headers=auth(mallory),
        )
        assert r.status_code == 422 and any("sha256" in str(e["loc"]) for e in r.json()["errors"]), r.text
        assert client.get(f"/v1/evaluations/{two['id']}", headers=auth(mallory)).status_code == 404

        # the leaderboard of the digits protocol, and the RobustBench export of a row
        r = client.get("/v1/results/leaderboard", params={"protocol": "digits"}, headers=auth(admin))
        assert r.status_code == 200, r.text
        rows = r.json()
        assert {row["evaluation_id"] for row in rows} >= {two["id"], one["id"], uploaded["id"]}
        assert all(row["protocol_id"] == "digits" and row["protocol_version"] == "1" for row in rows)
        r = client.get(
            f"/v1/results/{two['id']}/export", params={"format": "robustbench"}, headers=auth(admin)
        )
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["clean_acc"] == f"{100 * summary2['clean_accuracy']:.2f}"
        assert info["autoattack_acc"] == f"{100 * summary2['autoattack_accuracy']:.2f}"
        assert json.dumps(info)
