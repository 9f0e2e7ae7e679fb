"""Prometheus metrics of the control plane, served at GET /metrics.

Each app has its own CollectorRegistry (several apps in one test process never collide). What it holds:

* `lbgat_jobs{state}` - jobs per state (the queue's depth), one GROUP BY at scrape time;
* `lbgat_user_jobs{user,state}` - each user's waiting and active jobs, one GROUP BY at scrape time;
* `lbgat_jobs_state_seconds_max{state}` and `..._mean{state}` - how long the jobs now waiting
  (queued, retrying) or active (dispatching, running) have been in that state: the queue's wait;
* `lbgat_request_seconds{method,route,status}` - request latency, labelled by the route template
  (`/v1/experiments/{experiment_id}`), never the raw path, so that ids do not explode the label set;
* `lbgat_dispatch_seconds` - time from a job's submission (or retry) to its Ray job being submitted.
  The scheduler runs once per process, so this one histogram is process-wide: the scheduler calls
  `observe_dispatch(seconds)` and every app's registry exposes it.
* `lbgat_team_gpu_hours{team,period}`, `lbgat_team_lost_gpu_hours{team,period,cause}` (cause:
  preemption, failure), `lbgat_team_budget_gpu_hours{team,period}` and `lbgat_team_budget_fraction{team}`:
  each team's GPU-hours in its current budget period (a calendar month without a budget), read from
  the usage ledger at scrape time (service.accounting);
* `lbgat_scheduler_round_seconds` - how long each scheduling round took (process-wide likewise, via
  `observe_round`): a round that grows means something it waits on (database, Ray, store) is slow.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_schemas.jobs import JobState
from service.db.models import Experiment, Team, User, utcnow
from service.settings import ServiceSettings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; submissions are milliseconds, dispatch waits for a free slot (seconds to hours).
REQUEST_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DISPATCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0)

DISPATCH_SECONDS = Histogram(
    "lbgat_dispatch_seconds",
    "Time from a job's submission (or retry) to the submission of its Ray job",
    buckets=DISPATCH_BUCKETS,
    registry=None,  # registered in each app's registry by ServiceMetrics
)


ROUND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

ROUND_SECONDS = Histogram(
    "lbgat_scheduler_round_seconds",
    "Duration of one scheduling round (dispatch, reconcile with Ray, read metrics and results)",
    buckets=ROUND_BUCKETS,
    registry=None,  # registered in each app's registry by ServiceMetrics
)


def observe_round(seconds: float) -> None:
    """Record one scheduling round's duration (the scheduler calls this after every round)."""
    ROUND_SECONDS.observe(max(0.0, float(seconds)))


def observe_dispatch(seconds: float) -> None:
    """Record one dispatch latency (the scheduler calls this once per Ray job it submits)."""
    DISPATCH_SECONDS.observe(max(0.0, float(seconds)))


class _QueueCollector(Collector):
    """Reads job counts from the database at scrape time (the database is the truth, not a counter)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: do not run the queries at registration

    def collect(self) -> Iterable[Metric]:
        per_user_states = [
            JobState.queued.value,
            JobState.retrying.value,
            JobState.dispatching.value,
            JobState.running.value,
        ]
        with self.sessions() as session:
            by_state = dict(
                session.execute(select(Experiment.state, func.count()).group_by(Experiment.state)).all()
            )
            by_user = session.execute(
                select(User.name, Experiment.state, func.count())
                .join(User, Experiment.owner_id == User.id)
                .where(Experiment.state.in_(per_user_states))
                .group_by(User.name, Experiment.state)
            ).all()
        now = utcnow()
        entered = {  # when a job now in the state entered it
            JobState.queued.value: Experiment.updated_at,
            JobState.retrying.value: Experiment.updated_at,
            JobState.dispatching.value: Experiment.dispatched_at,
            JobState.running.value: Experiment.started_at,
        }
        waits: dict[str, list[float]] = {state: [] for state in entered}
        with self.sessions() as session:
            for state, column in entered.items():
                for (since,) in session.execute(
                    select(column).where(Experiment.state == state, column.is_not(None))
                ):
                    waits[state].append(max(0.0, (now - since).total_seconds()))
        oldest = GaugeMetricFamily(
            "lbgat_jobs_state_seconds_max",
            "Longest time a job now in the state has been in it (queue wait for queued/retrying)",
            labels=["state"],
        )
        mean = GaugeMetricFamily(
            "lbgat_jobs_state_seconds_mean",
            "Mean time the jobs now in the state have been in it",
            labels=["state"],
        )
        for state, values in waits.items():
            oldest.add_metric([state], max(values) if values else 0.0)
            mean.add_metric([state], sum(values) / len(values) if values else 0.0)
        jobs = GaugeMetricFamily("lbgat_jobs", "Jobs per state (queue depth)", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], float(by_state.get(state.value, 0)))
        user_jobs = GaugeMetricFamily(
            "lbgat_user_jobs", "Waiting and active jobs per user", labels=["user", "state"]
        )
        for name, state, count in sorted(by_user):
            user_jobs.add_metric([name, state], float(count))
        return [jobs, user_jobs, oldest, mean]


class _AccountingCollector(Collector):
    """GPU-hours per team in its current budget period (a calendar month for teams without a budget),
    the budgets' fractions, and the hours lost by cause (service.accounting), read at scrape time."""

    def __init__(self, sessions: sessionmaker[Session], settings: ServiceSettings) -> None:
        self.sessions = sessions
        self.settings = settings

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        from service import accounting

        now = utcnow()
        month, _ = accounting.period_bounds("month", now)
        with self.sessions() as session:
            states = accounting.budget_states(
                session, now, warning_fraction=self.settings.budget_warning_fraction
            )
            teams = dict(session.execute(select(Team.id, Team.name)).all())
            monthly, _ = accounting.usage_by(session, group_by="team", since=month, until=now, now=now)
            budgeted: dict[str, dict[int, accounting.Usage]] = {}
            for period in {s.period for s in states.values()}:
                start, _ = accounting.period_bounds(period, now)
                ids = [t for t, s in states.items() if s.period == period]
                budgeted[period], _ = accounting.usage_by(
                    session, group_by="team", since=start, until=now, team_ids=ids, now=now
                )
        used = GaugeMetricFamily(
            "lbgat_team_gpu_hours",
            "GPU-equivalent hours a team used in its current budget period (a calendar month without a "
            "budget), running attempts included",
            labels=["team", "period"],
        )
        lost = GaugeMetricFamily(
            "lbgat_team_lost_gpu_hours",
            "Of those, GPU-hours lost (work since the last checkpoint) by cause",
            labels=["team", "period", "cause"],
        )
        budget = GaugeMetricFamily(
            "lbgat_team_budget_gpu_hours", "A team's GPU-hour budget per period", labels=["team", "period"]
        )
        fraction = GaugeMetricFamily(
            "lbgat_team_budget_fraction", "Used / budget in the current period (1 = spent)", labels=["team"]
        )
        for team_id, name in sorted(teams.items(), key=lambda item: item[1]):
            state = states.get(team_id)
            period = state.period if state else "month"
            usage = (budgeted[period] if state else monthly).get(team_id)
            if usage is None and state is None:
                continue
            usage = usage or accounting.Usage()
            used.add_metric([name, period], usage.gpu_seconds / 3600)
            lost.add_metric([name, period, "preemption"], usage.lost_preemption_seconds / 3600)
            lost.add_metric([name, period, "failure"], usage.lost_failure_seconds / 3600)
            if state is not None:
                budget.add_metric([name, period], state.budget)
                fraction.add_metric([name], state.fraction)
        return [used, lost, budget, fraction]


class ServiceMetrics:
    """One app's registry: the queue gauges, the request histogram, the process's dispatch histogram."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.request_seconds = Histogram(
            "lbgat_request_seconds",
            "HTTP request latency by route template",
            labelnames=["method", "route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(DISPATCH_SECONDS)
        self.registry.register(ROUND_SECONDS)
        self._queue: _QueueCollector | None = None
        self._accounting: _AccountingCollector | None = None

    def bind_database(self, sessions: sessionmaker[Session], settings: ServiceSettings | None = None) -> None:
        """Count jobs (and, with `settings`, the teams' GPU-hours) from this database at scrape time
        (called by the app's lifespan)."""
        for collector in (self._queue, self._accounting):
            if collector is not None:
                self.registry.unregister(collector)
        self._queue = _QueueCollector(sessions)
        self.registry.register(self._queue)
        self._accounting = _AccountingCollector(sessions, settings) if settings is not None else None
        if self._accounting is not None:
            self.registry.register(self._accounting)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """ASGI middleware timing every HTTP request into `lbgat_request_seconds`.

    Pure ASGI (not BaseHTTPMiddleware) so that streamed answers (SSE, logs, downloads) pass through
    untouched; a stream is timed until its last byte. The route label is the matched route's
    template, read from the scope after routing; unmatched paths share the label "unmatched".
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.request_seconds.labels(scope["method"], route_template(scope), str(status)).observe(
                time.perf_counter() - start
            )


def route_template(scope: Scope) -> str:
    """The matched route's full template ('/v1/experiments/{experiment_id}'), or 'unmatched'.

    Routers included in the app may keep their routes' paths relative to the router (FastAPI >= 0.16x
    does not copy them with the prefix), so the prefix is recovered from the request's path: it is
    what precedes the part that the route's template, filled with the path parameters, matched.
    """
    route: Any = scope.get("route")
    path_format = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not path_format:
        return "unmatched"
    params = scope.get("path_params") or {}
    try:
        matched = path_format.format(**{k: str(v) for k, v in params.items()})
    except (KeyError, IndexError, ValueError):
        return path_format
    path = scope.get("path", "")
    if matched and path.endswith(matched):
        return path[: len(path) - len(matched)] + path_format
    return path_format
