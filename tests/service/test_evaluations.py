"""Evaluation jobs through the REST API (a real server, SQLite and PostgreSQL, no Ray): requests are
resolved and checked before anything is queued, the job shares the queue with training, results come
back through the scheduler's ingestion as (checkpoint, protocol) rows, and the leaderboard, export,
transfer matrix and bulk re-evaluation read those rows, each team seeing only its own."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from api_schemas.jobs import JobState
from api_schemas.presets import PRESETS
from api_schemas.protocols import PROTOCOLS, Protocol, get_protocol
from service.db.models import EvalResult, Experiment
from tests.service.conftest import Api, Person, digits_spec
from tests.service.evaluations_helpers import (
    evaluate,
    finish_evaluation,
    job_spec,
    move,
    progress,
    trained,
)


def errors_of(r: Any) -> list[str]:
    assert r.status_code == 422, r.text
    return [e["loc"] for e in r.json()["errors"]]


def cifar_spec(name: str) -> dict[str, Any]:
    import copy

    spec = copy.deepcopy(PRESETS["trades-a6-cifar10"].data)
    spec["name"] = name
    return spec


def _team_id(api: Api, person: Person) -> int:
    from service.db.models import Team

    with api.sessions() as session:
        return session.scalar(select(Team.id).where(Team.name == person.team))


# -- protocols ---------------------------------------------------------------------------------------


def test_protocols_are_listed_and_shown(api: Api) -> None:
    alice = api.person()
    listed = alice.http.get("/v1/protocols").json()
    keys = {f"{p['id']}@{p['version']}" for p in listed}
    assert {"robustbench-linf@1", "robustbench-l2@1", "lbgat@1", "cat@1", "raat@1", "digits@1"} <= keys
    shown = alice.http.get("/v1/protocols/lbgat@1").json()
    assert Protocol.model_validate(shown) == get_protocol("lbgat@1")
    assert alice.http.get("/v1/protocols/lbgat").json()["version"] == 1
    r = alice.http.get("/v1/protocols/no-such")
    assert r.status_code == 404 and "known:" in r.json()["detail"]
    assert api.client().get("/v1/protocols").status_code == 401


# -- submission --------------------------------------------------------------------------------------


def test_an_evaluation_is_a_job_of_the_queue_with_everything_resolved(api: Api) -> None:
    alice = api.person()
    exp = trained(api, alice, "src", selection_split="test")
    out = evaluate(
        alice,
        {"experiment": exp, "weights": "best"},
        protocol="digits",
        n_examples=100,
        shard_size=50,
        resources={"num_workers": 2, "gpus_per_worker": 0.5, "cpus_per_worker": 2},
        priority=5,
        tags=["table4"],
    )
    assert (out["kind"], out["state"], out["priority"], out["tags"]) == (
        "evaluation",
        "queued",
        5,
        ["table4"],
    )
    assert (out["protocol_id"], out["protocol_version"], out["weights"]) == ("digits", "1", "best")
    assert (out["source_experiment"], out["target"]) == (exp, f"{exp}:best")
    assert (out["gpus"], out["cpus"], out["dataset"], out["method"], out["norm"]) == (
        1.0,
        4.0,
        "digits",
        "lbgat",
        "linf",
    )

    spec = job_spec(api, out["id"])
    digits = get_protocol("digits@1")
    assert spec.suite.attacks == digits.suite.attacks  # pinned to the version
    assert (spec.suite.n_examples, spec.suite.shard_size) == (100, 50)
    assert spec.dataset.name == "digits" and spec.dataset == job_spec_source_dataset(api, exp)
    assert spec.checkpoint.key == f"experiments/{exp}/main/checkpoints/best.pt"
    assert spec.checkpoint.weights == "model" and spec.checkpoint.model is None
    assert (spec.target_weights, spec.training_precision, spec.selection_split) == ("best", "fp32", "test")
    assert (spec.num_workers, spec.gpus_per_worker, spec.cpus_per_worker) == (2, 0.5, 2.0)
    assert spec.base is None and spec.transfer_source is None

    # the same queue: listed with the experiments (kind says which), cancel and retry by its id
    listed = alice.http.get("/v1/experiments").json()["items"]
    assert {(e["id"], e["kind"]) for e in listed} == {(exp, "training"), (out["id"], "evaluation")}
    only = alice.http.get("/v1/experiments", params={"kind": "evaluation"}).json()["items"]
    assert [e["id"] for e in only] == [out["id"]]
    assert [e["id"] for e in alice.http.get("/v1/evaluations").json()["items"]] == [out["id"]]
    detail = alice.http.get(f"/v1/evaluations/{out['id']}").json()
    assert detail["spec"]["kind"] == "evaluation" and detail["queue"]["position"] >= 1
    assert alice.http.get(f"/v1/evaluations/{exp}").status_code == 404  # a training run is no evaluation
    r = alice.http.post(f"/v1/experiments/{out['id']}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    r = alice.http.post(f"/v1/experiments/{out['id']}/retry")
    assert r.status_code == 200 and r.json()["state"] == "queued"

    # averaged weights: last.pt's EMA, where the run kept one
    avg = trained(api, alice, "avg", averaged=True)
    spec = job_spec(api, evaluate(alice, {"experiment": avg, "weights": "averaged"}, protocol="digits")["id"])
    assert (spec.checkpoint.key, spec.checkpoint.weights) == (
        f"experiments/{avg}/main/checkpoints/last.pt",
        "averaged",
    )
    assert spec.selection_split is None  # not the selected checkpoint


def job_spec_source_dataset(api: Api, exp_id: str) -> Any:
    from api_schemas import parse_spec

    with api.sessions() as session:
        return parse_spec(session.get(Experiment, exp_id).spec).dataset


def test_bad_references_are_422_naming_the_field_and_nothing_is_queued(api: Api) -> None:
    alice, bob = api.person(), api.person()
    mine = trained(api, alice, "mine")
    theirs = trained(api, bob, "theirs")
    no_best = trained(api, alice, "nobest", best=False)
    cifar = trained(api, alice, "cifar", spec=cifar_spec("cifar"))
    running = alice.http.post("/v1/experiments", json={"spec": digits_spec("running")}).json()["id"]
    move(api, running, JobState.dispatching, JobState.running)

    def refused(body: dict[str, Any]) -> tuple[list[str], str]:
        r = alice.http.post("/v1/evaluations", json=body)
        return errors_of(r), r.json()["detail"]

    locs, detail = refused({"target": {"experiment": "no-such-exp"}, "protocol": "digits"})
    assert locs == ["body.target.experiment"] and "no experiment 'no-such-exp' in your team" in detail
    # another team's experiment is as unknown as a missing one: no 403, nothing about it revealed
    locs, detail = refused({"target": {"experiment": theirs}, "protocol": "digits"})
    assert locs == ["body.target.experiment"] and detail.endswith(f"no experiment {theirs!r} in your team")
    locs, detail = refused({"target": {"experiment": running}, "protocol": "digits"})
    assert locs == ["body.target.experiment"] and "is running" in detail
    locs, detail = refused({"target": {"experiment": no_best, "weights": "best"}, "protocol": "digits"})
    assert locs == ["body.target.weights"] and "selected no best checkpoint" in detail
    locs, detail = refused({"target": {"experiment": mine, "weights": "averaged"}, "protocol": "digits"})
    assert locs == ["body.target.weights"] and "weight_averaging" in detail
    locs, _ = refused({"target": {"experiment": mine, "trial": "t1"}, "protocol": "digits"})
    assert locs == ["body.target.trial"]
    api.store.delete_prefix(f"experiments/{mine}/main/checkpoints/")
    locs, detail = refused({"target": {"experiment": mine}, "protocol": "digits"})
    assert locs == ["body.target.weights"] and "no best weights in the store" in detail
    mine = trained(api, alice, "mine2")

    locs, detail = refused({"target": {"experiment": mine}, "protocol": "no-such"})
    assert locs == ["body.protocol"] and "unknown protocol 'no-such'" in detail
    locs, detail = refused({"target": {"experiment": mine}, "protocol": "digits@9"})
    assert locs == ["body.protocol"] and "no version 9" in detail
    locs, detail = refused({"target": {"experiment": mine}, "protocol": "robustbench-linf"})
    assert locs == ["body.protocol"] and "not digits" in detail
    locs, detail = refused({"target": {"experiment": cifar}, "protocol": "robustbench-l2"})
    assert locs == ["body.protocol"] and "trained against linf" in detail
    l2_suite = {"threat_model": {"norm": "l2", "eps": 0.5, "step_size": 0.1}, "attacks": [{"kind": "fgsm"}]}
    locs, _ = refused({"target": {"experiment": mine}, "suite": l2_suite})
    assert locs == ["body.suite.threat_model.norm"]
    locs, _ = refused({"target": {"sha256": "ab" * 32}, "protocol": "digits"})
    assert locs == ["body.target.sha256"]
    locs, _ = refused(
        {"target": {"experiment": mine}, "protocol": "digits", "transfer_from": {"experiment": cifar}}
    )
    assert locs == ["body.transfer_from"]
    locs, _ = refused(
        {"target": {"experiment": mine}, "protocol": "digits", "transfer_from": {"experiment": theirs}}
    )
    assert locs == ["body.transfer_from.experiment"]
    # the body's own rules (pydantic): one of protocol/suite, bounds
    locs, _ = refused({"target": {"experiment": mine}})
    assert locs == ["body"]
    locs, _ = refused({"target": {"experiment": mine}, "protocol": "digits", "n_examples": 2**31})
    assert locs == ["body.n_examples"]
    locs, _ = refused({"target": {"experiment": mine}, "protocol": "digits", "resources": {"num_workers": 0}})
    assert locs == ["body.resources.num_workers"]
    with api.sessions() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(Experiment)
                .where(Experiment.kind == "evaluation", Experiment.team_id == _team_id(api, alice))
            )
            == 0
        )


def test_extending_an_evaluation_and_automatic_strengthening(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = api.person()
    exp = trained(api, alice, "strong")
    other = trained(api, alice, "other")
    first = evaluate(alice, exp, protocol="digits@1")["id"]

    extra = [{"kind": "pgd", "steps": 50, "step_size": 0.01, "name": "pgd50"}]
    r = alice.http.post(
        "/v1/evaluations", json={"target": {"experiment": exp}, "extends": first, "add_attacks": extra}
    )
    assert errors_of(r) == ["body.extends"] and "is queued" in r.json()["detail"]  # not finished yet
    finish_evaluation(
        api, first, clean=0.9, attacks={"fgsm": 0.6, "pgd20": 0.5, "cw20": 0.5, "autoattack": 0.45}
    )

    out = evaluate(alice, {"experiment": exp}, extends=first, add_attacks=extra)
    spec = job_spec(api, out["id"])
    old = job_spec(api, first)
    assert spec.base is not None and (spec.base.evaluation_id, spec.base.n_attacks) == (first, 4)
    assert spec.suite.attacks[:4] == old.suite.attacks and spec.suite.attacks[4].label() == "pgd50"
    assert spec.protocol_id == "custom" and len(spec.protocol_version) == 12  # no registered suite
    assert out["extends"] == first

    for body, loc in [
        ({"target": {"experiment": other}, "extends": first, "add_attacks": extra}, "body.extends"),
        ({"target": {"experiment": exp}, "extends": "no-such", "add_attacks": extra}, "body.extends"),
        (
            {"target": {"experiment": exp}, "extends": first, "add_attacks": extra, "n_examples": 10},
            "body.extends",
        ),
        (
            {"target": {"experiment": exp}, "extends": first, "add_attacks": [{"kind": "fgsm"}]},
            "body.add_attacks",
        ),
    ]:
        assert errors_of(alice.http.post("/v1/evaluations", json=body)) == [loc], body

    # digits@2 appends an attack to digits@1: asking for `digits` strengthens the finished @1 run
    v1 = PROTOCOLS[("digits", 1)]
    data = v1.suite.model_dump(mode="json")
    data["attacks"].append({"kind": "pgd", "steps": 100, "step_size": 0.01, "name": "pgd100"})
    suite = type(v1.suite).model_validate(data)
    v2 = v1.model_copy(update={"version": 2, "suite": suite})
    monkeypatch.setitem(PROTOCOLS, ("digits", 2), v2)
    out = evaluate(alice, exp, protocol="digits")
    spec = job_spec(api, out["id"])
    assert (spec.protocol_id, spec.protocol_version) == ("digits", "2")
    assert spec.base is not None and (spec.base.evaluation_id, spec.base.n_attacks) == (first, 4)
    # a different number of examples is not an extension: computed from scratch
    spec = job_spec(api, evaluate(alice, exp, protocol="digits", n_examples=100)["id"])
    assert spec.base is None
    # nor are other weights
    spec = job_spec(api, evaluate(alice, other, protocol="digits")["id"])
    assert spec.base is None
    # extending @1 with exactly @2's added attack is a digits@2 evaluation
    out = evaluate(
        alice,
        exp,
        extends=first,
        add_attacks=[{"kind": "pgd", "steps": 100, "step_size": 0.01, "name": "pgd100"}],
    )
    assert (job_spec(api, out["id"]).protocol_id, job_spec(api, out["id"]).protocol_version) == (
        "digits",
        "2",
    )


def test_progress_arrives_as_metric_events_and_the_summary_as_a_result_row(api: Api) -> None:
    alice = api.person()
    exp = trained(api, alice, "prog")
    job = evaluate(alice, exp, protocol="digits", shard_size=150)["id"]
    move(api, job, JobState.dispatching, JobState.running)
    rows = [
        {"shards_done": 1, "n_shards": 3, "accuracy": {"clean": 0.9, "fgsm": 0.7}},
        {"shards_done": 2, "n_shards": 3, "accuracy": {"clean": 0.91, "fgsm": 0.72}},
    ]
    progress(api, job, rows)
    detail = alice.http.get(f"/v1/evaluations/{job}").json()
    assert (detail["shards_done"], detail["n_shards"], detail["accuracy"]) == (
        2,
        3,
        {"clean": 0.91, "fgsm": 0.72},
    )
    assert [p["shards_done"] for p in detail["progress"]] == [1, 2]
    assert alice.http.get(f"/v1/experiments/{job}/metrics").json()[-1]["shards_done"] == 2
    with alice.http.stream("GET", f"/v1/experiments/{job}/events", params={"after": 0}) as stream:
        seen = []
        for line in stream.iter_lines():
            if line.startswith("event: "):
                seen.append(line[7:])
            if seen.count("metric") == 2:
                break
    assert seen.count("metric") == 2

    summary = _finish_running(api, job)
    detail = alice.http.get(f"/v1/evaluations/{job}").json()
    assert detail["state"] == "succeeded" and detail["summary"]["robust_accuracy"] == summary.robust_accuracy
    result = detail["result"]
    assert (result["evaluation_id"], result["kind"], result["protocol_id"], result["weights"]) == (
        job,
        "evaluation",
        "digits",
        "best",
    )
    assert (result["clean_accuracy"], result["autoattack_accuracy"], result["partial"]) == (0.9, 0.4, False)
    # its experiment row carries the numbers too, but the experiments' board stays training runs only
    assert alice.http.get(f"/v1/experiments/{job}").json()["results"]["autoattack_accuracy"] == 0.4
    board = alice.http.get("/v1/results/leaderboard").json()
    assert [row["experiment_id"] for row in board] == [exp]


def _finish_running(api: Api, job: str) -> Any:
    from api_schemas.evaluations import EvaluationSummary
    from tests.service.evaluations_helpers import scheduler
    from workers.storage import experiment_prefix

    spec = job_spec(api, job)
    summary = EvaluationSummary(
        evaluation_id=job,
        protocol_id=spec.protocol_id,
        protocol_version=spec.protocol_version,
        checkpoint_sha256="",
        dataset="digits",
        norm="linf",
        eps=0.1,
        n_examples=450,
        n_total=450,
        partial=False,
        clean_accuracy=0.9,
        attacks=[
            {"name": "autoattack", "kind": "autoattack", "accuracy": 0.4, "n_attacked": 450, "nrr": 0.55}
        ],
        autoattack_accuracy=0.4,
        robust_accuracy=0.4,
        nrr=0.55,
        seed=0,
        shard_size=150,
        n_shards=3,
        training_precision="fp32",
        selection_split="heldout",
    )
    api.store.put_json(experiment_prefix(job) + "eval/summary.json", summary.model_dump(mode="json"))
    scheduler(api)._succeeded(job)
    return summary


# -- results -----------------------------------------------------------------------------------------


def test_leaderboard_ranks_one_protocol_at_a_time(api: Api) -> None:
    rita, sam = api.person(), api.person()
    sam_same_team = api.person(rita.team)
    a = trained(api, rita, "a", aa=0.50, summary_extra={"protocol_id": "digits", "protocol_version": "1"})
    b = trained(api, sam_same_team, "b", selection_split="test")
    c = trained(api, rita, "c")
    outsider = trained(api, sam, "outsider")

    # a: its training run reported under digits@1 (from its summary) -> a row already
    full_b = evaluate(sam_same_team, b, protocol="digits")["id"]
    finish_evaluation(api, full_b, clean=0.8, attacks={"pgd20": 0.6}, aa=0.48)
    partial_c = evaluate(rita, c, protocol="digits", n_examples=100)["id"]
    finish_evaluation(api, partial_c, clean=0.95, attacks={"pgd20": 0.9}, aa=0.9, n_total=450)
    custom = evaluate(
        rita, c, suite={"threat_model": {"eps": 0.1, "step_size": 0.01}, "attacks": [{"kind": "fgsm"}]}
    )["id"]
    finish_evaluation(api, custom, clean=0.95, attacks={"fgsm": 0.99})
    theirs = evaluate(sam, outsider, protocol="digits")["id"]
    finish_evaluation(api, theirs, clean=0.99, attacks={"pgd20": 0.99}, aa=0.99)

    def board(**params: Any) -> list[dict[str, Any]]:
        r = rita.http.get("/v1/results/leaderboard", params=params)
        assert r.status_code == 200, r.text
        return r.json()

    rows = board(protocol="digits")
    assert [(r["evaluation_id"], r["rank"]) for r in rows] == [(a, 1), (full_b, 2), (partial_c, 3)]
    assert [r["partial"] for r in rows] == [False, False, True]  # 0.90 partial ranks below 0.48 full
    assert [r["test_selected"] for r in rows] == [False, True, False]
    assert (
        rows[0]["kind"] == "training"
        and rows[0]["weights"] == "best"
        and rows[0]["autoattack_accuracy"] == 0.5
    )
    assert rows[1]["owner"] == sam_same_team.name and rows[1]["precision"] == "fp32"
    assert (rows[2]["n_examples"], rows[2]["n_total"]) == (100, 450)
    assert theirs not in {r["evaluation_id"] for r in board(evaluations="true")}  # team only
    assert board(protocol="digits@1") == rows
    assert [r["evaluation_id"] for r in board(dataset="digits", evaluations="true")] == [a, full_b, partial_c]

    grouped = board(evaluations="true")
    keys = [(r["protocol_id"], r["rank"]) for r in grouped]
    assert ("digits", 1) in keys and ("custom", 1) in keys
    assert {r["protocol_id"] for r in grouped} == {"digits", "custom"}  # b, c's training rows: custom suites
    assert [r["evaluation_id"] for r in board(protocol="custom") if r["evaluation_id"] == custom] == [custom]
    version = job_spec(api, custom).protocol_version
    assert [r["evaluation_id"] for r in board(protocol=f"custom@{version}")] == [custom]

    r = rita.http.get("/v1/results/leaderboard", params={"protocol": "no-such"})
    assert errors_of(r) == ["query.protocol"]
    # without a protocol: the experiments' board, as before (training runs only)
    old = board()
    assert {row["experiment_id"] for row in old} == {a, b, c}  # no evaluation jobs, no other team
    assert all("protocol_id" not in row for row in old)


def test_robustbench_export_has_every_model_info_field(api: Api) -> None:
    alice, bob = api.person(), api.person()
    exp = trained(api, alice, "rb")
    job = evaluate(alice, exp, protocol="digits")["id"]
    finish_evaluation(
        api, job, clean=0.8822, attacks={"fgsm": 0.61, "pgd20": 0.55, "cw20": 0.5201, "autoattack": 0.5286}
    )
    r = alice.http.get(f"/v1/results/{job}/export", params={"format": "robustbench"})
    assert r.status_code == 200, r.text
    info = r.json()
    # the fields of RobustBench's model_info/cifar10/Linf/*.json files
    for key in (
        "link",
        "name",
        "authors",
        "additional_data",
        "number_forward_passes",
        "dataset",
        "venue",
        "architecture",
        "eps",
        "clean_acc",
        "reported",
        "autoattack_acc",
        "footnote",
        "unreliable",
    ):
        assert key in info, key
    assert (info["clean_acc"], info["autoattack_acc"], info["reported"]) == ("88.22", "52.86", "52.86")
    assert info["external"] == "52.01"  # the worst case over the protocol's attacks is below AutoAttack
    assert (info["dataset"], info["eps"], info["additional_data"], info["number_forward_passes"]) == (
        "digits",
        "0.1",
        False,
        1,
    )
    assert info["architecture"] == "tiny_cnn" and info["authors"] == alice.name
    assert "digits@1" in info["footnote"] and "test set" not in info["footnote"]
    assert alice.http.get(f"/v1/results/{job}/export").json() == info  # robustbench is the default
    assert bob.http.get(f"/v1/results/{job}/export").status_code == 404
    assert alice.http.get("/v1/results/no-such/export").status_code == 404
    r = alice.http.get(f"/v1/results/{job}/export", params={"format": "csv"})
    assert errors_of(r) == ["query.format"]
    no_aa = evaluate(
        alice, exp, suite={"threat_model": {"eps": 0.1, "step_size": 0.01}, "attacks": [{"kind": "fgsm"}]}
    )["id"]
    finish_evaluation(api, no_aa, clean=0.9, attacks={"fgsm": 0.7})
    r = alice.http.get(f"/v1/results/{no_aa}/export")
    assert errors_of(r) == ["path.evaluation_id"] and "AutoAttack" in r.json()["detail"]


def test_transfer_matrix(api: Api) -> None:
    alice = api.person()
    a, b, c = (trained(api, alice, name) for name in ("ta", "tb", "tc"))
    ab = evaluate(alice, b, protocol="digits", transfer_from={"experiment": a})["id"]
    spec = job_spec(api, ab)
    assert (
        spec.transfer_source is not None
        and spec.transfer_source.key == f"experiments/{a}/main/checkpoints/best.pt"
    )
    finish_evaluation(api, ab, clean=0.9, attacks={"pgd20": 0.7})
    ba = evaluate(alice, a, protocol="digits", transfer_from={"experiment": b, "weights": "last"})["id"]
    finish_evaluation(api, ba, clean=0.9, attacks={"pgd20": 0.6})
    plain = evaluate(alice, c, protocol="digits")["id"]  # white-box: not a transfer
    finish_evaluation(api, plain, clean=0.9, attacks={"pgd20": 0.1})
    r = alice.http.get("/v1/results/transfer-matrix", params={"experiments": f"{a},{b},{c}"})
    assert r.status_code == 200, r.text
    matrix = r.json()
    assert matrix["experiments"] == [a, b, c] and matrix["protocol"] == "digits@1"
    assert matrix["accuracy"] == [[None, 0.7, None], [0.6, None, None], [None, None, None]]
    assert matrix["evaluations"][0][1] == ab and matrix["evaluations"][1][0] == ba
    # black-box numbers are not white-box results of the protocol: not on the leaderboard
    board = alice.http.get("/v1/results/leaderboard", params={"protocol": "digits"}).json()
    assert [row["evaluation_id"] for row in board] == [plain]
    other = api.person()
    assert (
        other.http.get("/v1/results/transfer-matrix", params={"experiments": f"{a},{b}"}).status_code == 404
    )
    r = alice.http.get("/v1/results/transfer-matrix", params={"experiments": f"{a},,{b}"})
    assert errors_of(r) == ["query.experiments"]


def test_bulk_queues_the_protocol_where_a_result_is_missing(api: Api) -> None:
    alice = api.person()
    has = trained(api, alice, "has", summary_extra={"protocol_id": "digits", "protocol_version": 1})
    pending = trained(api, alice, "pending")
    first = evaluate(alice, pending, protocol="digits")["id"]
    nobest = trained(api, alice, "nobest", best=False)
    todo = trained(api, alice, "todo")
    cifar = trained(api, alice, "cifar", spec=cifar_spec("cifar"))

    r = alice.http.post("/v1/evaluations/bulk", json={"protocol": "digits", "dry_run": True})
    assert r.status_code == 200, r.text
    dry = r.json()
    assert dry["queued"] == [todo]
    assert set(dry["skipped"]) == {has, pending, nobest, cifar}
    assert "has a result under digits@1" in dry["skipped"][has]
    assert first in dry["skipped"][pending] and "selected no best checkpoint" in dry["skipped"][nobest]
    assert "not cifar10" in dry["skipped"][cifar]

    r = alice.http.post(
        "/v1/evaluations/bulk", json={"protocol": "digits", "dataset": "digits", "priority": 3}
    )
    done = r.json()
    assert len(done["queued"]) == 1 and cifar not in done["skipped"]
    spec = job_spec(api, done["queued"][0])
    assert spec.source_experiment == todo and (spec.protocol_id, spec.protocol_version) == ("digits", "1")
    again = alice.http.post("/v1/evaluations/bulk", json={"protocol": "digits", "dataset": "digits"}).json()
    assert again["queued"] == [] and done["queued"][0] in again["skipped"][todo]

    assert errors_of(alice.http.post("/v1/evaluations/bulk", json={"protocol": "nope"})) == ["body.protocol"]
    r = alice.http.post("/v1/evaluations/bulk", json={"protocol": "digits", "dataset": "cifar10"})
    assert errors_of(r) == ["body.dataset"]


def test_another_team_sees_none_of_it_and_deleting_a_job_removes_its_rows(api: Api) -> None:
    alice, eve = api.person(), api.person()
    exp = trained(api, alice, "iso")
    job = evaluate(alice, exp, protocol="digits")["id"]
    finish_evaluation(api, job, clean=0.9, attacks={"pgd20": 0.5})
    assert eve.http.get(f"/v1/evaluations/{job}").status_code == 404
    assert eve.http.get("/v1/evaluations").json()["items"] == []
    assert eve.http.get("/v1/results/leaderboard", params={"protocol": "digits"}).json() == []
    assert eve.http.post(f"/v1/experiments/{job}/cancel").status_code == 404
    assert api.admin.http.get(f"/v1/evaluations/{job}").status_code == 200  # admins see every team
    r = alice.http.delete(f"/v1/experiments/{job}")
    assert r.status_code == 204
    with api.sessions() as session:
        assert (
            session.scalar(select(func.count()).select_from(EvalResult).where(EvalResult.job_id == job)) == 0
        )


def test_a_sweeps_trial_is_evaluated_by_name(api: Api) -> None:
    alice = api.person()
    spec = digits_spec("sweep")
    spec["sweep"] = {
        "parameters": {"method.alpha": {"kind": "grid", "values": [0.0, 1.0]}},
        "metric": "test_clean_accuracy",
    }
    r = alice.http.post("/v1/experiments", json={"spec": spec})
    assert r.status_code == 201, r.text
    sweep = r.json()["id"]
    trials = [
        {"trial": "t0", "robust_accuracy": 0.4, "clean_accuracy": 0.8},
        {"trial": "t1", "robust_accuracy": 0.5, "clean_accuracy": 0.8},
    ]
    api.store.put_json(f"experiments/{sweep}/trials.json", trials)
    for name in ("t0", "t1"):
        api.store.put_bytes(f"experiments/{sweep}/{name}/checkpoints/last.pt", b"weights")
    api.store.put_bytes(f"experiments/{sweep}/t1/checkpoints/best.pt", b"weights")
    move(api, sweep, JobState.dispatching, JobState.running)
    from tests.service.evaluations_helpers import scheduler

    scheduler(api)._succeeded(sweep)
    bulk = alice.http.post("/v1/evaluations/bulk", json={"protocol": "digits", "dry_run": True}).json()
    assert "a sweep" in bulk["skipped"][sweep]
    out = evaluate(alice, {"experiment": sweep, "trial": "t1"}, protocol="digits")
    spec_t1 = job_spec(api, out["id"])
    assert spec_t1.checkpoint.key == f"experiments/{sweep}/t1/checkpoints/best.pt"
    assert out["target"] == f"{sweep}/t1:best"
    r = alice.http.post(
        "/v1/evaluations", json={"target": {"experiment": sweep, "trial": "t0"}, "protocol": "digits"}
    )
    assert errors_of(r) == ["body.target.weights"]  # t0 kept no best checkpoint
    r = alice.http.post("/v1/evaluations", json={"target": {"experiment": sweep}, "protocol": "digits"})
    assert errors_of(r) == ["body.target.trial"] and "t0, t1" in r.json()["detail"]
