"""Finished training runs and evaluations for the service's evaluation tests, made as the workers and
the scheduler would make them: the files a worker writes go to the artifact store, the job moves
along its lifecycle, and the scheduler's own `_succeeded` / `_ingest_metrics` read them back in
(no Ray: nothing runs)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from api_schemas.evaluations import EvaluationJobSpec, EvaluationSummary
from api_schemas.jobs import JobState
from api_schemas.results import nrr
from service.db.engine import run_tx
from service.db.models import Experiment
from service.jobs import transition
from service.scheduler import Scheduler
from tests.service.conftest import Api, Person, digits_spec
from workers.storage import experiment_prefix


def scheduler(api: Api) -> Scheduler:
    """The scheduler's ingestion, unstarted: `_succeeded` and `_ingest_metrics` on this server's store."""
    return Scheduler(sessions=api.sessions, settings=api.settings, store=api.store, ray=None)


def move(api: Api, exp_id: str, *states: JobState, **fields: Any) -> None:
    def go(session: Any) -> None:
        exp = session.get(Experiment, exp_id)
        for state in states:
            assert transition(session, exp, state, reason="test"), (exp_id, exp.state, state)
        for key, value in fields.items():
            setattr(exp, key, value)

    run_tx(api.sessions, go)


def report(
    clean: float, attacks: dict[str, float], *, aa: float | None = None, **extra: Any
) -> dict[str, Any]:
    rows = [
        {
            "name": name,
            "kind": "pgd",
            "accuracy": acc,
            "n_examples": 450,
            "nrr": nrr(clean, acc),
            "mean": 0.5,
            "seconds": 1.0,
        }
        for name, acc in attacks.items()
    ]
    if aa is not None:
        rows.append(
            {
                "name": "autoattack",
                "kind": "autoattack",
                "accuracy": aa,
                "n_examples": 450,
                "nrr": 0.5,
                "mean": 0.5,
                "seconds": 1.0,
            }
        )
    robust = min(r["accuracy"] for r in rows) if rows else None
    return {
        "clean_accuracy": clean,
        "n_examples": 450,
        "attacks": rows,
        "robust_accuracy": robust,
        "nrr": nrr(clean, robust) if robust is not None else None,
        **extra,
    }


def trained(
    api: Api,
    person: Person,
    name: str = "digits",
    *,
    spec: dict[str, Any] | None = None,
    best: bool = True,
    averaged: bool = False,
    clean: float = 0.9,
    attacks: dict[str, float] | None = None,
    aa: float | None = 0.5,
    selection_split: str = "heldout",
    summary_extra: dict[str, Any] | None = None,
    checkpoint: bytes = b"not read by the service",
) -> str:
    """A training run that succeeded: submitted over the API, its checkpoints and summary.json in the
    store as a worker writes them, finished through the scheduler's ingestion."""
    if spec is None:
        spec = digits_spec(name)
        # an inline suite: the run's own rows are `custom` unless the summary names a protocol
        spec["evaluation"] = {"attacks": [{"kind": "fgsm"}, {"kind": "pgd", "steps": 20, "step_size": 0.01}]}
    spec = copy.deepcopy(spec)
    spec["name"] = name
    if averaged:
        spec["optimization"]["weight_averaging"] = {"decay": 0.99}
    r = person.http.post("/v1/experiments", json={"spec": spec})
    assert r.status_code == 201, r.text
    exp_id = r.json()["id"]
    prefix = experiment_prefix(exp_id, "main")
    api.store.put_bytes(prefix + "checkpoints/last.pt", checkpoint)
    if best:
        api.store.put_bytes(prefix + "checkpoints/best.pt", checkpoint)
    model = report(clean, attacks or {"pgd20": 0.55}, aa=aa, training_precision="fp32")
    summary = {
        "name": name,
        "method": spec["method"]["name"],
        "dataset": spec["dataset"]["name"],
        "epochs": 1,
        "final": model,
        "best": {**model, "selection_split": selection_split} if best else None,
        "best_epoch": 1 if best else None,
        "last_checkpoint": f"{prefix}checkpoints/last.pt",
        "best_checkpoint": f"{prefix}checkpoints/best.pt" if best else None,
        "seconds": 1.0,
        "spec": spec,
        "precision": "fp32",
        "selection_split": selection_split if best else None,
        **(summary_extra or {}),
    }
    api.store.put_json(prefix + "summary.json", summary)
    move(api, exp_id, JobState.dispatching, JobState.running)
    scheduler(api)._succeeded(exp_id)
    return exp_id


def evaluate(person: Person, target: dict[str, Any] | str, **body: Any) -> dict[str, Any]:
    if isinstance(target, str):
        target = {"experiment": target}
    r = person.http.post("/v1/evaluations", json={"target": target, **body})
    assert r.status_code == 201, r.text
    return r.json()


def job_spec(api: Api, evaluation_id: str) -> EvaluationJobSpec:
    with api.sessions() as session:
        return EvaluationJobSpec.model_validate(session.get(Experiment, evaluation_id).spec)


def progress(api: Api, evaluation_id: str, rows: list[dict[str, Any]]) -> None:
    """The worker's eval/progress.jsonl, then the scheduler's metrics round for the job."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    api.store.put_bytes(experiment_prefix(evaluation_id) + "eval/progress.jsonl", text.encode())
    assert scheduler(api)._ingest_metrics(evaluation_id, force=True)


def finish_evaluation(
    api: Api,
    evaluation_id: str,
    *,
    clean: float,
    attacks: dict[str, float],
    aa: float | None = None,
    robust: float | None = None,
    n_examples: int | None = None,
    n_total: int | None = None,
) -> EvaluationSummary:
    """The worker's eval/summary.json for the queued job `evaluation_id`, read in by the scheduler."""
    spec = job_spec(api, evaluation_id)
    n_total = n_total if n_total is not None else 450  # digits' test split
    n = n_examples if n_examples is not None else spec.n_examples(n_total)
    rows = [
        {
            "name": name,
            "kind": "autoattack" if name == "autoattack" else "pgd",
            "accuracy": acc,
            "n_attacked": n,
            "nrr": nrr(clean, acc),
        }
        for name, acc in attacks.items()
    ]
    if aa is not None and "autoattack" not in attacks:
        rows.append(
            {
                "name": "autoattack",
                "kind": "autoattack",
                "accuracy": aa,
                "n_attacked": n,
                "nrr": nrr(clean, aa),
            }
        )
    worst = robust if robust is not None else min(r["accuracy"] for r in rows)
    summary = EvaluationSummary(
        evaluation_id=evaluation_id,
        protocol_id=spec.protocol_id,
        protocol_version=spec.protocol_version,
        checkpoint_sha256=spec.checkpoint.sha256 or "",
        checkpoint=spec.checkpoint.label,
        weights=spec.checkpoint.weights,
        dataset=spec.dataset.name,
        norm=spec.suite.threat_model.norm,
        eps=spec.suite.threat_model.eps,
        n_examples=n,
        n_total=n_total,
        partial=n < n_total,
        clean_accuracy=clean,
        attacks=rows,
        autoattack_accuracy=min([r["accuracy"] for r in rows if r["kind"] == "autoattack"], default=None),
        robust_accuracy=worst,
        nrr=nrr(clean, worst),
        training_precision=spec.training_precision,
        selection_split=spec.selection_split,
        seed=spec.suite.seed,
        shard_size=spec.suite.shard_size,
        n_shards=spec.suite.n_shards(n),
        transfer_source=spec.transfer_source.label if spec.transfer_source else None,
    )
    api.store.put_json(
        experiment_prefix(evaluation_id) + "eval/summary.json", summary.model_dump(mode="json")
    )
    move(api, evaluation_id, JobState.dispatching, JobState.running)
    scheduler(api)._succeeded(evaluation_id)
    return summary


def save_digits_checkpoint(path: Path, *, classes: int = 10, plain: bool = False, **payload: Any) -> Path:
    """A real checkpoint of the digits preset's model (trainer.checkpoint.save_checkpoint), or its
    plain state dict (torch.save), with `classes` outputs."""
    import torch

    from api_schemas.presets import get_preset
    from trainer.checkpoint import save_checkpoint
    from trainer.models import create_model

    spec = get_preset("digits")
    model = create_model(
        spec.model.robust.name, num_classes=classes, in_channels=1, **spec.model.robust.kwargs()
    )
    if plain:
        torch.save(model.state_dict(), path)
        return path
    return save_checkpoint(
        path,
        {
            "spec": spec.model_dump(mode="json"),
            "epoch": 1,
            "num_classes": classes,
            "in_channels": 1,
            "robust": model.state_dict(),
            "robust_ema": None,
            **payload,
        },
    )
