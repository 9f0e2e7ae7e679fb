"""What the workers wrote to the artifact store, brought into the database.

Workers never talk to the service: rank 0 of each trial appends metrics.jsonl and writes
summary.json under experiments/<id>/<trial>/, a sweep writes trials.json next to them; an evaluation
job appends one line per finished shard to experiments/<id>/eval/progress.jsonl and writes
experiments/<id>/eval/summary.json (an EvaluationSummary). The scheduler reads those for its running
and finished jobs; the API serves the copies in the database (metric events for the SSE stream, the
latest row per trial, the experiment's leaderboard row, and the (checkpoint, protocol) result rows of
`eval_results`: one per evaluation, one per training run's reported model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from api_schemas.evaluations import CheckpointRef, EvaluationJobSpec, EvaluationSummary
from api_schemas.protocols import (
    CUSTOM_ID,
    PROTOCOLS,
    TEST_SET_SIZES,
    EvaluationSuite,
    UnknownProtocol,
    custom_protocol_version,
    parse_protocol_ref,
)
from service.db.models import EvalResult, Event, Experiment, Trial, utcnow
from workers.storage import ArtifactStore, KeyNotFound, experiment_prefix

log = logging.getLogger("service.ingest")

# Top-level files of an experiment's prefix that are not trials' folders.
_NOT_TRIALS = {"tune", "plots", "eval"}
#: an evaluation job's files, under experiments/<id>/
EVAL_PROGRESS = "eval/progress.jsonl"
EVAL_SUMMARY = "eval/summary.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _trial_names(store: ArtifactStore, exp_id: str, is_sweep: bool) -> list[str]:
    if not is_sweep:
        return ["main"]
    prefix = experiment_prefix(exp_id)
    names = set()
    for info in store.list(prefix):
        rest = info.key[len(prefix) :]
        parts = rest.split("/")
        if len(parts) == 2 and parts[1] == "metrics.jsonl" and parts[0] not in _NOT_TRIALS:
            names.add(parts[0])
    return sorted(names)


def _metric_sources(store: ArtifactStore, exp: Experiment) -> list[tuple[str, str]]:
    """(trial, store key) of the JSON-lines files whose rows become metric events: each trial's
    metrics.jsonl, or an evaluation's progress.jsonl (as trial `main`, one row per finished shard)."""
    if exp.kind == "evaluation":
        return [("main", experiment_prefix(exp.id) + EVAL_PROGRESS)]
    return [
        (name, experiment_prefix(exp.id, name) + "metrics.jsonl")
        for name in _trial_names(store, exp.id, exp.is_sweep)
    ]


def ingest_metrics(session: Session, store: ArtifactStore, exp_id: str) -> int:
    """Record the metrics.jsonl (or progress.jsonl) lines not seen yet as events; returns how many
    were new."""
    exp = session.get(Experiment, exp_id)
    if exp is None:
        return 0
    new_total = 0
    for name, key in _metric_sources(store, exp):
        try:
            raw = store.get_bytes(key)
        except KeyNotFound:
            continue
        rows = []
        for line in raw.decode("utf-8", "replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line being written; read it next time
            if not isinstance(row, dict):
                break  # not a row of ours: events carry objects
            rows.append(row)
        trial = session.scalar(select(Trial).where(Trial.experiment_id == exp_id, Trial.name == name))
        if trial is None:
            trial = Trial(experiment_id=exp_id, name=name, state="running", metrics_lines=0)
            session.add(trial)
        if len(rows) < trial.metrics_lines:
            # the worker rewrote the file from its checkpoint's history after a restart
            trial.metrics_lines = len(rows)
        fresh = rows[trial.metrics_lines :]
        now = utcnow()
        for row in fresh:
            session.add(Event(experiment_id=exp_id, kind="metric", trial=name, data=row, at=now))
        if fresh:
            trial.metrics_lines = len(rows)
            trial.latest_metrics = fresh[-1]
            exp.latest_metrics = {"trial": name, **fresh[-1]}
            new_total += len(fresh)
            _note_checkpoint(exp, fresh, now)
    return new_total


def _note_checkpoint(exp: Experiment, rows: list[dict[str, Any]], now: datetime) -> None:
    """`last_checkpoint_at` (what a preemption would lose is counted from it): the newest
    `checkpoint_at` (unix time) of a training run's rows; an evaluation's shards are its checkpoints,
    so the time of its newest progress row (else when it was read)."""
    key = "time" if exp.kind == "evaluation" else "checkpoint_at"
    times = [
        float(v)
        for v in (row.get(key) for row in rows)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e11
    ]
    if times:
        at = datetime.fromtimestamp(min(max(times), now.timestamp()), tz=timezone.utc)
    elif exp.kind == "evaluation":
        at = now
    else:
        return
    if exp.last_checkpoint_at is None or at > exp.last_checkpoint_at:
        exp.last_checkpoint_at = at


@dataclass
class Results:
    row: dict[str, Any]  # ResultRow fields known from the store (the rest come from the experiment)
    trials: dict[str, dict[str, Any]]  # trial -> its summary.json (or trials.json row for a sweep)
    # the summary the row was read from: the (best) trial's summary.json, or eval/summary.json
    summary: dict[str, Any] | None = field(default=None)


def result_fields(summary: dict[str, Any]) -> dict[str, Any]:
    """Leaderboard numbers from a summary.json: the best model's report where selection kept one
    (what the papers report), else the final model's."""
    selected = summary.get("best")
    report = selected or summary["final"]
    attacks = {a["name"]: a["accuracy"] for a in report.get("attacks", [])}
    autoattack = [a["accuracy"] for a in report.get("attacks", []) if a.get("kind") == "autoattack"]
    return {
        "clean_accuracy": report.get("clean_accuracy"),
        "robust_accuracy": report.get("robust_accuracy"),
        "autoattack_accuracy": min(autoattack) if autoattack else None,
        "nrr": report.get("nrr"),
        "attacks": attacks,
        # what the number means: trained in which precision, and selected on which split (a
        # checkpoint picked on the test set reports an optimistic robust accuracy)
        "precision": report.get("training_precision") or summary.get("precision"),
        "selection_split": (report.get("selection_split") or summary.get("selection_split"))
        if selected
        else None,
    }


def evaluation_fields(summary: EvaluationSummary) -> dict[str, Any]:
    """An evaluation's ResultRow fields (the experiment's own leaderboard columns)."""
    return {
        "clean_accuracy": summary.clean_accuracy,
        "robust_accuracy": summary.robust_accuracy,
        "autoattack_accuracy": summary.autoattack_accuracy,
        "nrr": summary.nrr,
        "attacks": {a.name: a.accuracy for a in summary.attacks},
        "precision": summary.training_precision,
        "selection_split": summary.selection_split,
    }


def read_results(store: ArtifactStore, exp_id: str, *, is_sweep: bool, kind: str = "training") -> Results:
    """What a finished job wrote. An evaluation's summary that does not validate raises
    ValidationError (a ValueError): the job succeeds without results, as one without a summary."""
    if kind == "evaluation":
        raw = store.get_json(experiment_prefix(exp_id) + EVAL_SUMMARY)
        summary = EvaluationSummary.model_validate(raw)
        data = summary.model_dump(mode="json")
        return Results(row=evaluation_fields(summary), trials={"main": data}, summary=data)
    if not is_sweep:
        summary = store.get_json(experiment_prefix(exp_id, "main") + "summary.json")
        return Results(row=result_fields(summary), trials={"main": summary}, summary=summary)
    table = store.get_json(experiment_prefix(exp_id) + "trials.json")
    trials = {row["trial"]: row for row in table}
    scored = [r for r in table if r.get("robust_accuracy") is not None]
    if not scored:
        return Results(row={"attacks": {}}, trials=trials)
    best = max(scored, key=lambda r: (r["robust_accuracy"], r.get("clean_accuracy") or 0))
    try:
        summary = store.get_json(experiment_prefix(exp_id, best["trial"]) + "summary.json")
        row = result_fields(summary)
    except KeyNotFound:  # stopped early by ASHA: only its last validation exists
        summary = None
        row = {
            "clean_accuracy": best.get("clean_accuracy"),
            "robust_accuracy": best["robust_accuracy"],
            "attacks": {},
        }
    return Results(row=row, trials=trials, summary=summary)


def apply_results(session: Session, exp: Experiment, results: Results) -> None:
    for name, summary in results.trials.items():
        trial = session.scalar(select(Trial).where(Trial.experiment_id == exp.id, Trial.name == name))
        if trial is None:
            trial = Trial(experiment_id=exp.id, name=name, metrics_lines=0)
            session.add(trial)
        trial.summary = summary
        trial.state = summary.get("status", "succeeded") if isinstance(summary, dict) else "succeeded"
    session.execute(delete(EvalResult).where(EvalResult.job_id == exp.id))
    row = eval_result(exp, results)
    if row is not None:
        session.add(row)


# -- (checkpoint, protocol) rows ---------------------------------------------------------------------


def _source_of(ref: CheckpointRef | None) -> str | None:
    """A transfer evaluation's source as the transfer matrix names it: the experiment whose weights
    made the adversarial examples (experiments/<id>/...), else the upload's `sha256:<hex>`."""
    if ref is None:
        return None
    parts = ref.key.split("/")
    if len(parts) > 2 and parts[0] == "experiments":
        return parts[1]
    if ref.sha256:
        return f"sha256:{ref.sha256}"
    return ref.label[:256] or ref.key[:256]


def eval_result(exp: Experiment, results: Results) -> EvalResult | None:
    """The job's result row (None when the job reported no accuracies)."""
    if results.summary is None:
        return None
    if exp.kind == "evaluation":
        return _evaluation_row(exp, results.summary)
    return _training_row(exp, results.summary)


def _evaluation_row(exp: Experiment, data: dict[str, Any]) -> EvalResult | None:
    try:
        summary = EvaluationSummary.model_validate(data)
        spec = EvaluationJobSpec.model_validate(exp.spec)
    except ValidationError as exc:
        log.warning("%s: no result row: %s", exp.id, exc)
        return None
    sha = summary.checkpoint_sha256 if _SHA256.match(summary.checkpoint_sha256 or "") else None
    split = summary.selection_split or spec.selection_split
    return EvalResult(
        job_id=exp.id,
        team_id=exp.team_id,
        owner_id=exp.owner_id,
        kind="evaluation",
        name=exp.name,
        source_experiment=spec.source_experiment,
        weights=spec.target_weights[:16],
        checkpoint_sha256=sha or spec.checkpoint.sha256,
        protocol_id=summary.protocol_id[:64] or spec.protocol_id,
        protocol_version=summary.protocol_version[:32] or spec.protocol_version,
        dataset=summary.dataset[:32],
        norm=summary.norm[:8],
        eps=summary.eps,
        model=exp.model,
        method=exp.method,
        n_examples=summary.n_examples,
        n_total=summary.n_total,
        partial=summary.partial,
        test_selected=split == "test",
        precision=summary.training_precision or spec.training_precision,
        clean_accuracy=summary.clean_accuracy,
        robust_accuracy=summary.robust_accuracy,
        autoattack_accuracy=summary.autoattack_accuracy,
        nrr=summary.nrr,
        attacks={a.name: a.accuracy for a in summary.attacks},
        summary=data,
        transfer_source=_source_of(spec.transfer_source),
        finished_at=utcnow(),
    )


def training_protocol(spec: dict[str, Any], summary: dict[str, Any]) -> tuple[str, str]:
    """(protocol id, version) of a training run's final evaluation: what its summary says (the
    workers record it), else its spec's `evaluation.protocol`, else `custom` with the suite's hash."""
    pid, version = summary.get("protocol_id"), summary.get("protocol_version")
    if isinstance(pid, str) and pid and version is not None:
        return pid[:64], str(version)[:32]
    evaluation = spec.get("evaluation") or {}
    ref = evaluation.get("protocol")
    if isinstance(ref, str):
        try:
            name, number = parse_protocol_ref(ref)
        except UnknownProtocol:
            name, number = ref, None
        if number is None:
            known = sorted(v for (p, v) in PROTOCOLS if p == name)
            number = known[-1] if known else None
        if number is not None:
            return name[:64], str(number)
    try:
        suite = EvaluationSuite.model_validate(
            {
                "threat_model": spec.get("threat_model") or {},
                "attacks": evaluation.get("attacks") or [],
                "n_examples": evaluation.get("n_examples"),
            }
        )
        return CUSTOM_ID, custom_protocol_version(suite)
    except ValidationError:  # a suite the evaluation jobs would not take (e.g. AutoAttack on fewer)
        raw = json.dumps(
            [spec.get("threat_model"), evaluation.get("attacks"), evaluation.get("n_examples")],
            sort_keys=True,
            separators=(",", ":"),
        )
        return CUSTOM_ID, hashlib.sha256(raw.encode()).hexdigest()[:12]


def _training_row(exp: Experiment, summary: dict[str, Any]) -> EvalResult | None:
    best = summary.get("best")
    report = best or summary.get("final")
    if not isinstance(report, dict):
        return None
    clean, robust = report.get("clean_accuracy"), report.get("robust_accuracy")
    if not isinstance(clean, (int, float)) or not isinstance(robust, (int, float)):
        return None  # a run without attacks has no robust accuracy to rank
    attacks = [a for a in report.get("attacks") or [] if isinstance(a, dict)]
    autoattack = [a["accuracy"] for a in attacks if a.get("kind") == "autoattack"]
    pid, version = training_protocol(exp.spec or {}, summary)
    protocol = PROTOCOLS.get((pid, int(version))) if version.isdigit() else None
    n_examples = report.get("n_examples") if isinstance(report.get("n_examples"), int) else 0
    n_total = protocol.full_size(exp.dataset) if protocol is not None else TEST_SET_SIZES.get(exp.dataset)
    if best:
        weights, sha = "best", summary.get("best_checkpoint_sha256")
    else:
        weights = "averaged" if report.get("weights") == "averaged" else "last"
        sha = summary.get("last_checkpoint_sha256")
    split = (report.get("selection_split") or summary.get("selection_split")) if best else None
    return EvalResult(
        job_id=exp.id,
        team_id=exp.team_id,
        owner_id=exp.owner_id,
        kind="training",
        name=exp.name,
        source_experiment=exp.id,
        weights=weights,
        checkpoint_sha256=sha if isinstance(sha, str) and _SHA256.match(sha) else None,
        protocol_id=pid,
        protocol_version=version,
        dataset=exp.dataset,
        norm=exp.norm,
        eps=exp.eps,
        model=exp.model,
        method=exp.method,
        n_examples=n_examples,
        n_total=n_total,
        partial=n_total is not None and n_examples < n_total,
        test_selected=split == "test",
        precision=report.get("training_precision") or summary.get("precision"),
        clean_accuracy=float(clean),
        robust_accuracy=float(robust),
        autoattack_accuracy=min(autoattack) if autoattack else None,
        nrr=report.get("nrr"),
        attacks={a["name"]: a["accuracy"] for a in attacks if "name" in a and "accuracy" in a},
        summary=None,
        transfer_source=None,
        finished_at=utcnow(),
    )
