"""Results as (checkpoint, protocol) rows: the per-protocol leaderboard, the RobustBench export and
the transfer matrix, all read from `eval_results` (written by service.ingest when a job succeeds).

The leaderboard ranks rows of one protocol version at a time: numbers measured under different
attacks, example counts or threat models never share a ranking. Within a protocol, rows on fewer
examples than its full set (`partial`) rank below every full row, then AutoAttack accuracy (else the
worst case over the suite), the worst case, clean accuracy, and the earlier result first. Rows whose
checkpoint was selected on the test set are marked (`test_selected`), not moved. Transfer results
(attacks made on another model) are not white-box numbers of the protocol: they appear in the
transfer matrix, not on the leaderboard.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from api_schemas.evaluation_views import RobustBenchModelInfo
from api_schemas.evaluations import EvaluationResultRow, TransferMatrix
from api_schemas.protocols import CUSTOM_ID, DEFAULT_PROTOCOL, UnknownProtocol, get_protocol
from service.db.models import EvalResult, Experiment, User
from service.evaluations import Invalid
from service.jobs import NotFound, get_experiment

#: RobustBench's architecture names (model_info/*.json) of this project's models
ARCHITECTURES: dict[str, str] = {
    "resnet18": "ResNet-18",
    "resnet18_bottleneck": "ResNet-18 (bottleneck)",
    "resnet18_bottleneck_stem2": "ResNet-18 (bottleneck, stem 2)",
    "preact_resnet18": "PreActResNet-18",
    "wrn28_10": "WideResNet-28-10",
    "wrn28_10_stem2": "WideResNet-28-10 (stem 2)",
    "wrn34_10": "WideResNet-34-10",
    "wrn34_20": "WideResNet-34-20",
    "inception_resnet_v2": "Inception-ResNet-v2",
}


def result_row(row: EvalResult, rank: int | None = None) -> EvaluationResultRow:
    return EvaluationResultRow(
        evaluation_id=row.job_id,
        kind="evaluation" if row.kind == "evaluation" else "training",
        name=row.name,
        owner=row.owner.name,
        team=row.team.name,
        source_experiment=row.source_experiment,
        weights=row.weights,
        checkpoint_sha256=row.checkpoint_sha256,
        protocol_id=row.protocol_id,
        protocol_version=row.protocol_version,
        method=row.method,
        dataset=row.dataset,
        norm=row.norm,
        eps=row.eps,
        model=row.model,
        n_examples=row.n_examples,
        n_total=row.n_total,
        partial=row.partial,
        test_selected=row.test_selected,
        clean_accuracy=row.clean_accuracy,
        robust_accuracy=row.robust_accuracy,
        autoattack_accuracy=row.autoattack_accuracy,
        nrr=row.nrr,
        attacks=dict(row.attacks or {}),
        transfer_source=row.transfer_source,
        precision=row.precision,
        rank=rank,
        finished_at=row.finished_at,
    )


@dataclass(frozen=True)
class ProtocolFilter:
    """Which protocol rows a leaderboard shows: one version (`version` set), every version of one
    id (custom suites: each version is its own suite), or all of them (`id` None), grouped."""

    id: str | None
    version: str | None


def protocol_filter(protocol: str | None, dataset: str | None) -> ProtocolFilter:
    """`protocol` ('lbgat', 'lbgat@1', 'custom', 'custom@<hash>') or the dataset's default; 422
    naming query.protocol for one that does not exist."""
    if protocol is None:
        default = DEFAULT_PROTOCOL.get(dataset or "")
        if default is None:
            return ProtocolFilter(None, None)
        found = get_protocol(default)
        return ProtocolFilter(found.id, str(found.version))
    name, _, version = protocol.partition("@")
    if name == CUSTOM_ID:
        return ProtocolFilter(CUSTOM_ID, version or None)
    try:
        found = get_protocol(protocol)
    except UnknownProtocol as exc:
        raise Invalid(("query", "protocol"), str(exc)) from None
    return ProtocolFilter(found.id, str(found.version))


def protocol_leaderboard(
    session: Session,
    *,
    viewer: User,
    protocol: str | None = None,
    dataset: str | None = None,
    norm: str | None = None,
    eps: float | None = None,
    method: str | None = None,
    limit: int = 50,
) -> list[EvaluationResultRow]:
    """The team's result rows of one protocol (or of each, grouped), ranked as the module says."""
    chosen = protocol_filter(protocol, dataset)
    # transfer (black-box) results answer another question: the transfer matrix shows them
    query = select(EvalResult).where(EvalResult.transfer_source.is_(None))
    if not viewer.is_admin:
        query = query.where(EvalResult.team_id == viewer.team_id)
    if chosen.id is not None:
        query = query.where(EvalResult.protocol_id == chosen.id)
    if chosen.version is not None:
        query = query.where(EvalResult.protocol_version == chosen.version)
    if dataset:
        query = query.where(EvalResult.dataset == dataset)
    if norm:
        query = query.where(EvalResult.norm == norm)
    if eps is not None:
        query = query.where(func.abs(EvalResult.eps - eps) < 1e-6)
    if method:
        query = query.where(EvalResult.method == method)
    query = query.order_by(
        EvalResult.protocol_id,
        EvalResult.protocol_version,
        case((EvalResult.partial, 1), else_=0),
        func.coalesce(EvalResult.autoattack_accuracy, EvalResult.robust_accuracy).desc(),
        EvalResult.robust_accuracy.desc(),
        EvalResult.clean_accuracy.desc(),
        EvalResult.finished_at,
        EvalResult.id,
    ).limit(limit)
    out: list[EvaluationResultRow] = []
    group: tuple[str, str] | None = None
    rank = 0
    for row in session.scalars(query):
        key = (row.protocol_id, row.protocol_version)
        rank = rank + 1 if key == group else 1
        group = key
        out.append(result_row(row, rank))
    return out


def _result(session: Session, evaluation_id: str, *, viewer: User) -> EvalResult:
    query = select(EvalResult).where(EvalResult.job_id == evaluation_id)
    if not viewer.is_admin:
        query = query.where(EvalResult.team_id == viewer.team_id)
    row = session.scalar(query.order_by(EvalResult.id).limit(1))
    if row is None:
        raise NotFound(f"result of evaluation {evaluation_id!r}")
    return row


def _eps_text(eps: float, norm: str) -> str:
    """eps as RobustBench writes it: "8/255" for a multiple of 1/255 (l_inf), else the number."""
    scaled = eps * 255
    if norm == "linf" and abs(scaled - round(scaled)) < 1e-6 and round(scaled) > 0:
        return f"{round(scaled)}/255"
    return f"{eps:g}"


def _architecture(session: Session, row: EvalResult) -> str:
    if row.model == "wide_resnet" and row.source_experiment:
        source = session.get(Experiment, row.source_experiment)
        ref = ((source.spec or {}).get("model") or {}).get("robust") or {} if source else {}
        depth, width = ref.get("depth"), ref.get("widen_factor")
        if depth and width:
            return f"WideResNet-{depth}-{width}"
    return ARCHITECTURES.get(row.model or "", row.model or "unknown")


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def robustbench_export(session: Session, evaluation_id: str, *, viewer: User) -> RobustBenchModelInfo:
    """One result as RobustBench's model_info JSON, with the numbers this service measured."""
    row = _result(session, evaluation_id, viewer=viewer)
    if row.autoattack_accuracy is None:
        raise Invalid(
            ("path", "evaluation_id"),
            f"result {evaluation_id} has no AutoAttack accuracy, which RobustBench ranks by; evaluate the "
            "checkpoint under robustbench-linf (or robustbench-l2)",
        )
    notes = [
        f"Measured by lbgat-orchestrator under protocol {row.protocol_id}@{row.protocol_version} on "
        f"{row.n_examples} test examples"
        + (f" of {row.n_total}" if row.partial and row.n_total else "")
        + ".",
    ]
    if row.partial:
        notes.append("Partial: fewer examples than the protocol's full test set.")
    if row.test_selected:
        notes.append("The checkpoint was selected on the test set: its numbers are optimistic.")
    if row.precision:
        notes.append(f"Trained in {row.precision}.")
    if row.weights == "averaged":
        notes.append("Weights: the moving average of the trained weights.")
    external = None
    if row.robust_accuracy < row.autoattack_accuracy - 1e-12:
        external = _pct(row.robust_accuracy)
        notes.append(
            f"external: the worst case over all {len(row.attacks or {})} attacks of the protocol, per example."
        )
    return RobustBenchModelInfo(
        name=row.name,
        authors=row.owner.name,
        dataset=row.dataset,
        architecture=_architecture(session, row),
        eps=_eps_text(row.eps, row.norm),
        clean_acc=_pct(row.clean_accuracy),
        reported=_pct(row.autoattack_accuracy),
        autoattack_acc=_pct(row.autoattack_accuracy),
        external=external,
        footnote=" ".join(notes),
    )


def transfer_matrix(
    session: Session, experiments: list[str], *, viewer: User, protocol: str | None = None
) -> TransferMatrix:
    """Robust accuracy of each target (column) under attacks transferred from each source (row), from
    the newest finished transfer evaluation of each pair; None where none exists. Every id must be
    an experiment of the viewer's team (404 otherwise, as the comparison answers)."""
    ids = list(dict.fromkeys(experiments))
    for exp_id in ids:
        get_experiment(session, exp_id, viewer=viewer)
    chosen = protocol_filter(protocol, None) if protocol is not None else ProtocolFilter(None, None)
    query = select(EvalResult).where(
        EvalResult.transfer_source.in_(ids), EvalResult.source_experiment.in_(ids)
    )
    if not viewer.is_admin:
        query = query.where(EvalResult.team_id == viewer.team_id)
    if chosen.id is not None:
        query = query.where(EvalResult.protocol_id == chosen.id)
    if chosen.version is not None:
        query = query.where(EvalResult.protocol_version == chosen.version)
    newest: dict[tuple[str, str], EvalResult] = {}
    for row in session.scalars(query.order_by(EvalResult.finished_at, EvalResult.id)):
        newest[(row.transfer_source or "", row.source_experiment or "")] = row
    index = {exp_id: i for i, exp_id in enumerate(ids)}
    accuracy: list[list[float | None]] = [[None] * len(ids) for _ in ids]
    evaluations: list[list[str | None]] = [[None] * len(ids) for _ in ids]
    for (source, target), row in newest.items():
        accuracy[index[source]][index[target]] = row.robust_accuracy
        evaluations[index[source]][index[target]] = row.job_id
    keys = sorted({f"{r.protocol_id}@{r.protocol_version}" for r in newest.values()})
    label = protocol or (keys[0] if len(keys) == 1 else "mixed" if keys else "")
    return TransferMatrix(experiments=ids, accuracy=accuracy, evaluations=evaluations, protocol=label)
