"""The control plane's REST contract: jobs (experiments), their states, users, tokens, results.

Shared by the service (responses), the Python client and the CLI (parsing), so that all three agree
on one definition. Only pydantic here: the CLI loads without the service's dependencies.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The largest value an `Integer` column holds on every backend the service runs on: PostgreSQL's
# `integer` is 32-bit (SQLite's is 64-bit). Every integer a client sends that reaches the database
# (ids, limits, counters) is bounded by it, so an overflow is a 422 naming the field, never a driver
# error.
DB_INT_MAX = 2**31 - 1

# Submission options, shared by the JSON body (ExperimentCreate) and a YAML upload's query parameters.
PRIORITY_MIN, PRIORITY_MAX = -100, 100
MAX_ATTEMPTS_MAX = 20
MAX_TAGS = 16


class JobState(str, Enum):
    """`queued -> dispatching -> running -> succeeded | failed | cancelled`; `retrying` after a failed attempt."""

    queued = "queued"
    dispatching = "dispatching"
    running = "running"
    retrying = "retrying"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def active(self) -> bool:
        """Holds (or is about to hold) a Ray job and cluster resources."""
        return self in (JobState.dispatching, JobState.running)


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# -- experiments -------------------------------------------------------------------------------------

# A tag labels a job in listings and the CLI's tables: short, never empty, and made of characters
# that need no quoting in a URL, a shell or a log line.
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/+=@-]*$"
Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=TAG_PATTERN)]


class ExperimentCreate(BaseModel):
    """POST /v1/experiments (JSON). A YAML upload sends the spec alone as the body, options as query."""

    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] = Field(description="an ExperimentSpec (validated; errors name the field path)")
    # strict: JSON `true` is not the number 1 (pydantic's lax mode would take it as one)
    priority: int = Field(
        0,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        strict=True,
        description="higher runs first; fair share breaks ties",
    )
    max_attempts: int | None = Field(
        None,
        ge=1,
        le=MAX_ATTEMPTS_MAX,
        strict=True,
        description="Ray job attempts before `failed` (default: the service setting)",
    )
    tags: list[Tag] = Field(
        default_factory=list,
        max_length=MAX_TAGS,
        description="1-64 characters each: letters, digits, ._:/+=@-",
    )


class QueueInfo(_Out):
    """Why a queued job waits, and where it stands."""

    position: int = Field(description="1 = next to be considered")
    reason: str
    estimated_start: datetime | None = Field(
        None,
        description="when the scheduler expects the job to start, from what runs now (epochs done, "
        "epoch durations, epochs left) and what is ahead of it; null when it cannot tell",
    )


class FairShareStanding(_Out):
    """The owner's and the team's GPU-hours in the fair-share window (LBGAT_FAIR_SHARE_WINDOW_H), and
    their share of all GPU-hours used in it (0 to 1); lower standing runs first among equal priorities."""

    user_gpu_hours: float
    user_share: float
    team_gpu_hours: float
    team_share: float


class QueueEntry(_Out):
    """A job of the queue: waiting (position, reason, estimated start) or running (expected end)."""

    position: int | None = Field(None, description="waiting jobs: 1 = next to be considered; null if running")
    id: str
    name: str
    kind: Literal["training", "evaluation"] = "training"
    state: JobState
    priority: int
    effective_priority: int = Field(
        description="the priority the scheduler uses: lowered while the team's budget is spent"
    )
    owner: str
    team: str
    fair_share: FairShareStanding
    gpus: float
    cpus: float
    reason: str | None = Field(None, description="why a waiting job waits")
    estimated_start: datetime | None = Field(
        None, description="waiting jobs: when they are expected to start"
    )
    started_at: datetime | None = None
    expected_end: datetime | None = Field(None, description="running jobs: when they are expected to end")
    preempted_by: str | None = Field(
        None, description="a running job being preempted: the job it makes way for"
    )
    preemptions: int = Field(0, description="times the job was preempted so far")


class QueueOut(_Out):
    """GET /v1/queue: the running jobs and the waiting ones in queue order (those the caller may see)."""

    generated_at: datetime
    fair_share_window_h: float
    running: list[QueueEntry]
    waiting: list[QueueEntry]
    more_waiting: int = Field(0, description="waiting jobs past `limit`, not listed")


class StateChange(_Out):
    from_state: JobState | None
    to_state: JobState
    at: datetime
    reason: str | None = None


class TrialOut(_Out):
    name: str
    state: str | None = None
    latest_metrics: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None


class ResultRow(_Out):
    """One row of the leaderboard: the final (or best) model of a finished experiment."""

    experiment_id: str
    name: str
    owner: str
    team: str
    method: str
    dataset: str
    norm: str
    eps: float
    model: str | None = None
    clean_accuracy: float | None = None
    robust_accuracy: float | None = Field(None, description="lowest accuracy over the suite's attacks")
    autoattack_accuracy: float | None = None
    nrr: float | None = None
    attacks: dict[str, float] = Field(default_factory=dict, description="accuracy under each attack")
    precision: str | None = Field(
        None, description="the precision the reported weights were trained in (fp32, tf32, bf16)"
    )
    selection_split: str | None = Field(
        None,
        description="where the reported checkpoint was selected: `test` (the papers' protocol: the "
        "number is optimistic), `heldout` (training images held out), or None (the last epoch's)",
    )
    finished_at: datetime | None = None


class ExperimentOut(_Out):
    id: str
    kind: Literal["training", "evaluation"] = Field(
        "training", description="a training run (spec: ExperimentSpec) or an evaluation (EvaluationJobSpec)"
    )
    name: str
    owner: str
    team: str
    state: JobState
    priority: int
    method: str
    dataset: str
    norm: str
    eps: float
    gpus: float
    cpus: float
    is_sweep: bool
    tags: list[str] = Field(default_factory=list)
    attempts: int
    max_attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    ray_job_id: str | None = None
    dashboard_url: str | None = None
    queue: QueueInfo | None = None
    latest_metrics: dict[str, Any] | None = None


class ExperimentDetail(ExperimentOut):
    spec: dict[str, Any]
    error_log_tail: str | None = Field(
        None, description="the end of the failed attempt's Ray job log (`error` holds its one-line cause)"
    )
    history: list[StateChange] = Field(default_factory=list)
    trials: list[TrialOut] = Field(default_factory=list)
    metrics: list[dict[str, Any]] = Field(default_factory=list, description="metrics.jsonl rows (main trial)")
    results: ResultRow | None = None


class ExperimentPage(_Out):
    items: list[ExperimentOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null at the end")


class ArtifactOut(_Out):
    path: str = Field(description="relative to the experiment's prefix, e.g. main/checkpoints/last.pt")
    size: int
    modified: datetime | None = None


class ArtifactLink(_Out):
    path: str
    url: str
    expires_in_s: int


class Comparison(_Out):
    rows: list[ResultRow]
    attacks: list[str] = Field(description="attack names present in any row, in a stable order")


# -- users -------------------------------------------------------------------------------------------


class UserCreate(BaseModel):
    # strict: JSON `1`/`"true"` are not booleans and `true`/`"3"` not numbers (lax mode takes them)
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]*$")
    team: str = Field("default", min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._-]*$")
    is_admin: bool = False
    max_running_jobs: int | None = Field(
        None, ge=0, le=DB_INT_MAX, description="default: the service setting"
    )
    max_gpus: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="default: the service setting (finite: JSON has no inf)",
    )


class UserOut(_Out):
    name: str
    team: str
    is_admin: bool
    max_running_jobs: int | None = None
    max_gpus: float | None = None
    created_at: datetime


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # shown in listings; no control characters (PostgreSQL's text cannot even hold a NUL)
    label: str = Field("cli", max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")


class TokenOut(_Out):
    """A new API token. `token` is shown once; the service keeps only its hash."""

    id: int
    user: str
    label: str
    token: str
    prefix: str


class CreatedUser(_Out):
    user: UserOut
    token: TokenOut


# -- service -----------------------------------------------------------------------------------------


class Readiness(_Out):
    ready: bool
    checks: dict[str, str] = Field(description="component -> 'ok' or the reason it is not")


class ErrorDetail(_Out):
    """Body of every 4xx/5xx answer: `detail` for people, `errors` (field paths) for a 422."""

    detail: str
    errors: list[dict[str, Any]] = Field(default_factory=list)
