"""Evaluation jobs: resolve and validate a request, queue it as a job of the one queue, list them.

An evaluation is an `Experiment` row of kind `evaluation` whose spec is an `EvaluationJobSpec`, so the
scheduler treats it as any job (priorities, fair share, per-user limits, admission by capacity,
cancel, retry, events, logs, artifacts). Everything the worker needs is resolved here, before anything
is queued, and every refusal is an `Invalid` (422) naming the request's field:

* the target: an experiment of the caller's team (another team's is unknown, never forbidden: its
  existence is not revealed) that succeeded, and whose `best`/`last`/`averaged` weights exist; or a
  checkpoint the team uploaded (`POST /v1/checkpoints`), by sha256;
* the suite: a protocol defined for the target's dataset, in the norm the weights were trained
  against, with the request's `n_examples`/`shard_size`; an explicit suite (results say `custom`);
  or an extension of a finished evaluation of the same checkpoint (`extends` + `add_attacks`);
* a transfer source, on the same dataset.

Automatic strengthening: when the same weights already have a finished evaluation under an older
version of the requested protocol whose suite the new one extends (`api_schemas.protocols.extends`),
the job gets that evaluation as its `base`, so only the added attacks run.

Functions take an open Session and never commit (the caller owns the transaction), as service.jobs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api_schemas import SpecError, parse_spec
from api_schemas.evaluation_views import EvaluationDetail, EvaluationOut
from api_schemas.evaluations import (
    BaseRecords,
    BulkEvaluation,
    BulkResult,
    CheckpointRef,
    CheckpointTarget,
    EvaluationCreate,
    EvaluationJobSpec,
    EvaluationSummary,
    ExperimentTarget,
)
from api_schemas.jobs import JobState
from api_schemas.protocols import (
    CUSTOM_ID,
    NUM_CLASSES,
    PROTOCOLS,
    EvaluationSuite,
    Protocol,
    UnknownProtocol,
    custom_protocol_version,
    extends,
    get_protocol,
)
from api_schemas.spec import DatasetSpec, ModelRef
from service.db.models import Checkpoint, EvalResult, Event, Experiment, Trial, User
from service.jobs import ACTIVE_STATES, WAITING_STATES, JobError, NotFound, history, queue_job, to_out
from service.settings import ServiceSettings
from workers.storage import ArtifactStore, experiment_prefix

#: input channels of each dataset's images, for checking that a checkpoint fits the data
IN_CHANNELS: dict[str, int] = {
    "cifar10": 3,
    "cifar100": 3,
    "tiny_imagenet": 3,
    "mnist": 1,
    "digits": 1,
    "synthetic": 3,
}
#: experiments one bulk request considers (the oldest first); a larger team runs it again
MAX_BULK = 500
#: evaluations of the team looked through for one to strengthen (the newest first)
MAX_BASE_CANDIDATES = 500
PRECISIONS = frozenset({"bf16", "tf32", "fp32"})
SPLITS = frozenset({"heldout", "test"})

Loc = tuple[str | int, ...]


class Invalid(JobError):
    """A request refused with 422, naming the field (`loc`) as request validation does."""

    def __init__(self, loc: Loc, msg: str) -> None:
        path = dotted(loc)
        super().__init__(f"invalid request: {path}: {msg}", status=422)
        self.loc = loc
        self.msg = msg
        self.errors = [{"loc": path, "msg": msg, "type": "value_error"}]


def dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- what is evaluated -------------------------------------------------------------------------------


@dataclass
class Target:
    """Weights resolved to what the worker loads and what the result row says about them."""

    ref: CheckpointRef
    dataset: DatasetSpec
    trained_norm: str | None
    method: str
    model: str
    source_experiment: str | None
    weights: str  # best, last, averaged or upload
    training_precision: str | None = None
    selection_split: str | None = None

    def same_weights(self, other: CheckpointRef) -> bool:
        if self.ref.sha256 and other.sha256:
            return self.ref.sha256 == other.sha256 and self.ref.weights == other.weights
        return self.ref.key == other.key and self.ref.weights == other.weights


def resolve_target(
    session: Session,
    store: ArtifactStore,
    *,
    owner: User,
    target: ExperimentTarget | CheckpointTarget,
    loc: Loc,
) -> Target:
    if isinstance(target, CheckpointTarget):
        return _uploaded(session, owner=owner, sha256=target.sha256, loc=(*loc, "sha256"))
    return _experiment_weights(session, store, owner=owner, target=target, loc=loc)


def _experiment_weights(
    session: Session, store: ArtifactStore, *, owner: User, target: ExperimentTarget, loc: Loc
) -> Target:
    exp = session.scalar(
        select(Experiment).where(Experiment.id == target.experiment, Experiment.team_id == owner.team_id)
    )
    where = (*loc, "experiment")
    if exp is None:
        raise Invalid(where, f"no experiment {target.experiment!r} in your team")
    if exp.kind != "training":
        raise Invalid(where, f"{exp.id} is an evaluation; evaluate a training experiment or a checkpoint")
    if exp.state != JobState.succeeded.value:
        raise Invalid(where, f"experiment {exp.id} is {exp.state}; only a succeeded experiment has weights")
    try:
        spec = parse_spec(exp.spec, source=f"experiment {exp.id}")
    except SpecError as exc:
        raise Invalid(where, f"the stored spec of {exp.id} no longer validates: {exc}") from None
    trials = {t.name: t for t in session.scalars(select(Trial).where(Trial.experiment_id == exp.id))}
    if exp.is_sweep and target.trial not in trials:
        known = ", ".join(sorted(trials)[:10]) or "none recorded"
        raise Invalid((*loc, "trial"), f"sweep {exp.id} has no trial {target.trial!r} (trials: {known})")
    if not exp.is_sweep and target.trial != "main":
        raise Invalid((*loc, "trial"), f"{exp.id} is a single run: its trial is 'main'")
    trial = trials.get(target.trial)
    summary: dict[str, Any] = (trial.summary if trial is not None else None) or {}
    if "final" not in summary:  # a sweep's trials.json row, not the trial's summary.json: the store says
        summary = {}
    prefix = experiment_prefix(exp.id, target.trial)
    weights = target.weights
    if weights == "best":
        if summary and summary.get("best_checkpoint") is None:
            raise Invalid(
                (*loc, "weights"),
                f"experiment {exp.id} selected no best checkpoint (no selection metric or epoch); "
                "evaluate 'last' instead",
            )
        key, which, sha = prefix + "checkpoints/best.pt", "model", summary.get("best_checkpoint_sha256")
    else:
        if weights == "averaged" and spec.optimization.weight_averaging is None:
            raise Invalid(
                (*loc, "weights"),
                f"experiment {exp.id} kept no weight average (optimization.weight_averaging is unset); "
                "evaluate 'best' or 'last'",
            )
        which = "averaged" if weights == "averaged" else "model"
        key, sha = prefix + "checkpoints/last.pt", summary.get("last_checkpoint_sha256")
    if not store.exists(key):
        raise Invalid(
            (*loc, "weights"),
            f"experiment {exp.id} has no {weights} weights in the store ({key.removeprefix(experiment_prefix(exp.id))})",
        )
    results = exp.results or {}
    precision = summary.get("precision") or results.get("precision")
    split = summary.get("selection_split") if weights == "best" else None
    label = f"{exp.id}:{weights}" if target.trial == "main" else f"{exp.id}/{target.trial}:{weights}"
    return Target(
        ref=CheckpointRef(
            key=key,
            weights=which,
            sha256=sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None,
            label=label,
        ),
        dataset=spec.dataset,
        trained_norm=spec.threat_model.norm,
        method=spec.method.name,
        model=spec.model.robust.name,
        source_experiment=exp.id,
        weights=weights,
        training_precision=precision if precision in PRECISIONS else None,
        selection_split=split if split in SPLITS else None,
    )


def _uploaded(session: Session, *, owner: User, sha256: str, loc: Loc) -> Target:
    row = session.scalar(
        select(Checkpoint).where(Checkpoint.team_id == owner.team_id, Checkpoint.sha256 == sha256)
    )
    if row is None:
        raise Invalid(
            loc, f"no checkpoint {sha256[:12]}... uploaded by your team; upload it with POST /v1/checkpoints"
        )
    if row.dataset is None or row.model is None:
        raise Invalid(
            loc, f"checkpoint {sha256[:12]}... names no dataset or model; upload it again naming them"
        )
    classes = NUM_CLASSES.get(row.dataset)
    if row.num_classes is not None and classes is not None and row.num_classes != classes:
        raise Invalid(loc, f"checkpoint has {row.num_classes} classes; {row.dataset} has {classes}")
    model = None
    if row.format == "state_dict":
        model = ModelRef.model_validate(row.model_ref or {"name": row.model})
    return Target(
        ref=CheckpointRef(
            key=row.key,
            weights="model",
            sha256=row.sha256,
            model=model,
            label=row.name or f"upload {row.sha256[:12]}",
        ),
        dataset=DatasetSpec(name=row.dataset),
        trained_norm=row.norm,
        method=row.method or "upload",
        model=row.model,
        source_experiment=None,
        weights="upload",
    )


# -- which suite -------------------------------------------------------------------------------------


def _with_overrides(suite: EvaluationSuite, body: EvaluationCreate, loc: Loc) -> EvaluationSuite:
    update: dict[str, Any] = {}
    if body.n_examples is not None:
        update["n_examples"] = body.n_examples
    if body.shard_size is not None:
        update["shard_size"] = body.shard_size
    if not update:
        return suite
    try:
        return EvaluationSuite.model_validate({**suite.model_dump(mode="json"), **update})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise Invalid((*loc, *first["loc"]), first["msg"]) from None


def _check_fits(protocol: Protocol, target: Target, loc: Loc) -> None:
    if target.dataset.name not in protocol.datasets:
        raise Invalid(
            loc,
            f"protocol {protocol.key} is defined for {', '.join(protocol.datasets)}, not "
            f"{target.dataset.name}; `lbgat protocols` lists them",
        )
    if target.trained_norm is not None and target.trained_norm != protocol.norm:
        raise Invalid(
            loc,
            f"protocol {protocol.key} attacks in {protocol.norm}; {target.ref.label} was trained against "
            f"{target.trained_norm}",
        )


def _version_of(suite: EvaluationSuite, protocol_id: str, like: EvaluationSuite) -> tuple[str, str]:
    """(id, version) of `suite`: a registered version of `protocol_id` when it is exactly that
    protocol's suite (with `like`'s number of examples and shard size), else `custom`."""
    digest = suite.digest()
    for (pid, version), protocol in PROTOCOLS.items():
        if pid != protocol_id:
            continue
        candidate = protocol.suite.model_copy(
            update={"n_examples": like.n_examples, "shard_size": like.shard_size}
        )
        if candidate.digest() == digest:
            return pid, str(version)
    return CUSTOM_ID, custom_protocol_version(suite)


def _job_spec(exp: Experiment) -> EvaluationJobSpec | None:
    try:
        return EvaluationJobSpec.model_validate(exp.spec)
    except ValidationError:
        return None


def _extended(
    session: Session, *, owner: User, body: EvaluationCreate, target: Target
) -> tuple[EvaluationSuite, str, str, BaseRecords, CheckpointRef | None]:
    where = ("body", "extends")
    old = session.scalar(
        select(Experiment).where(
            Experiment.id == body.extends,
            Experiment.team_id == owner.team_id,
            Experiment.kind == "evaluation",
        )
    )
    if old is None:
        raise Invalid(where, f"no evaluation {body.extends!r} in your team")
    if old.state != JobState.succeeded.value:
        raise Invalid(
            where, f"evaluation {old.id} is {old.state}; only a finished evaluation can be extended"
        )
    old_spec = _job_spec(old)
    if old_spec is None:
        raise Invalid(where, f"the stored spec of evaluation {old.id} no longer validates")
    if not target.same_weights(old_spec.checkpoint):
        raise Invalid(
            where,
            f"evaluation {old.id} evaluated {old_spec.checkpoint.label or old_spec.checkpoint.key}, not "
            f"{target.ref.label}: extend an evaluation of the same weights",
        )
    data = old_spec.suite.model_dump(mode="json")
    data["attacks"] = [*data["attacks"], *(a.model_dump(mode="json") for a in body.add_attacks)]
    try:
        suite = EvaluationSuite.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise Invalid(("body", "add_attacks"), first["msg"]) from None
    suite = _with_overrides(suite, body, ("body",))
    if not extends(old_spec.suite, suite):
        raise Invalid(
            where,
            f"the suite would not extend evaluation {old.id}'s (same threat model, split, examples, seed "
            "and shards, its attacks first): drop n_examples/shard_size",
        )
    pid, version = _version_of(suite, old_spec.protocol_id, old_spec.suite)
    base = BaseRecords(evaluation_id=old.id, n_attacks=len(old_spec.suite.attacks))
    return suite, pid, version, base, old_spec.transfer_source


def _strengthens(
    session: Session,
    *,
    owner: User,
    target: Target,
    protocol: Protocol,
    suite: EvaluationSuite,
    transfer: CheckpointRef | None,
) -> BaseRecords | None:
    """The newest finished evaluation of the same weights under an older version of `protocol` whose
    suite the new one extends: its records are reused, only the added attacks run."""
    rows = session.scalars(
        select(Experiment)
        .where(
            Experiment.team_id == owner.team_id,
            Experiment.kind == "evaluation",
            Experiment.state == JobState.succeeded.value,
            Experiment.dataset == target.dataset.name,
        )
        .order_by(Experiment.finished_at.desc(), Experiment.id.desc())
        .limit(MAX_BASE_CANDIDATES)
    )
    for exp in rows:
        spec = _job_spec(exp)
        if spec is None or spec.protocol_id != protocol.id or not spec.protocol_version.isdigit():
            continue
        if int(spec.protocol_version) >= protocol.version or not target.same_weights(spec.checkpoint):
            continue
        if (spec.transfer_source is None) != (transfer is None) or (
            transfer is not None
            and spec.transfer_source is not None
            and spec.transfer_source.key != transfer.key
        ):
            continue
        if extends(spec.suite, suite):
            return BaseRecords(evaluation_id=exp.id, n_attacks=len(spec.suite.attacks))
    return None


# -- planning and queueing ---------------------------------------------------------------------------


@dataclass
class Planned:
    spec: EvaluationJobSpec
    target: Target


def _name(body: EvaluationCreate, target: Target, protocol_id: str) -> str:
    if body.name:
        return body.name
    what = target.source_experiment or f"upload-{(target.ref.sha256 or 'x')[:8]}"
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", f"eval-{what}-{protocol_id}")[:128]


def plan_evaluation(
    session: Session, store: ArtifactStore, *, owner: User, body: EvaluationCreate
) -> Planned:
    """Resolve and check everything the request names; the EvaluationJobSpec to queue."""
    target = resolve_target(session, store, owner=owner, target=body.target, loc=("body", "target"))
    transfer: Target | None = None
    if body.transfer_from is not None:
        transfer = resolve_target(
            session, store, owner=owner, target=body.transfer_from, loc=("body", "transfer_from")
        )
        if transfer.dataset.name != target.dataset.name:
            raise Invalid(
                ("body", "transfer_from"),
                f"the source was trained on {transfer.dataset.name}; the target on {target.dataset.name}",
            )
    transfer_ref = transfer.ref if transfer is not None else None
    base: BaseRecords | None = None
    if body.extends is not None:
        suite, protocol_id, version, base, inherited = _extended(
            session, owner=owner, body=body, target=target
        )
        transfer_ref = transfer_ref or inherited
    elif body.protocol is not None:
        try:
            protocol = get_protocol(body.protocol)
        except UnknownProtocol as exc:
            raise Invalid(("body", "protocol"), str(exc)) from None
        _check_fits(protocol, target, ("body", "protocol"))
        suite = _with_overrides(protocol.suite, body, ("body",))
        protocol_id, version = protocol.id, str(protocol.version)
        base = _strengthens(
            session, owner=owner, target=target, protocol=protocol, suite=suite, transfer=transfer_ref
        )
    else:
        assert body.suite is not None  # EvaluationCreate checks that one of the three is given
        suite = _with_overrides(body.suite, body, ("body", "suite"))
        norm = suite.threat_model.norm
        if target.trained_norm is not None and target.trained_norm != norm:
            raise Invalid(
                ("body", "suite", "threat_model", "norm"),
                f"the suite attacks in {norm}; {target.ref.label} was trained against {target.trained_norm}",
            )
        protocol_id, version = CUSTOM_ID, custom_protocol_version(suite)
    res = body.resources
    spec = EvaluationJobSpec(
        name=_name(body, target, protocol_id),
        protocol_id=protocol_id,
        protocol_version=version,
        suite=suite,
        dataset=target.dataset,
        checkpoint=target.ref,
        transfer_source=transfer_ref,
        base=base,
        num_workers=res.num_workers,
        gpus_per_worker=res.gpus_per_worker,
        cpus_per_worker=res.cpus_per_worker,
        use_gpu=res.use_gpu,
        save_adversarial=body.save_adversarial,
        source_experiment=target.source_experiment,
        target_weights=target.weights,
        training_precision=target.training_precision,
        selection_split=target.selection_split,
    )
    return Planned(spec=spec, target=target)


def queue_evaluation(
    session: Session,
    planned: Planned,
    *,
    owner: User,
    settings: ServiceSettings,
    priority: int = 0,
    max_attempts: int | None = None,
    tags: list[str] | None = None,
    idempotency_key: str | None = None,
) -> tuple[Experiment, bool]:
    spec, target = planned.spec, planned.target
    gpus = 0.0 if spec.use_gpu is False else spec.num_workers * spec.gpus_per_worker
    return queue_job(
        session,
        owner=owner,
        kind="evaluation",
        name=spec.name,
        spec_data=spec.model_dump(mode="json"),
        method=target.method,
        dataset=target.dataset.name,
        norm=spec.suite.threat_model.norm,
        eps=float(spec.suite.threat_model.eps),
        model=target.model,
        is_sweep=False,
        gpus=gpus,
        cpus=spec.num_workers * spec.cpus_per_worker,
        use_gpu=spec.use_gpu,
        settings=settings,
        priority=priority,
        max_attempts=max_attempts,
        tags=tags,
        idempotency_key=idempotency_key,
    )


def create_evaluation(
    session: Session,
    store: ArtifactStore,
    *,
    owner: User,
    body: EvaluationCreate,
    settings: ServiceSettings,
    idempotency_key: str | None = None,
) -> tuple[Experiment, bool]:
    planned = plan_evaluation(session, store, owner=owner, body=body)
    return queue_evaluation(
        session,
        planned,
        owner=owner,
        settings=settings,
        priority=body.priority,
        max_attempts=body.max_attempts,
        tags=list(body.tags),
        idempotency_key=idempotency_key,
    )


# -- bulk --------------------------------------------------------------------------------------------


def bulk_evaluate(
    session: Session,
    store: ArtifactStore,
    *,
    owner: User,
    body: BulkEvaluation,
    settings: ServiceSettings,
) -> BulkResult:
    """Queue `body.protocol` for every succeeded training experiment of the team (of `body.dataset`)
    that has no result under it for `body.weights` and no such evaluation waiting or running. With
    `dry_run`, `queued` lists the experiments that would be evaluated and nothing is queued."""
    try:
        protocol = get_protocol(body.protocol)
    except UnknownProtocol as exc:
        raise Invalid(("body", "protocol"), str(exc)) from None
    if body.dataset is not None and body.dataset not in protocol.datasets:
        raise Invalid(
            ("body", "dataset"),
            f"protocol {protocol.key} is defined for {', '.join(protocol.datasets)}, not {body.dataset}",
        )
    query = select(Experiment).where(
        Experiment.team_id == owner.team_id,
        Experiment.kind == "training",
        Experiment.state == JobState.succeeded.value,
    )
    if body.dataset is not None:
        query = query.where(Experiment.dataset == body.dataset)
    experiments = list(
        session.scalars(query.order_by(Experiment.created_at, Experiment.id).limit(MAX_BULK + 1))
    )
    skipped: dict[str, str] = {}
    if len(experiments) > MAX_BULK:
        experiments = experiments[:MAX_BULK]
        skipped["..."] = f"only the first {MAX_BULK} experiments were considered; run the request again"
    ids = [e.id for e in experiments]
    version = str(protocol.version)
    have = {
        (row.source_experiment, row.job_id)
        for row in session.execute(
            select(EvalResult.source_experiment, EvalResult.job_id).where(
                EvalResult.team_id == owner.team_id,
                EvalResult.protocol_id == protocol.id,
                EvalResult.protocol_version == version,
                EvalResult.weights == body.weights,
                EvalResult.transfer_source.is_(None),
                EvalResult.source_experiment.in_(ids),
            )
        )
    }
    done = {source: job for source, job in have}
    pending: dict[str, str] = {}
    for job in session.scalars(
        select(Experiment).where(
            Experiment.team_id == owner.team_id,
            Experiment.kind == "evaluation",
            Experiment.state.in_([*WAITING_STATES, *ACTIVE_STATES]),
        )
    ):
        spec = _job_spec(job)
        if (
            spec is not None
            and spec.protocol_id == protocol.id
            and spec.protocol_version == version
            and spec.target_weights == body.weights
            and spec.transfer_source is None
            and spec.source_experiment is not None
        ):
            pending[spec.source_experiment] = job.id
    queued: list[str] = []
    for exp in experiments:
        if exp.id in done:
            skipped[exp.id] = f"has a result under {protocol.key} ({done[exp.id]})"
            continue
        if exp.id in pending:
            skipped[exp.id] = (
                f"evaluation {pending[exp.id]} under {protocol.key} is already queued or running"
            )
            continue
        if exp.is_sweep:
            skipped[exp.id] = "a sweep: evaluate one of its trials (`lbgat evaluate EXP --trial NAME`)"
            continue
        request = EvaluationCreate(
            target=ExperimentTarget(experiment=exp.id, weights=body.weights),
            protocol=protocol.key,
            resources=body.resources,
            priority=body.priority,
        )
        try:
            planned = plan_evaluation(session, store, owner=owner, body=request)
        except Invalid as exc:
            skipped[exp.id] = exc.msg
            continue
        if body.dry_run:
            queued.append(exp.id)
            continue
        job, _ = queue_evaluation(session, planned, owner=owner, settings=settings, priority=body.priority)
        queued.append(job.id)
    return BulkResult(queued=queued, skipped=skipped)


# -- views -------------------------------------------------------------------------------------------


def get_evaluation(session: Session, evaluation_id: str, *, viewer: User) -> Experiment:
    query = select(Experiment).where(Experiment.id == evaluation_id, Experiment.kind == "evaluation")
    exp = session.scalar(query)
    if exp is None or (not viewer.is_admin and exp.team_id != viewer.team_id):
        raise NotFound(f"evaluation {evaluation_id!r}")
    return exp


def _transfer_label(ref: CheckpointRef | None) -> str | None:
    if ref is None:
        return None
    return ref.label or ref.key


def to_evaluation_out(
    exp: Experiment, *, settings: ServiceSettings, queue: dict[str, tuple[int, str]] | None = None
) -> EvaluationOut:
    base = to_out(exp, settings=settings, queue=queue).model_dump()
    spec = exp.spec or {}
    checkpoint = spec.get("checkpoint") or {}
    latest = exp.latest_metrics or {}
    accuracy = latest.get("accuracy") if isinstance(latest.get("accuracy"), dict) else {}
    transfer = spec.get("transfer_source") or None
    return EvaluationOut(
        **base,
        protocol_id=str(spec.get("protocol_id", "")),
        protocol_version=str(spec.get("protocol_version", "")),
        target=str(checkpoint.get("label") or checkpoint.get("key") or ""),
        source_experiment=spec.get("source_experiment"),
        weights=str(spec.get("target_weights", "upload")),
        checkpoint_sha256=checkpoint.get("sha256"),
        transfer_source=(transfer.get("label") or transfer.get("key"))
        if isinstance(transfer, dict)
        else None,
        extends=(spec.get("base") or {}).get("evaluation_id"),
        n_shards=_int(latest.get("n_shards")),
        shards_done=_int(latest.get("shards_done")),
        accuracy={k: float(v) for k, v in accuracy.items() if isinstance(v, (int, float))},
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def evaluation_detail(
    session: Session,
    exp: Experiment,
    *,
    settings: ServiceSettings,
    queue: dict[str, tuple[int, str]] | None = None,
) -> EvaluationDetail:
    from service.leaderboard import result_row

    out = to_evaluation_out(exp, settings=settings, queue=queue)
    trial = session.scalar(select(Trial).where(Trial.experiment_id == exp.id, Trial.name == "main"))
    summary = None
    if trial is not None and trial.summary:
        try:
            summary = EvaluationSummary.model_validate(trial.summary)
        except ValidationError:
            summary = None
    progress = [
        e.data
        for e in session.scalars(
            select(Event).where(Event.experiment_id == exp.id, Event.kind == "metric").order_by(Event.id)
        )
    ]
    row = session.scalar(select(EvalResult).where(EvalResult.job_id == exp.id).limit(1))
    return EvaluationDetail(
        **out.model_dump(),
        spec=exp.spec,
        error_log_tail=exp.error_log_tail,
        history=history(session, exp.id),
        progress=progress,
        summary=summary,
        result=result_row(row) if row is not None else None,
    )
