"""What the pages show, assembled from the database (through service.jobs, so the team rules are the
API's), the scheduler's queue view, the artifact store and Ray; no HTTP here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api_schemas.evaluations import EvaluationResultRow
from api_schemas.jobs import JobState, ResultRow
from api_schemas.protocols import list_protocols
from api_schemas.results import nrr
from service import jobs
from service.db.models import EvalResult, Experiment, User
from service.leaderboard import protocol_filter, protocol_leaderboard
from service.web.svg import Point, Series, line_chart, scatter

log = logging.getLogger("service.web")

QUEUE_STATES = ("running", "dispatching", "retrying", "queued")
ACTIVE = frozenset({"running", "dispatching"})
MAX_QUEUE_ROWS = 500
RECENT_ROWS = 10
LOG_TAIL_LINES = 200


# -- queue -------------------------------------------------------------------------------------------


@dataclass
class QueueRow:
    id: str
    name: str
    owner: str
    team: str
    state: str
    priority: int
    gpus: float
    cpus: float
    position: int | None
    reason: str | None
    estimated_start: datetime | None
    created_at: datetime
    started_at: datetime | None
    cancel_requested: bool
    can_change: bool
    latest: str


def may_change(exp: Experiment, user: User) -> bool:
    """The API's rule (service.jobs.require_owner): the owner or an admin."""
    try:
        jobs.require_owner(exp, user)
    except jobs.Forbidden:
        return False
    return True


def _progress(latest: dict[str, Any] | None) -> str:
    if not latest:
        return ""
    parts = []
    if latest.get("epoch") is not None:
        parts.append(f"epoch {latest['epoch']}")
    if isinstance(latest.get("loss"), (int, float)):
        parts.append(f"loss {latest['loss']:.3f}")
    val = latest.get("val") or {}
    if isinstance(val.get("pgd_acc"), (int, float)):
        parts.append(f"val PGD {val['pgd_acc'] * 100:.1f}%")
    elif isinstance(latest.get("train_adv_accuracy"), (int, float)):
        parts.append(f"train adv {latest['train_adv_accuracy'] * 100:.1f}%")
    return ", ".join(parts)


def _queue_entry(entry: Any) -> tuple[int | None, str | None, datetime | None]:
    """(position, reason, estimated start) from the scheduler's view of one job. The view holds
    (position, reason); an estimated start, where a scheduler provides one, is its third item."""
    if entry is None:
        return None, None, None
    position, reason, *rest = entry
    estimate = rest[0] if rest and isinstance(rest[0], datetime) else None
    return position, reason, estimate


def queue_rows(session: Session, user: User, view: dict[str, Any] | None) -> list[QueueRow]:
    """Every waiting and active job the user may see: running first, then by queue position."""
    rows, _ = jobs.list_experiments(
        session,
        viewer=user,
        state=[JobState(s) for s in QUEUE_STATES],
        limit=MAX_QUEUE_ROWS,
    )
    out = []
    for exp in rows:
        position, reason, estimate = (
            _queue_entry((view or {}).get(exp.id))
            if exp.state not in ACTIVE
            else (
                None,
                None,
                None,
            )
        )
        out.append(
            QueueRow(
                id=exp.id,
                name=exp.name,
                owner=exp.owner.name,
                team=exp.team.name,
                state=exp.state,
                priority=exp.priority,
                gpus=exp.gpus,
                cpus=exp.cpus,
                position=position,
                reason=reason,
                estimated_start=estimate,
                created_at=exp.created_at,
                started_at=exp.started_at,
                cancel_requested=bool(exp.cancel_requested),
                can_change=may_change(exp, user),
                latest=_progress(exp.latest_metrics),
            )
        )

    def order(row: QueueRow) -> tuple:
        if row.state in ACTIVE:
            return (0, -(row.started_at or row.created_at).timestamp(), row.id)
        return (1, row.position if row.position is not None else 10**9, row.created_at.timestamp(), row.id)

    return sorted(out, key=order)


def recent_rows(session: Session, user: User) -> list[Experiment]:
    rows, _ = jobs.list_experiments(
        session,
        viewer=user,
        state=[JobState.succeeded, JobState.failed, JobState.cancelled],
        limit=RECENT_ROWS,
    )
    return rows


# -- one experiment ----------------------------------------------------------------------------------


def spec_yaml(spec: dict[str, Any]) -> str:
    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# (label, how to read it from a metrics.jsonl row) for the accuracy chart of one run
ACCURACY_CURVES: tuple[tuple[str, Any], ...] = (
    ("train adversarial", lambda r: r.get("train_adv_accuracy")),
    ("train clean", lambda r: r.get("train_clean_accuracy")),
    ("test clean", lambda r: r.get("test_clean_accuracy")),
    ("val clean", lambda r: (r.get("val") or {}).get("clean_acc")),
    ("val PGD", lambda r: (r.get("val") or {}).get("pgd_acc")),
)


def _series(rows: Sequence[dict[str, Any]], read: Any) -> list[tuple[float, float]]:
    points = []
    for row in rows:
        x, y = _number(row.get("epoch")), _number(read(row))
        if x is not None and y is not None:
            points.append((x, y))
    return points


def by_trial(metric_rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    trials: dict[str, list[dict[str, Any]]] = {}
    for row in metric_rows:
        trials.setdefault(row.get("trial") or "main", []).append(row)
    return trials


def curves(metric_rows: Iterable[dict[str, Any]], *, is_sweep: bool) -> list[str]:
    """The training curves as SVG: loss, accuracies, learning rate and images/s per epoch; for a
    sweep one line per trial (robust and clean accuracy on the selection split where measured)."""
    trials = by_trial(metric_rows)
    if not is_sweep or len(trials) <= 1:
        rows = next(iter(trials.values()), [])
        accuracy = [Series(label, _series(rows, read)) for label, read in ACCURACY_CURVES]
        return [
            line_chart([Series("loss", _series(rows, lambda r: r.get("loss")))], title="Training loss"),
            line_chart(accuracy, title="Accuracy", y_label="accuracy", percent=True),
            line_chart(
                [Series("learning rate", _series(rows, lambda r: r.get("lr")))],
                title="Learning rate",
                y_label="lr",
            ),
            line_chart(
                [Series("images/s", _series(rows, lambda r: r.get("images_per_second")))],
                title="Throughput",
                y_label="images/s",
            ),
        ]

    def robust(r: dict[str, Any]) -> Any:
        return (r.get("val") or {}).get("pgd_acc", r.get("train_adv_accuracy"))

    def clean(r: dict[str, Any]) -> Any:
        return (r.get("val") or {}).get("clean_acc", r.get("test_clean_accuracy"))

    names = sorted(trials)
    return [
        line_chart(
            [Series(n, _series(trials[n], lambda r: r.get("loss"))) for n in names], title="Loss per trial"
        ),
        line_chart(
            [Series(n, _series(trials[n], robust)) for n in names],
            title="Robust accuracy per trial (val PGD, else train adversarial)",
            y_label="accuracy",
            percent=True,
        ),
        line_chart(
            [Series(n, _series(trials[n], clean)) for n in names],
            title="Clean accuracy per trial (val, else test)",
            y_label="accuracy",
            percent=True,
        ),
        line_chart(
            [Series(n, _series(trials[n], lambda r: r.get("lr"))) for n in names],
            title="Learning rate per trial",
            y_label="lr",
        ),
        line_chart(
            [Series(n, _series(trials[n], lambda r: r.get("images_per_second"))) for n in names],
            title="Throughput per trial",
            y_label="images/s",
        ),
    ]


def pareto_plot(trials: Sequence[Any]) -> str | None:
    """A sweep's trials, clean vs robust accuracy (their summaries), with the Pareto front."""
    points = []
    for trial in trials:
        summary = trial.summary or {}
        clean_acc = _number(summary.get("clean_accuracy"))
        robust_acc = _number(summary.get("robust_accuracy"))
        if clean_acc is None or robust_acc is None:
            continue
        points.append(Point(clean_acc, robust_acc, trial.name, highlight=bool(summary.get("pareto"))))
    if not trials:
        return None
    front = [p for p in points if p.highlight] or pareto_front(points)
    return scatter(
        points,
        title="Trials: clean vs robust accuracy",
        x_label="clean accuracy",
        y_label="robust accuracy",
        front=front,
        empty="no trial has been evaluated yet",
    )


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both coordinates (higher is better on both)."""
    front = []
    for p in points:
        if not any(o is not p and o.x >= p.x and o.y >= p.y and (o.x > p.x or o.y > p.y) for o in points):
            front.append(p)
    return sorted(front, key=lambda p: p.x)


@dataclass
class AttackLine:
    name: str
    kind: str | None
    accuracy: float
    nrr: float | None
    n_examples: int | None = None
    seconds: float | None = None


@dataclass
class Results:
    row: ResultRow
    attacks: list[AttackLine] = field(default_factory=list)
    report: str = "final"


def results(exp: Experiment, trials: Sequence[Any]) -> Results | None:
    """The result row and one line per attack with its NRR: from the reported model's evaluation in
    the main trial's summary where it is there, else from the leaderboard row."""
    row = jobs.result_row(exp)
    if row is None:
        return None
    summary = next((t.summary for t in trials if t.name == "main" and t.summary), None)
    report_name = "best" if summary and summary.get("best") else "final"
    report = (summary or {}).get(report_name) or {}
    lines = [
        AttackLine(
            name=a["name"],
            kind=a.get("kind"),
            accuracy=a["accuracy"],
            nrr=a.get("nrr"),
            n_examples=a.get("n_examples"),
            seconds=a.get("seconds"),
        )
        for a in report.get("attacks", [])
        if isinstance(a, dict) and "name" in a and _number(a.get("accuracy")) is not None
    ]
    if not lines:
        clean_acc = row.clean_accuracy
        lines = [
            AttackLine(
                name=name,
                kind=None,
                accuracy=acc,
                nrr=nrr(clean_acc, acc) if clean_acc is not None else None,
            )
            for name, acc in row.attacks.items()
        ]
    return Results(row=row, attacks=lines, report=report_name if summary else "final")


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- leaderboard -------------------------------------------------------------------------------------

# columns the experiments' board sorts by (ResultRow)
SORTABLE: dict[str, Callable[[Any], Any]] = {
    "name": lambda r: r.name.lower(),
    "owner": lambda r: r.owner.lower(),
    "method": lambda r: r.method,
    "dataset": lambda r: r.dataset,
    "eps": lambda r: r.eps,
    "clean_accuracy": lambda r: r.clean_accuracy,
    "robust_accuracy": lambda r: r.robust_accuracy,
    "autoattack_accuracy": lambda r: r.autoattack_accuracy,
    "nrr": lambda r: r.nrr,
    "finished_at": lambda r: r.finished_at,
}

# columns a protocol's board sorts by (EvaluationResultRow), within a block (see protocol_groups)
PROTOCOL_SORTABLE: dict[str, Callable[[Any], Any]] = {
    "rank": lambda r: r.rank,
    "name": lambda r: r.name.lower(),
    "weights": lambda r: r.weights,
    "n_examples": lambda r: r.n_examples,
    "clean_accuracy": lambda r: r.clean_accuracy,
    "autoattack_accuracy": lambda r: r.autoattack_accuracy,
    "robust_accuracy": lambda r: r.robust_accuracy,
    "nrr": lambda r: r.nrr,
}


def sort_rows(
    rows: list[Any],
    key: str | None,
    descending: bool,
    columns: Mapping[str, Callable[[Any], Any]] = SORTABLE,
) -> list[Any]:
    """Rows by a column, missing values last whichever the direction; None keeps the ranking."""
    if not key or key not in columns:
        return rows
    read = columns[key]
    present = [r for r in rows if read(r) is not None]
    missing = [r for r in rows if read(r) is None]
    return sorted(present, key=read, reverse=descending) + missing


def leaderboard_rows(session: Session, user: User, filters: dict[str, Any], limit: int) -> list[ResultRow]:
    """The experiments' board: finished training runs (service.jobs.leaderboard)."""
    return jobs.leaderboard(
        session,
        viewer=user,
        dataset=filters.get("dataset") or None,
        norm=filters.get("norm") or None,
        eps=filters.get("eps"),
        method=filters.get("method") or None,
        limit=limit,
    )


def protocol_rows(
    session: Session, user: User, protocol: str, filters: dict[str, Any], limit: int
) -> list[EvaluationResultRow]:
    """A protocol's board (service.leaderboard.protocol_leaderboard): (checkpoint, protocol) rows,
    one protocol version at a time, partial rows below full ones. An unknown protocol is a 422."""
    return protocol_leaderboard(
        session,
        viewer=user,
        protocol=protocol,
        dataset=filters.get("dataset") or None,
        norm=filters.get("norm") or None,
        eps=filters.get("eps"),
        method=filters.get("method") or None,
        limit=limit,
    )


def protocol_key(protocol: str) -> str:
    """The select's value for what the URL named: 'lbgat' -> 'lbgat@1' (its latest version);
    'custom' (every custom suite) and 'custom@<hash>' stay as they are."""
    chosen = protocol_filter(protocol, None)
    return f"{chosen.id}@{chosen.version}" if chosen.version else protocol


def row_key(row: EvaluationResultRow) -> str:
    """What identifies a row on a protocol's board: its job and weights (a training run may report
    its best and its last weights under one protocol)."""
    return f"{row.evaluation_id}:{row.weights}"


@dataclass
class RowGroup:
    """Consecutive rows of one protocol version, all full or all partial: one <tbody>."""

    protocol: str
    partial: bool
    rows: list[EvaluationResultRow]


def protocol_groups(rows: Sequence[EvaluationResultRow], key: str | None, descending: bool) -> list[RowGroup]:
    """The query's rows cut into blocks, one per (protocol version, full or partial), in its order
    (full before partial), each block sorted by `key` (None keeps the ranking).

    Sorting stays within the partial boundary: a heading sorts the full rows among themselves and
    the partial rows among themselves, never a partial row above a full one, nor one protocol's
    rows among another's. The page gives each block its own <tbody>, which web.js sorts apart."""
    groups: list[RowGroup] = []
    for row in rows:
        protocol = f"{row.protocol_id}@{row.protocol_version}"
        if groups and groups[-1].protocol == protocol and groups[-1].partial == row.partial:
            groups[-1].rows.append(row)
        else:
            groups.append(RowGroup(protocol, row.partial, [row]))
    for group in groups:
        group.rows = sort_rows(group.rows, key, descending, PROTOCOL_SORTABLE)
    return groups


@dataclass
class ProtocolChoice:
    key: str
    title: str | None = None
    results: int = 0


@dataclass
class FilterChoices:
    datasets: list[str]
    methods: list[str]
    threat_models: list[tuple[str, float]]
    #: the team's protocols with results first (custom suites among them), then the shipped rest
    protocols: list[ProtocolChoice]


def _protocol_choices(session: Session, user: User) -> list[ProtocolChoice]:
    count = func.count(EvalResult.id)
    query = (
        select(EvalResult.protocol_id, EvalResult.protocol_version, count)
        .where(EvalResult.transfer_source.is_(None))  # as the board: transfer rows are not on it
        .group_by(EvalResult.protocol_id, EvalResult.protocol_version)
    )
    if not user.is_admin:
        query = query.where(EvalResult.team_id == user.team_id)
    titles = {p.key: p.title for p in list_protocols()}
    present = {f"{pid}@{version}": n for pid, version, n in session.execute(query).all()}
    with_results = [ProtocolChoice(key, titles.get(key), n) for key, n in sorted(present.items())]
    shipped = [ProtocolChoice(key, title) for key, title in titles.items() if key not in present]
    return with_results + shipped


def filter_choices(session: Session, user: User) -> FilterChoices:
    """The values present among the finished experiments and the results the user may see, and
    the protocols: the shipped ones and those of the team's results."""
    query = select(Experiment.dataset, Experiment.method, Experiment.norm, Experiment.eps).where(
        Experiment.state == JobState.succeeded.value
    )
    if not user.is_admin:
        query = query.where(Experiment.team_id == user.team_id)
    rows = session.execute(query.distinct()).all()
    return FilterChoices(
        datasets=sorted({r.dataset for r in rows}),
        methods=sorted({r.method for r in rows if r.method}),
        threat_models=sorted({(r.norm, float(r.eps)) for r in rows}),
        protocols=_protocol_choices(session, user),
    )


def board_scatter(rows: Sequence[ResultRow], selected: Iterable[str] = ()) -> str:
    chosen = set(selected)
    points = []
    for r in rows:
        robust_acc = r.autoattack_accuracy if r.autoattack_accuracy is not None else r.robust_accuracy
        if r.clean_accuracy is None or robust_acc is None:
            continue
        points.append(
            Point(
                r.clean_accuracy,
                robust_acc,
                f"{r.name} ({r.experiment_id}, {r.method})",
                href=f"/experiments/{r.experiment_id}",
                highlight=r.experiment_id in chosen,
            )
        )
    return scatter(
        points,
        title="Clean vs robust accuracy of the rows shown",
        x_label="clean accuracy",
        y_label="robust accuracy (AutoAttack, else worst attack)",
        front=pareto_front(points),
        empty="no finished experiment matches these filters",
    )


def protocol_scatter(groups: Sequence[RowGroup], selected: Iterable[str] = ()) -> str | None:
    """A protocol's rows, clean vs robust accuracy; the Pareto front through the full rows only
    (partial rows are plotted, and labelled so, but rank below full ones). None when the rows
    span several protocol versions: their numbers do not compare on one plot."""
    if len({g.protocol for g in groups}) > 1:
        return None
    chosen = set(selected)
    points, full = [], []
    for group in groups:
        for r in group.rows:
            robust_acc = r.autoattack_accuracy if r.autoattack_accuracy is not None else r.robust_accuracy
            marks = [f"{r.evaluation_id}, {r.weights}"]
            if r.partial:
                marks.append(f"partial {r.n_examples}/{r.n_total or '?'}")
            if r.test_selected:
                marks.append("test-selected")
            point = Point(
                r.clean_accuracy,
                robust_acc,
                f"{r.name} ({', '.join(marks)})",
                href=f"/experiments/{r.evaluation_id}",
                highlight=row_key(r) in chosen,
            )
            points.append(point)
            if not r.partial:
                full.append(point)
    return scatter(
        points,
        title="Clean vs robust accuracy of the rows shown",
        x_label="clean accuracy",
        y_label="robust accuracy (AutoAttack, else worst case)",
        front=pareto_front(full),
        empty="no result under this protocol matches these filters",
    )
