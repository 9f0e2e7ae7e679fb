"""What the workers wrote to the artifact store, brought into the database.

Workers never talk to the service: rank 0 of each trial appends metrics.jsonl and writes
summary.json under experiments/<id>/<trial>/, a sweep writes trials.json next to them. The
scheduler reads those for its running and finished jobs; the API serves the copies in the database
(metric events for the SSE stream, the latest row per trial, the leaderboard row).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import Event, Experiment, Trial, utcnow
from workers.storage import ArtifactStore, KeyNotFound, experiment_prefix

log = logging.getLogger("service.ingest")

# Top-level files of an experiment's prefix that are not trials' folders.
_NOT_TRIALS = {"tune", "plots"}


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


def ingest_metrics(session: Session, store: ArtifactStore, exp_id: str) -> int:
    """Record the metrics.jsonl lines not seen yet as events; returns how many were new."""
    exp = session.get(Experiment, exp_id)
    if exp is None:
        return 0
    new_total = 0
    for name in _trial_names(store, exp_id, exp.is_sweep):
        try:
            raw = store.get_bytes(experiment_prefix(exp_id, name) + "metrics.jsonl")
        except KeyNotFound:
            continue
        rows = []
        for line in raw.decode("utf-8", "replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line being written; read it next time
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
    return new_total


@dataclass
class Results:
    row: dict[str, Any]  # ResultRow fields known from the store (the rest come from the experiment)
    trials: dict[str, dict[str, Any]]  # trial -> its summary.json (or trials.json row for a sweep)


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


def read_results(store: ArtifactStore, exp_id: str, *, is_sweep: bool) -> Results:
    if not is_sweep:
        summary = store.get_json(experiment_prefix(exp_id, "main") + "summary.json")
        return Results(row=result_fields(summary), trials={"main": summary})
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
        row = {
            "clean_accuracy": best.get("clean_accuracy"),
            "robust_accuracy": best["robust_accuracy"],
            "attacks": {},
        }
    return Results(row=row, trials=trials)


def apply_results(session: Session, exp: Experiment, results: Results) -> None:
    for name, summary in results.trials.items():
        trial = session.scalar(select(Trial).where(Trial.experiment_id == exp.id, Trial.name == name))
        if trial is None:
            trial = Trial(experiment_id=exp.id, name=name, metrics_lines=0)
            session.add(trial)
        trial.summary = summary
        trial.state = summary.get("status", "succeeded") if isinstance(summary, dict) else "succeeded"
