"""Accounting and notifications: GPU-/CPU-hour usage, team budgets, webhooks (the REST contract).

GPU-hours are GPU-equivalent hours, as the scheduler charges them: a job's GPUs times the hours it
ran, or for a job without GPUs its CPUs times LBGAT_CPU_GPU_EQUIVALENT. CPU-hours are real CPU-hours
(CPUs times hours). Hours "lost" are the part of an attempt after its last checkpoint (or its start)
that ended without success: lost to preemption, or to failures (a failed attempt, retried or not, and
an attempt the cluster lost).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from api_schemas.jobs import _Out

Period = Literal["day", "week", "month"]
BudgetAction = Literal["lower_priority", "hold"]
GroupBy = Literal["user", "team", "method"]
WebhookEvent = Literal[
    "job.succeeded", "job.failed", "job.preempted", "evaluation.succeeded", "budget.warning"
]
WEBHOOK_EVENTS: tuple[str, ...] = (
    "job.succeeded",
    "job.failed",
    "job.preempted",
    "evaluation.succeeded",
    "budget.warning",
)

NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9._-]*$"  # a team's or user's name (as UserCreate)
MAX_BUDGET_GPU_HOURS = 1e9

# An http(s) URL with a host name or IPv4 address, an optional port (1-65535) and printable ASCII
# after it: what the sender can request as is. Userinfo (`user:pass@`) is refused: it would be a
# credential stored in the clear and shown in listings.
WEBHOOK_URL_PATTERN = (
    r"^https?://[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*"
    r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?"
    r"([/?#][!-~]*)?$"
)


# -- usage -------------------------------------------------------------------------------------------


class UsageRow(_Out):
    """One group's use of the cluster over the report's window."""

    key: str = Field(description="the user's or team's name, or the method")
    team: str | None = Field(None, description="the user's team (group_by=user)")
    gpu_hours: float = Field(description="GPU-equivalent hours charged (running attempts up to now)")
    cpu_hours: float = Field(description="CPU-hours (CPUs x hours)")
    lost_preemption_gpu_hours: float = Field(description="of gpu_hours, lost to preemption")
    lost_failure_gpu_hours: float = Field(description="of gpu_hours, lost to failed or lost attempts")
    attempts: int = Field(description="attempts that ran in the window")
    running: int = Field(description="of those, attempts still running")


class BudgetOut(_Out):
    """A team's budget and where it stands in the current period (UTC calendar day, week or month)."""

    team: str
    period: Period
    gpu_hours: float = Field(description="the budget per period")
    action: BudgetAction = Field(description="what happens once it is spent")
    used_gpu_hours: float
    fraction: float = Field(description="used / budget")
    warning: bool = Field(description="at or past the warning fraction (LBGAT_BUDGET_WARNING_FRACTION)")
    exceeded: bool = Field(description="spent: the action applies to the team's waiting jobs")
    period_start: datetime
    period_end: datetime
    updated_at: datetime


class UsageReport(_Out):
    since: datetime
    until: datetime
    group_by: GroupBy
    team: str | None = Field(None, description="the team the report is limited to, if any")
    rows: list[UsageRow]
    total: UsageRow
    budgets: list[BudgetOut] = Field(description="the budgets of the teams in the report")


class BudgetIn(BaseModel):
    """PUT /v1/teams/{team}/budget."""

    model_config = ConfigDict(extra="forbid", strict=True)

    period: Period = "month"
    gpu_hours: float = Field(
        gt=0,
        le=MAX_BUDGET_GPU_HOURS,
        allow_inf_nan=False,
        description="GPU-equivalent hours per period",
    )
    action: BudgetAction | None = Field(
        None, description="once spent: lower the jobs' priority or hold them (default: the service setting)"
    )


# -- webhooks ----------------------------------------------------------------------------------------


class WebhookCreate(BaseModel):
    """POST /v1/webhooks. A user webhook hears about the caller's own jobs; a team webhook about every
    job of the team (and the team's budget warnings). Any member may add one for their team, an admin
    for any team."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(max_length=2048, pattern=WEBHOOK_URL_PATTERN, description="http or https")
    scope: Literal["user", "team"] = "user"
    team: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=NAME_PATTERN,
        description="scope=team: the team (default: yours; another team's needs an admin)",
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS), min_length=1, max_length=len(WEBHOOK_EVENTS)
    )


class WebhookOut(_Out):
    id: int
    url: str
    scope: Literal["user", "team"]
    user: str | None = Field(None, description="scope=user: whose jobs")
    team: str | None = Field(None, description="scope=team: whose jobs")
    events: list[str]
    active: bool
    created_by: str
    created_at: datetime


class CreatedWebhook(WebhookOut):
    """A new webhook with its signing secret, shown once: requests carry
    `X-Lbgat-Signature: sha256=<hex HMAC-SHA256(secret, X-Lbgat-Timestamp + "." + body)>`."""

    secret: str
