"""Tables of the control plane: teams, users, API tokens, experiments (the job queue: training runs
and evaluations), trials, events, uploaded checkpoints and evaluation results.

Schema changes go through Alembic (service/db/migrations); `metadata` here is what the first
revision creates and what `alembic check` compares against.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# Stable constraint names, so that migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}  # noqa: RUF012


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"), index=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_gpus: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    team: Mapped[Team] = relationship(lazy="joined")


class ApiToken(Base):
    """Only the SHA-256 of a token is kept: tokens are 256-bit random strings, so a fast hash suffices."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(64), default="cli")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)

    user: Mapped[User] = relationship(lazy="joined")


class Experiment(Base):
    """One submitted spec: a job of the queue, its Ray attempts, its results."""

    __tablename__ = "experiments"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_experiments_owner_idempotency"),
        Index("ix_experiments_queue", "state", "priority", "created_at"),
        Index("ix_experiments_owner_state", "owner_id", "state"),
        Index("ix_experiments_created", "created_at", "id"),
        Index("ix_experiments_team_kind", "team_id", "kind", "state"),
        # the listing's orders (jobs.list_experiments: newest first, by a state and/or the team)
        Index("ix_experiments_state_created", "state", "created_at", "id"),
        Index("ix_experiments_team_created", "team_id", "created_at", "id"),
        Index("ix_experiments_team_state_created", "team_id", "state", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(
        String(16),
        default="training",
        server_default="training",
        doc="'training' (spec: an ExperimentSpec) or 'evaluation' (spec: an EvaluationJobSpec)",
    )
    name: Mapped[str] = mapped_column(String(128))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    tags: Mapped[list[Any]] = mapped_column(default=list)

    method: Mapped[str] = mapped_column(String(32), index=True)
    dataset: Mapped[str] = mapped_column(String(32), index=True)
    norm: Mapped[str] = mapped_column(String(8))
    eps: Mapped[float] = mapped_column(Float)
    model: Mapped[str] = mapped_column(String(64))
    is_sweep: Mapped[bool] = mapped_column(Boolean, default=False)
    gpus: Mapped[float] = mapped_column(Float, default=0.0, doc="GPUs the job holds while it runs")
    gpu_optional: Mapped[bool] = mapped_column(
        Boolean, default=False, doc="resources.use_gpu is auto: runs on CPUs where the cluster has no GPU"
    )
    cpus: Mapped[float] = mapped_column(Float, default=1.0)
    charge_rate: Mapped[float] = mapped_column(Float, doc="GPU-equivalents charged per second of running")
    spec: Mapped[dict[str, Any]] = mapped_column()
    spec_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=2)
    ray_job_id: Mapped[str | None] = mapped_column(String(96), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(
        Text, nullable=True, doc="why the last attempt failed: one clean line (the worker's `error:` line)"
    )
    error_log_tail: Mapped[str | None] = mapped_column(
        Text, nullable=True, doc="the end of the failed attempt's Ray job log (ANSI codes removed)"
    )

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    dispatched_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0, doc="charged GPU-seconds of past attempts")

    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)

    # preemption (migration 0004): a job asked to make way for a higher-priority one
    preempted_by: Mapped[str | None] = mapped_column(
        String(64), nullable=True, doc="the job this one is (or was last) preempted for"
    )
    preempt_requested_at: Mapped[datetime | None] = mapped_column(
        nullable=True, doc="when the scheduler asked the running attempt to checkpoint and stop"
    )
    preemptions: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_checkpoint_at: Mapped[datetime | None] = mapped_column(
        nullable=True, doc="when the running attempt last stored a checkpoint (from its metrics)"
    )
    lost_gpu_seconds: Mapped[float] = mapped_column(
        Float,
        default=0.0,
        server_default="0",
        doc="charged GPU-seconds whose work was lost (preemption, failure)",
    )
    estimated_start_at: Mapped[datetime | None] = mapped_column(
        nullable=True, doc="the scheduler's latest estimate of when this waiting job starts"
    )
    results: Mapped[dict[str, Any] | None] = mapped_column(nullable=True, doc="a ResultRow, when finished")
    clean_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    robust_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    autoattack_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)

    owner: Mapped[User] = relationship(lazy="joined", foreign_keys=[owner_id])
    team: Mapped[Team] = relationship(lazy="joined", foreign_keys=[team_id])


class Trial(Base):
    """A Ray Train run of an experiment: `main`, or one trial of a sweep."""

    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("experiment_id", "name", name="uq_trials_experiment_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    metrics_lines: Mapped[int] = mapped_column(Integer, default=0, doc="metrics.jsonl lines ingested")
    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    summary: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)


class Event(Base):
    """Append-only log of state changes and metric rows: the state history and the SSE stream's source."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_experiment_id_id", "experiment_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), doc="'state' or 'metric'")
    trial: Mapped[str | None] = mapped_column(String(128), nullable=True)
    data: Mapped[dict[str, Any]] = mapped_column()
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    """A checkpoint uploaded by a team: stored once by content at `checkpoints/<sha256>.pt`, owned by
    every team that uploaded it (one row per team), described by what the upload's inspection read."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("team_id", "sha256", name="uq_checkpoints_team_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    size: Mapped[int] = mapped_column(BigInteger)
    key: Mapped[str] = mapped_column(String(512), doc="store key of the file")
    format: Mapped[str] = mapped_column(String(16), doc="'checkpoint' (this project's) or 'state_dict'")
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_ref: Mapped[dict[str, Any] | None] = mapped_column(nullable=True, doc="a ModelRef, as JSON")
    method: Mapped[str | None] = mapped_column(String(32), nullable=True)
    num_classes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    in_channels: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dataset: Mapped[str | None] = mapped_column(String(32), nullable=True)
    norm: Mapped[str | None] = mapped_column(String(8), nullable=True)
    eps: Mapped[float | None] = mapped_column(Float, nullable=True)
    has_averaged: Mapped[bool] = mapped_column(Boolean, default=False)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    owner: Mapped[User] = relationship(lazy="joined", foreign_keys=[owner_id])


class EvalResult(Base):
    """One (checkpoint, protocol) result: an evaluation job's summary, or a training run's reported
    model (its protocol from the run's summary, else `custom`). The leaderboard ranks these rows."""

    __tablename__ = "eval_results"
    __table_args__ = (
        UniqueConstraint("job_id", "weights", name="uq_eval_results_job_weights"),
        Index("ix_eval_results_board", "protocol_id", "protocol_version", "team_id"),
        Index("ix_eval_results_team_checkpoint", "team_id", "checkpoint_sha256"),
        Index("ix_eval_results_team_source", "team_id", "source_experiment"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(16), doc="'evaluation' or 'training'")
    name: Mapped[str] = mapped_column(String(128))
    source_experiment: Mapped[str | None] = mapped_column(String(64), nullable=True)
    weights: Mapped[str] = mapped_column(String(16), doc="best, last, averaged or upload")
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    protocol_id: Mapped[str] = mapped_column(String(64))
    protocol_version: Mapped[str] = mapped_column(String(32))
    dataset: Mapped[str] = mapped_column(String(32))
    norm: Mapped[str] = mapped_column(String(8))
    eps: Mapped[float] = mapped_column(Float)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[str | None] = mapped_column(String(32), nullable=True)
    n_examples: Mapped[int] = mapped_column(Integer)
    n_total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    partial: Mapped[bool] = mapped_column(Boolean, default=False)
    test_selected: Mapped[bool] = mapped_column(Boolean, default=False)
    precision: Mapped[str | None] = mapped_column(String(8), nullable=True, doc="training precision")
    clean_accuracy: Mapped[float] = mapped_column(Float)
    robust_accuracy: Mapped[float] = mapped_column(Float)
    autoattack_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    nrr: Mapped[float | None] = mapped_column(Float, nullable=True)
    attacks: Mapped[dict[str, Any]] = mapped_column(default=dict, doc="attack name -> accuracy")
    summary: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    transfer_source: Mapped[str | None] = mapped_column(
        String(256), nullable=True, doc="the source experiment of a transfer evaluation (or sha256:<hex>)"
    )
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)

    owner: Mapped[User] = relationship(lazy="joined", foreign_keys=[owner_id])
    team: Mapped[Team] = relationship(lazy="joined", foreign_keys=[team_id])


class StartEstimate(Base):
    """An estimated start time as the scheduler made it, kept so that its error can be measured
    once the job starts (`started_at - estimated_start`)."""

    __tablename__ = "start_estimates"
    __table_args__ = (Index("ix_start_estimates_experiment_made", "experiment_id", "made_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    made_at: Mapped[datetime] = mapped_column(default=utcnow)
    estimated_start: Mapped[datetime] = mapped_column()
    position: Mapped[int] = mapped_column(Integer)


class UsageRecord(Base):
    """One attempt's use of the cluster, written when the attempt leaves `running`: the accounting
    ledger (GPU- and CPU-hours per user, team and method; hours lost to preemption and failures)."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_team_ended", "team_id", "ended_at"),
        Index("ix_usage_records_user_ended", "user_id", "ended_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # kept when the experiment is deleted: a team cannot shrink its usage by deleting jobs
    experiment_id: Mapped[str | None] = mapped_column(
        ForeignKey("experiments.id", ondelete="SET NULL"), nullable=True, index=True
    )
    attempt: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id"))
    method: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16), default="training")
    gpus: Mapped[float] = mapped_column(Float, default=0.0)
    cpus: Mapped[float] = mapped_column(Float, default=0.0)
    started_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime] = mapped_column()
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str] = mapped_column(
        String(16), doc="succeeded | failed | retrying | preempted | cancelled | lost"
    )
    lost_gpu_seconds: Mapped[float] = mapped_column(
        Float, default=0.0, doc="of gpu_seconds, the part whose work is lost (since the last checkpoint)"
    )


class TeamBudget(Base):
    """GPU-hours a team may use per period; once spent its jobs get lower priority or are held."""

    __tablename__ = "team_budgets"

    team_id: Mapped[int] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), doc="day | week | month")
    gpu_hours: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(16), doc="lower_priority | hold")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Webhook(Base):
    """A URL told about a user's or a team's jobs, each request signed with `secret` (HMAC-SHA256)."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True
    )
    team_id: Mapped[int | None] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), nullable=True, index=True
    )
    created_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128), doc="signing key; shown once, at creation")
    events: Mapped[list[Any]] = mapped_column(default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event for one webhook: delivered by a background sender, retried with backoff."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "delivered_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column()
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(nullable=True, doc="gave up after the last retry")
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
