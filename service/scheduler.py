"""The queue's scheduler: which waiting job runs next, and the loop that dispatches and reconciles.

`plan()` is the policy, a pure function (tested on its own):

1. Priority first (higher runs first).
2. Fair share among equal priorities: the team with the fewest GPU-hours in the window, then the
   user with the fewest. A job that is running is charged `fair_share_quantum_h` hours in advance
   (per GPU-equivalent), so with equal history free slots alternate between users instead of going
   to whoever submitted first.
3. FIFO (submission time) within equal standing.

A job is admitted when a Ray job slot is free (LBGAT_MAX_RUNNING_JOBS), its owner is under their
running-jobs and GPU limits, and the cluster's free GPUs/CPUs (Ray's live nodes minus what our
dispatched jobs hold) cover what it asks for. A job waiting for cluster capacity holds its place:
later jobs are not dispatched past it (no backfill), so large jobs are not starved by small ones.
Jobs blocked by their owner's own limits, or asking for more than the whole cluster has, do not
hold up anyone else. Every waiting job gets a position and a reason.

`Scheduler` runs rounds in a thread: reconcile dispatched jobs with Ray (state, cancellation, retries,
lost submissions), ingest metrics and results from the artifact store, then plan and dispatch. With
PostgreSQL several replicas may run it: a round takes a transaction-scoped advisory lock and claims
rows with FOR UPDATE SKIP LOCKED, and every state change is a conditional UPDATE, so no job is
dispatched twice. Ray submissions use a fixed id per attempt (`<experiment>-a<attempt>`), so a
submission repeated after a crash is recognised, not duplicated.

Artifact store outages hold the queue instead of spinning it (see service.store_health): while the
store does not answer, nothing is claimed (waiting jobs show "artifact store unreachable" and gain no
state events), running jobs keep running, finished Ray jobs wait to be finalised until their metrics
and results can be read, and the round's own store requests are one short attempt each, skipped
while the breaker is open, so a round never waits out the store client's retries. A store that stays
unreachable for longer than `store_outage_fail_s` fails the running jobs with a one-line reason.

Failed attempts: `error` is one clean line (the worker's `error: ...` line, else Ray's reason and the
last log line) and `error_log_tail` the end of the job's log. A Ray job that exits with the worker's
bad-input code (2: an invalid spec or arguments, no stored spec) fails at once: the same input
would fail the same way on every retry.
"""

from __future__ import annotations

import heapq
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from operator import attrgetter

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from api_schemas.jobs import JobState
from service import accounting, ingest
from service.db.engine import run_tx
from service.db.models import Event, Experiment, StartEstimate, User, utcnow
from service.estimates import RATE_ROWS, Ahead, Busy, estimate_starts, expected_duration_s, expected_end
from service.jobs import ACTIVE_STATES, WAITING_STATES, transition, usage_gpu_hours
from service.metrics import observe_round
from service.preemption import (
    PREEMPTED_FILE,
    PreemptionPolicy,
    choose_victims,
    requeue_reason,
    saved_at,
    waiting_reason,
)
from service.ray_jobs import Capacity, RayJobs, RayJobState, RayUnavailable, job_metadata
from service.settings import ServiceSettings
from service.store_health import StoreMonitor
from service.text import clean_lines, one_line, strip_ansi, tail
from workers.metrics_export import EXPERIMENT_USER_ENV
from workers.run import EXIT_BAD_INPUT, EXIT_PREEMPTED
from workers.settings import StoreSettings, env_name
from workers.storage import ArtifactStore, KeyNotFound, StoreError, StoreUnavailable, experiment_prefix

log = logging.getLogger("service.scheduler")

_ROUND_LOCK = 7_420_002  # pg advisory lock key of "lbgat scheduling round"


# -- policy ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    id: str
    owner_id: int
    team_id: int
    priority: int
    created_at: datetime
    gpus: float
    cpus: float
    gpu_optional: bool = False
    charge_rate: float = 1.0
    held: str | None = None  # why it may not start (service.accounting: its team's budget is spent)


@dataclass(frozen=True)
class Holder:
    """A dispatched or running job: what it holds."""

    owner_id: int
    team_id: int
    gpus: float
    cpus: float
    charge_rate: float
    # for preemption (service.preemption): who it is, and how much a stop now would lose
    id: str = ""
    priority: int = 0
    started_at: datetime | None = None
    last_checkpoint_at: datetime | None = None
    preempting_for: str | None = None  # being preempted for that job (its Ray job is stopping)


@dataclass(frozen=True)
class UserLimits:
    name: str
    max_running_jobs: int
    max_gpus: float


@dataclass
class Plan:
    dispatch: list[Candidate] = field(default_factory=list)
    waiting: dict[str, tuple[int, str]] = field(default_factory=dict)  # in position order
    # filled by the Scheduler (service.estimates): waiting jobs' expected starts, running jobs' ends
    estimates: dict[str, datetime | None] = field(default_factory=dict)
    ends: dict[str, datetime] = field(default_factory=dict)
    # new preemption decisions: waiting job -> the running jobs to stop for it
    preempt: dict[str, list[str]] = field(default_factory=dict)
    # dispatched on what its victims free (new decisions and ones in flight): job -> those victims
    handover: dict[str, list[str]] = field(default_factory=dict)


def handed_over_victims(active: Iterable[Holder]) -> set[str]:
    """Running jobs being preempted whose preemptor is itself dispatched or running: what they hold
    is the preemptor's (and, beyond that, free), not theirs (see `plan`)."""
    active = list(active)
    active_ids = {h.id for h in active if h.id}
    return {h.id for h in active if h.preempting_for is not None and h.preempting_for in active_ids}


def effective_gpus(job: Candidate, capacity: Capacity | None) -> float:
    """GPUs the job will take: none where it may run on CPUs and the cluster has no GPU."""
    if job.gpu_optional and capacity is not None and capacity.gpus == 0:
        return 0.0
    return job.gpus


def plan(
    candidates: Iterable[Candidate],
    active: Iterable[Holder],
    *,
    capacity: Capacity | None,
    max_running: int,
    limits: dict[int, UserLimits],
    user_usage: dict[int, float],
    team_usage: dict[int, float],
    quantum_h: float,
    capacity_error: str | None = None,
    store_error: str | None = None,
    preemption: PreemptionPolicy | None = None,
) -> Plan:
    """Who is dispatched now, and every waiting job's position and reason (see the module docstring).
    `store_error` (the artifact store does not answer) holds every job, as Ray being unreachable does.

    With `preemption`, the first job in line that waits for a slot or capacity may stop lower-priority
    running jobs (service.preemption): `Plan.preempt` holds the new decisions. Such a job (and one whose
    victims are still stopping) is dispatched at once on what its victims free (`Plan.handover`): its
    Ray job starts while they checkpoint, and Ray holds its workers until the victims release the
    resources. A victim whose preemptor is dispatched (active) holds nothing here: its slot, GPUs and
    CPUs were handed over at the decision, to the preemptor and, for what it does not take, to the
    jobs planned after it, so nothing is given twice. A victim whose preemptor is not active (its
    submission failed, it was cancelled) still holds what it has until it ends."""
    active = list(active)
    handed_over = handed_over_victims(active)
    queues: dict[int, list[Candidate]] = {}
    # (-priority, created_at, id) order, as two stable sorts on C-level keys (a tuple-building lambda
    # per job was a tenth of a plan over 100,000 jobs)
    ordered = sorted(candidates, key=attrgetter("created_at", "id"))
    ordered.sort(key=attrgetter("priority"), reverse=True)  # stable: ties keep (created_at, id)
    for job in ordered:
        queues.setdefault(job.owner_id, []).append(job)
    for q in queues.values():
        q.reverse()  # pop() from the end takes the user's best job

    eff_user = dict(user_usage)
    eff_team = dict(team_usage)
    running: dict[int, int] = {}
    held_gpus: dict[int, float] = {}
    used_gpus = used_cpus = 0.0
    for h in active:
        eff_user[h.owner_id] = eff_user.get(h.owner_id, 0.0) + quantum_h * h.charge_rate
        eff_team[h.team_id] = eff_team.get(h.team_id, 0.0) + quantum_h * h.charge_rate
        running[h.owner_id] = running.get(h.owner_id, 0) + 1
        held_gpus[h.owner_id] = held_gpus.get(h.owner_id, 0.0) + h.gpus
        if h.id not in handed_over:
            used_gpus += h.gpus
            used_cpus += h.cpus
    slots = max_running - (len(active) - len(handed_over))
    free_gpus = (capacity.gpus - used_gpus) if capacity else 0.0
    free_cpus = (capacity.cpus - used_cpus) if capacity else 0.0

    # Two-level heap: in each team, its users' best jobs by (priority, user usage, FIFO); across teams,
    # each team's best by (priority, team usage, user usage, FIFO), which is the order of the key
    # (priority, team usage, user usage, FIFO) over all users. Charging a job's quantum re-keys only
    # its user's entry and its team's, so a job costs O(log n) whatever the queue holds (a flat heap
    # over users went stale for every other user of the team at each charge: ~10 pops per job with
    # 10 users a team). `current` holds each team's live entry in `heap`; others are stale.
    team_heaps: dict[int, list[tuple]] = {}
    current: dict[int, tuple] = {}
    heap: list[tuple] = []

    def user_entry(owner: int) -> tuple:
        job = queues[owner][-1]
        return (-job.priority, eff_user.get(owner, 0.0), job.created_at, job.id, owner)

    def refresh(team: int) -> None:
        if not team_heaps.get(team):
            current.pop(team, None)
            return
        neg_priority, user_usage_, created_at, job_id, _ = team_heaps[team][0]
        entry = (neg_priority, eff_team.get(team, 0.0), user_usage_, created_at, job_id, team)
        if current.get(team) != entry:
            current[team] = entry
            heapq.heappush(heap, entry)

    def requeue(owner: int, team: int) -> None:
        """The user's next job into its team's heap, and the team re-keyed (usage or best changed)."""
        if queues[owner]:
            nxt_team = queues[owner][-1].team_id
            heapq.heappush(team_heaps.setdefault(nxt_team, []), user_entry(owner))
            refresh(nxt_team)
        refresh(team)

    for owner, q in queues.items():
        team_heaps.setdefault(q[-1].team_id, []).append(user_entry(owner))
    for team, users_heap in team_heaps.items():
        heapq.heapify(users_heap)
        refresh(team)
    result = Plan()
    position = 0
    blocked_by: str | None = None
    taken: set[str] = set()  # victims chosen in this plan (those already stopping are not eligible)
    while heap:
        entry = heapq.heappop(heap)
        team = entry[-1]
        if current.get(team) != entry:
            continue  # stale: the team was re-keyed since
        del current[team]
        owner = heapq.heappop(team_heaps[team])[-1]
        job = queues[owner].pop()

        lim = limits.get(owner) or UserLimits(str(owner), max_running, float("inf"))
        gpus = effective_gpus(job, capacity)
        first_in_line = blocked_by is None
        reason: str | None = None
        waits_in_line = False  # blocked only by what frees up as jobs finish (slots, capacity)
        if job.held is not None:  # accounting: held, and holds up no one
            reason = job.held
        elif store_error is not None:
            reason = f"artifact store unreachable ({store_error}); dispatching resumes when it answers"
        elif capacity is None:
            reason = f"Ray is not reachable ({capacity_error or 'no cluster configured'}); waiting for it"
        elif gpus > capacity.gpus:
            reason = f"asks for {gpus:g} GPUs; the cluster has {capacity.gpus:g} (waits for nodes to join)"
        elif job.cpus > capacity.cpus:
            reason = (
                f"asks for {job.cpus:g} CPUs; the cluster has {capacity.cpus:g} (waits for nodes to join)"
            )
        elif running.get(owner, 0) >= lim.max_running_jobs:
            reason = f"{lim.name} has {running.get(owner, 0)} running jobs (limit {lim.max_running_jobs})"
        elif gpus > 0 and held_gpus.get(owner, 0.0) + gpus > lim.max_gpus:
            reason = f"{lim.name} holds {held_gpus.get(owner, 0.0):g} GPUs; +{gpus:g} exceeds the limit {lim.max_gpus:g}"
        elif slots <= 0:
            reason = f"all {max_running} Ray job slots are busy (LBGAT_MAX_RUNNING_JOBS={max_running})"
            waits_in_line = True
        elif blocked_by is not None:
            reason = f"behind {blocked_by}, which waits for cluster capacity"
            waits_in_line = True
        elif gpus > free_gpus + 1e-9 or job.cpus > free_cpus + 1e-9:
            waits_in_line = True
            reason = (
                f"waits for {gpus:g} GPUs and {job.cpus:g} CPUs; {max(free_gpus, 0):g} GPUs and "
                f"{max(free_cpus, 0):g} CPUs are free"
            )
            blocked_by = job.id
        if (
            waits_in_line
            and first_in_line
            and preemption is not None
            and job.priority >= preemption.min_priority
        ):
            in_flight = [h for h in active if h.preempting_for == job.id]
            victims = in_flight or choose_victims(
                priority=job.priority,
                need_slots=1 - slots,
                need_gpus=gpus - free_gpus,
                need_cpus=job.cpus - free_cpus,
                running=active,
                policy=preemption,
                taken=taken,
            )
            if victims:
                if not in_flight:
                    result.preempt[job.id] = [v.id for v in victims]
                    taken.update(v.id for v in victims)
                slots += len(victims)
                free_gpus += sum(v.gpus for v in victims)
                free_cpus += sum(v.cpus for v in victims)
                if slots >= 1 and gpus <= free_gpus + 1e-9 and job.cpus <= free_cpus + 1e-9:
                    # dispatched now (below), on what its victims free: its Ray job starts while they
                    # checkpoint; later jobs are planned as if it ran
                    result.handover[job.id] = [v.id for v in victims]
                    reason, waits_in_line, blocked_by = None, False, None
                else:  # victims in flight that no longer cover it (a node left meanwhile)
                    reason = waiting_reason([v.id for v in victims])
        if reason is not None:
            position += 1
            result.waiting[job.id] = (position, reason)
            if not waits_in_line:
                requeue(owner, team)
                continue
        else:
            result.dispatch.append(job)
            slots -= 1
            free_gpus -= gpus
            free_cpus -= job.cpus
            running[owner] = running.get(owner, 0) + 1
            held_gpus[owner] = held_gpus.get(owner, 0.0) + gpus
        # Charge the job's quantum to its user and team: a dispatched job for real, a job that only
        # waits for a slot or capacity as if it were running, so that the positions shown are the
        # order in which the slots will go (alternating between users of equal standing).
        charge = gpus if gpus > 0 else job.charge_rate
        eff_user[owner] = eff_user.get(owner, 0.0) + quantum_h * charge
        eff_team[job.team_id] = eff_team.get(job.team_id, 0.0) + quantum_h * charge
        requeue(owner, team)
    return result


# -- the loop ----------------------------------------------------------------------------------------


RAY_ACTIVE = {"PENDING", "RUNNING"}


# A failed attempt's `error` and `error_log_tail` (see the module docstring).
MAX_ERROR_CHARS = 500
LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 8000
_EXIT_CODE = re.compile(r"exit code (-?\d+)")


@dataclass(frozen=True)
class Failure:
    """Why a Ray job failed: `error` in one clean line, the log's end, the entrypoint's exit code."""

    error: str
    log_tail: str | None
    exit_code: int | None

    @property
    def bad_input(self) -> bool:
        """The worker refused its input (workers.run's exit code 2): a retry would fail the same way."""
        return self.exit_code == EXIT_BAD_INPUT


def describe_failure(submission_id: str, message: str | None, logs: str, exit_code: int | None) -> Failure:
    """Ray's reason and the job's log -> a Failure.

    The error is the last `error: ...` line the worker printed (workers.run ends every failure with
    one), else Ray's own reason with the log's last line. Ray's `message` carries the log's last
    20,000 characters with their colour codes; those go to the tail only, cleaned and bounded.
    """
    message = message or ""
    lines = clean_lines(logs)
    headline, *from_message = clean_lines(message) or ["the Ray job failed"]
    if not lines:  # no log from the Job API: Ray's message quotes its end
        lines = from_message
    if exit_code is None:
        found = _EXIT_CODE.search(strip_ansi(message))
        exit_code = int(found.group(1)) if found else None
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        error = errors[-1]
    else:
        reason = headline.split(", last available logs")[0].rstrip(":")
        error = f"Ray job {submission_id}: {reason}" + (
            f"; last log line: {lines[-1].strip()}" if lines else ""
        )
    log_tail = tail(lines, max_lines=LOG_TAIL_LINES, max_chars=LOG_TAIL_CHARS) or None
    return Failure(one_line(error, MAX_ERROR_CHARS), log_tail, exit_code)


_SUBMISSION_SEQ = re.compile(r"-a(\d+)$")


#: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S of every job (see Scheduler._job_env)
HEALTH_CHECK_INTERVAL_S = "0.5"


def ray_submission_id(exp: Experiment) -> str:
    """The Ray submission id of the job's next run: `<id>-a<N>`, N counting every run of the job.

    Ray keeps a submission id for ever, so a job run again after a manual retry (which restarts the
    attempt budget) must not reuse an earlier run's id: Ray would answer with that old run's state.
    A claim whose submission failed (`dispatched_at` cleared) reuses its id, which keeps dispatch
    idempotent when the failed call did reach Ray.
    """
    previous = _SUBMISSION_SEQ.search(exp.ray_job_id or "")
    if previous is None:
        return f"{exp.id}-a{exp.attempts + 1}"
    if exp.dispatched_at is None:
        return exp.ray_job_id
    return f"{exp.id}-a{int(previous.group(1)) + 1}"


class Scheduler:
    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        settings: ServiceSettings,
        store: ArtifactStore,
        ray: RayJobs | None,
        store_settings: StoreSettings | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.store = store
        self.ray = ray
        self.store_settings = store_settings or StoreSettings()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._view: dict[str, tuple[int, str, datetime | None]] = {}
        self._ends: dict[str, datetime] = {}
        self._view_at = 0.0
        self._view_lock = threading.Lock()
        self._capacity: Capacity | None = None
        self._capacity_at = 0.0
        self._capacity_error: str | None = None
        self._metrics_at: dict[str, float] = {}
        self._restopped: dict[str, float] = {}  # victim -> when it was last asked to stop again
        self.rounds = 0
        # The store's circuit breaker; its view of the store (one short attempt per request) is what
        # the rounds use, so that no round waits out the store client's retries.
        self.store_monitor = StoreMonitor(
            store, interval_s=settings.store_probe_interval_s, timeout_s=settings.store_probe_timeout_s
        )
        self._store = self.store_monitor.store
        # (monotonic time the round ended, its duration in seconds) of the latest rounds
        self.round_times: deque[tuple[float, float]] = deque(maxlen=1024)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.store_monitor.start()
        self._thread = threading.Thread(target=self._loop, name="lbgat-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.store_monitor.stop()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        log.info("scheduler started (max %d Ray jobs, ray=%s)", self.settings.max_running_jobs, self.ray)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.run_round()
            except Exception:  # a bad round must not kill the queue; the next one retries
                log.exception("scheduler round failed")
            pause = self._pause()
            self._wake.wait(max(0.0, pause - (time.monotonic() - started)))
            self._wake.clear()

    def _pause(self) -> float:
        """Seconds until the next round: short while a submission is on its way to RUNNING (dispatch
        latency), and while a preempted job is stopping (it goes back to the queue soon after its Ray
        job ends); else the poll interval."""
        poll = self.settings.poll_interval_s
        with self.sessions() as session:
            dispatching = session.scalar(
                select(Experiment.id).where(Experiment.state == JobState.dispatching.value).limit(1)
            )
            if dispatching is not None:
                return min(0.05, poll)
            stopping = session.scalar(
                select(Experiment.id)
                .where(
                    Experiment.state.in_(ACTIVE_STATES),
                    Experiment.preempt_requested_at.is_not(None),
                )
                .limit(1)
            )
        return min(0.25, poll) if stopping is not None else poll

    # -- one round -----------------------------------------------------------------------------------

    def run_round(self) -> None:
        """Dispatch first (a woken round is usually a new submission waiting for a free slot), then
        reconcile with Ray, and dispatch again if reconciling freed slots. Timed (`round_times`,
        `lbgat_scheduler_round_seconds`)."""
        started = time.monotonic()
        self.rounds += 1
        try:
            self.store_monitor.poll()  # inline only where no probe thread runs (start() was not called)
            self.schedule()
            if self.reconcile():
                self.schedule()
        finally:
            ended = time.monotonic()
            self.round_times.append((ended, ended - started))
            observe_round(ended - started)

    def capacity(self, max_age_s: float = 5.0) -> Capacity | None:
        if self.ray is None:
            self._capacity_error = "no Ray address configured (LBGAT_RAY_ADDRESS)"
            return None
        if time.monotonic() - self._capacity_at > max_age_s or self._capacity is None:
            try:
                self._capacity = self.ray.capacity()
                self._capacity_error = None
            except RayUnavailable as exc:
                self._capacity, self._capacity_error = None, str(exc)
            self._capacity_at = time.monotonic()
        return self._capacity

    def _inputs(
        self, session: Session, *, lock: bool
    ) -> tuple[list[Candidate], list[Holder], dict[int, UserLimits]]:
        query = select(
            Experiment.id,
            Experiment.owner_id,
            Experiment.team_id,
            Experiment.priority,
            Experiment.created_at,
            Experiment.gpus,
            Experiment.cpus,
            Experiment.gpu_optional,
            Experiment.charge_rate,
        ).where(Experiment.state.in_(WAITING_STATES))
        if lock and session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        candidates = [Candidate(*row) for row in session.execute(query)]
        active = [
            Holder(*row[:-2], preempting_for=row[-2] if row[-1] is not None else None)
            for row in session.execute(
                select(
                    Experiment.owner_id,
                    Experiment.team_id,
                    Experiment.gpus,
                    Experiment.cpus,
                    Experiment.charge_rate,
                    Experiment.id,
                    Experiment.priority,
                    Experiment.started_at,
                    Experiment.last_checkpoint_at,
                    Experiment.preempted_by,
                    Experiment.preempt_requested_at,
                ).where(Experiment.state.in_(ACTIVE_STATES))
            )
        ]
        owners = {c.owner_id for c in candidates}
        limits = {}
        if owners:
            for user in session.scalars(select(User).where(User.id.in_(owners))):
                limits[user.id] = UserLimits(
                    user.name,
                    self.settings.user_max_running_jobs
                    if user.max_running_jobs is None
                    else user.max_running_jobs,
                    self.settings.user_max_gpus if user.max_gpus is None else user.max_gpus,
                )
        # accounting: a spent team budget lowers its jobs' priority or holds them (service.accounting)
        candidates, active = accounting.apply_budgets(
            session, candidates, active, settings=self.settings, notify=lock
        )
        return candidates, active, limits

    def _plan(self, session: Session, *, lock: bool) -> Plan:
        candidates, active, limits = self._inputs(session, lock=lock)
        if not candidates:
            result = Plan()
            self._estimate(session, result, candidates, active)
            return result
        user_usage, team_usage = usage_gpu_hours(session, settings=self.settings)
        capacity = self.capacity()
        result = plan(
            candidates,
            active,
            capacity=capacity,
            max_running=self.settings.max_running_jobs,
            limits=limits,
            user_usage=user_usage,
            team_usage=team_usage,
            quantum_h=self.settings.fair_share_quantum_h,
            capacity_error=self._capacity_error,
            store_error=None if self.store_monitor.available else self.store_monitor.error,
            preemption=self._preemption_policy(),
        )
        self._estimate(session, result, candidates, active)
        return result

    def _estimate(
        self, session: Session, result: Plan, candidates: list[Candidate], active: list[Holder]
    ) -> None:
        """Fill `result.estimates` (waiting jobs' expected starts) and `result.ends` (running jobs'
        expected ends); see service.estimates."""
        now = utcnow()
        default_s = self.settings.estimate_default_duration_s
        grace_s = self.settings.preemption_grace_s
        stopping = {v for victims in result.preempt.values() for v in victims}
        # victims whose resources went to their preemptor (dispatched now or before): not busy twice
        handed_over = {v for victims in result.handover.values() for v in victims} | handed_over_victims(
            active
        )
        busy: list[Busy] = []
        info = {}
        if active:
            info = {
                row.id: row
                for row in session.execute(
                    select(
                        Experiment.id,
                        Experiment.kind,
                        Experiment.spec,
                        Experiment.preempt_requested_at,
                    ).where(Experiment.id.in_([h.id for h in active]))
                )
            }
        for h in active:
            row = info.get(h.id)
            if row is None:
                continue
            if row.preempt_requested_at is not None or h.id in stopping:
                end = max(now, (row.preempt_requested_at or now) + timedelta(seconds=grace_s))
            else:
                events = self._progress_rows(session, h.id, evaluation=row.kind == "evaluation")
                end = expected_end(
                    kind=row.kind,
                    spec=row.spec,
                    rows=[e.data for e in events],
                    last_row_at=events[-1].at if events else None,
                    started_at=h.started_at,
                    now=now,
                    default_s=default_s,
                )
            result.ends[h.id] = end
            if h.id not in handed_over:
                busy.append(Busy(h.id, h.gpus, h.cpus, end))
        capacity = self._capacity
        if capacity is None or not result.waiting:
            return
        for job in result.dispatch:
            busy.append(
                Busy(job.id, effective_gpus(job, capacity), job.cpus, now + timedelta(seconds=default_s))
            )
        # plan() fills `waiting` in position order: the first estimate_max_jobs, without sorting them all
        order = list(islice(result.waiting, self.settings.estimate_max_jobs))
        wanted = set(order)
        by_id = {c.id: c for c in candidates if c.id in wanted}
        details = {}
        for chunk in range(0, len(order), 500):
            ids = order[chunk : chunk + 500]
            rows = session.execute(
                select(Experiment.id, Experiment.kind, Experiment.latest_metrics).where(
                    Experiment.id.in_(ids)
                )
            ).all()
            # the spec (JSON, kilobytes) only where expected_duration_s reads it: a training run that
            # ran before (its latest metrics row)
            specs = [r.id for r in rows if r.kind != "evaluation" and r.latest_metrics]
            spec_of = (
                dict(
                    session.execute(
                        select(Experiment.id, Experiment.spec).where(Experiment.id.in_(specs))
                    ).all()
                )
                if specs
                else {}
            )
            for row in rows:
                details[row.id] = (row.kind, spec_of.get(row.id), row.latest_metrics)
        ahead = []
        for exp_id in order:
            job, row = by_id.get(exp_id), details.get(exp_id)
            if job is None or row is None or job.held is not None:
                continue  # a job held for its team's budget has no start to estimate, and delays no one
            kind, spec, latest = row
            duration = expected_duration_s(kind=kind, spec=spec, latest=latest, default_s=default_s)
            ahead.append(Ahead(exp_id, effective_gpus(job, capacity), job.cpus, duration))
        result.estimates = estimate_starts(
            ahead,
            busy,
            gpus=capacity.gpus,
            cpus=capacity.cpus,
            max_running=self.settings.max_running_jobs,
            now=now,
        )

    @staticmethod
    def _progress_rows(session: Session, exp_id: str, *, evaluation: bool) -> list[Event]:
        """A running job's latest metric rows (main trial), oldest first: every progress row of an
        evaluation (one per shard), the last few epochs of a training run."""
        query = (
            select(Event)
            .where(Event.experiment_id == exp_id, Event.kind == "metric", Event.trial == "main")
            .order_by(Event.id.desc())
        )
        if not evaluation:
            query = query.limit(RATE_ROWS)
        return list(reversed(session.scalars(query).all()))

    def _preemption_policy(self) -> PreemptionPolicy | None:
        if not self.settings.preemption_enabled:
            return None
        return PreemptionPolicy(
            min_priority=self.settings.preempt_min_priority,
            min_run_s=self.settings.preempt_min_run_s,
            now=utcnow(),
        )

    def queue_view(
        self, ids: Iterable[str] = (), max_age_s: float = 2.0
    ) -> dict[str, tuple[int, str, datetime | None]]:
        """Position, reason and estimated start of every waiting job: the last round's, or a fresh plan
        when that is old (a replica whose scheduler is off, or a round that has not run for a while) or
        does not know one of the waiting jobs `ids` (submitted since). The dict lists the jobs in queue
        order (position 1 first; GET /v1/queue pages through it in that order)."""
        with self._view_lock:
            if time.monotonic() - self._view_at <= max_age_s and all(i in self._view for i in ids):
                return self._view
        with self.sessions() as session:
            self._keep_view(self._plan(session, lock=False))
        with self._view_lock:
            return self._view

    def expected_ends(self, max_age_s: float = 2.0) -> dict[str, datetime]:
        """Running (and dispatched) jobs' expected ends, as of the latest plan (a fresh one when that is
        older than `max_age_s`, as queue_view)."""
        self.queue_view((), max_age_s)
        with self._view_lock:
            return dict(self._ends)

    def _keep_view(self, result: Plan) -> None:
        view = {
            exp_id: (position, reason, result.estimates.get(exp_id))
            for exp_id, (position, reason) in result.waiting.items()
        }
        with self._view_lock:
            self._view, self._ends, self._view_at = view, dict(result.ends), time.monotonic()

    def schedule(self) -> list[str]:
        """Plan, claim the jobs to start (queued -> dispatching) in one transaction, then submit them."""

        def claim(session: Session) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
            if session.get_bind().dialect.name == "postgresql":
                got = session.execute(
                    text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _ROUND_LOCK}
                ).scalar()
                if not got:
                    return [], []  # another replica is scheduling right now
            result = self._plan(session, lock=True)
            self._keep_view(result)
            self._record_estimates(session, result)
            victims, undecided = self._preempt(session, result)
            claimed = []
            capacity = self._capacity
            for job in result.dispatch:
                if job.id in undecided:
                    continue  # its victims could not all be marked: not dispatched on their resources
                exp = session.get(Experiment, job.id)
                if exp is None or exp.state not in WAITING_STATES:
                    continue
                attempt = exp.attempts + 1
                gpus = effective_gpus(job, capacity)
                reason = f"attempt {attempt} of {exp.max_attempts}: submitting to Ray"
                if job.id in result.handover:
                    reason += (
                        f" on what {', '.join(result.handover[job.id])} frees (preempted; Ray starts its "
                        "workers once the resources are released)"
                    )
                ok = transition(
                    session,
                    exp,
                    JobState.dispatching,
                    reason=reason,
                    attempts=attempt,
                    ray_job_id=ray_submission_id(exp),
                    dispatched_at=utcnow(),
                    started_at=None,
                    preempt_requested_at=None,
                    gpus=gpus,
                    charge_rate=gpus if gpus > 0 else exp.cpus * self.settings.cpu_gpu_equivalent,
                )
                if ok:
                    claimed.append((exp.id, attempt))
            return claimed, victims

        claimed, victims = run_tx(self.sessions, claim)
        # victims first: their checkpoints start while the preemptors' Ray jobs are being submitted
        for exp_id, submission_id in victims:
            self._stop_victim(exp_id, submission_id)
        for exp_id, _attempt in claimed:
            self.submit(exp_id)
        return [c[0] for c in claimed]

    # -- preemption and estimates --------------------------------------------------------------------

    def _preempt(self, session: Session, result: Plan) -> tuple[list[tuple[str, str]], set[str]]:
        """Mark the plan's new victims (one decision per victim: the UPDATE is conditional on none
        being in flight) with a `state` event to the same state. Returns (id, Ray submission id) of
        those whose Ray job is to be stopped once the transaction commits, and the preemptors not all
        of whose victims could be marked (those are not dispatched this round)."""
        marked = []
        undecided: set[str] = set()
        now = utcnow()
        for preemptor, victims in result.preempt.items():
            for victim in victims:
                exp = session.get(Experiment, victim)
                if exp is None or exp.state not in ACTIVE_STATES or exp.ray_job_id is None:
                    undecided.add(preemptor)
                    continue
                done = session.execute(
                    update(Experiment)
                    .where(
                        Experiment.id == victim,
                        Experiment.state == exp.state,
                        Experiment.preempt_requested_at.is_(None),
                    )
                    .values(preempt_requested_at=now, preempted_by=preemptor, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
                if done.rowcount != 1:
                    undecided.add(preemptor)
                    continue
                session.add(
                    Event(
                        experiment_id=victim,
                        kind="state",
                        data={
                            "from": exp.state,
                            "to": exp.state,
                            "reason": f"preempting for {preemptor}: saving a checkpoint and stopping "
                            f"(grace {self.settings.preemption_grace_s:g} s)",
                        },
                        at=now,
                    )
                )
                log.info("preempting %s for %s", victim, preemptor)
                marked.append((victim, exp.ray_job_id))
        return marked, undecided

    def _stop_victim(self, exp_id: str, submission_id: str) -> None:
        """Stop a victim's Ray job: its entrypoint gets SIGTERM, saves a checkpoint and exits (Ray kills
        it after RAY_JOB_STOP_WAIT_TIME_S). Reconciling puts it back in the queue once Ray says it ended."""
        if self.ray is None:
            return
        try:
            self.ray.stop(submission_id)
        except RayUnavailable as exc:  # the next rounds stop it again (see _reconcile_one)
            log.warning("%s: could not stop Ray job %s for preemption: %s", exp_id, submission_id, exc)

    def _record_estimates(self, session: Session, result: Plan) -> None:
        """Store each waiting job's estimated start (Experiment.estimated_start_at) whenever it moves by
        more than `estimate_record_threshold_s`, and a StartEstimate row when it is first made or
        moves from the job's last row by more than that threshold times 2^(k-1), k the job's rows so
        far: behind a job that overruns its estimate, estimates slide with the clock, and a fixed
        threshold would add a row per waiting job every threshold; doubling keeps a job's rows
        logarithmic in its wait."""
        estimates = {i: e for i, e in result.estimates.items() if e is not None}
        if not estimates:
            return
        threshold = self.settings.estimate_record_threshold_s
        now = utcnow()
        ids = list(estimates)
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            stored = dict(
                session.execute(
                    select(Experiment.id, Experiment.estimated_start_at).where(Experiment.id.in_(part))
                ).all()
            )
            # per job: how many rows it has and the estimate its newest row holds
            last = {
                exp_id: (count, row_id)
                for exp_id, count, row_id in session.execute(
                    select(StartEstimate.experiment_id, func.count(), func.max(StartEstimate.id))
                    .where(StartEstimate.experiment_id.in_(part))
                    .group_by(StartEstimate.experiment_id)
                ).all()
            }
            if last:
                newest = dict(
                    session.execute(
                        select(StartEstimate.id, StartEstimate.estimated_start).where(
                            StartEstimate.id.in_([row_id for _, row_id in last.values()])
                        )
                    ).all()
                )
                last = {k: (count, newest.get(row_id)) for k, (count, row_id) in last.items()}
            for exp_id in part:
                if exp_id not in stored:
                    continue
                new, old = estimates[exp_id], stored[exp_id]
                if old is None or abs((new - old).total_seconds()) > threshold:
                    session.execute(
                        update(Experiment)
                        .where(Experiment.id == exp_id)
                        .values(estimated_start_at=new)
                        .execution_options(synchronize_session=False)
                    )
                rows, recorded = last.get(exp_id, (0, None))
                if recorded is not None and abs((new - recorded).total_seconds()) <= threshold * 2 ** min(
                    max(rows - 1, 0), 30
                ):
                    continue
                session.add(
                    StartEstimate(
                        experiment_id=exp_id,
                        made_at=now,
                        estimated_start=new,
                        position=result.waiting[exp_id][0],
                    )
                )

    def _job_env(self, exp_id: str) -> dict[str, str]:
        env = self.store_settings.as_env()
        if not self.settings.pass_store_credentials:
            for secret in ("s3_access_key", "s3_secret_key"):
                env.pop(env_name(secret), None)
        env["LBGAT_EXPERIMENT_ID"] = exp_id
        env[env_name("gpu_resource")] = self.settings.gpu_resource  # what the workers ask for as GPUs
        # how long Ray waits after SIGTERM before it kills the job: the preemption grace period, in
        # which the worker saves its just-in-time checkpoint
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, round(self.settings.preemption_grace_s)))
        # how often Ray Train's controller polls its workers (Ray's default: 2 s); a preempted run's
        # workers return right after the checkpoint, and the GPU is free once the controller sees it
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = HEALTH_CHECK_INTERVAL_S
        return env

    def submit(self, exp_id: str) -> None:
        """Write the spec where the worker reads it, then submit the attempt's Ray job. A store that
        does not answer gives the job back to the queue (once: the breaker then holds dispatching)."""
        with self.sessions() as session:
            exp = session.get(Experiment, exp_id)
            if exp is None or exp.state != JobState.dispatching.value:
                return
            spec, submission_id, owner, name = exp.spec, exp.ray_job_id, exp.owner.name, exp.name
        entrypoint = self.settings.worker_entrypoint.format(python=self.settings.worker_python, job_id=exp_id)
        try:
            if self.ray is None:
                raise RayUnavailable("no Ray address configured (LBGAT_RAY_ADDRESS)")
            if not self.store_monitor.available:
                raise StoreError(f"artifact store unreachable ({self.store_monitor.error})")
            try:
                self._store.put_json(experiment_prefix(exp_id) + "spec.json", spec)
            except StoreUnavailable as exc:
                self.store_monitor.record_failure(exc)
                raise
            self.ray.submit(
                submission_id=submission_id,
                entrypoint=entrypoint,
                env_vars={**self._job_env(exp_id), EXPERIMENT_USER_ENV: owner},
                metadata=job_metadata(experiment_id=exp_id, name=name, user=owner),
            )
            log.info("submitted %s as Ray job %s", exp_id, submission_id)
        except Exception as exc:  # whatever went wrong, the job must not stay claimed by nobody
            log.warning("could not submit %s: %s", exp_id, exc)
            why = str(exc)

            def back(session: Session) -> None:
                exp = session.get(Experiment, exp_id)
                if exp is not None and exp.state == JobState.dispatching.value:
                    transition(
                        session,
                        exp,
                        JobState.queued if exp.attempts <= 1 else JobState.retrying,
                        reason=f"submission failed, will try again: {why}",
                        attempts=exp.attempts - 1,
                        # the id stays: the next claim submits it again (Ray may have it already)
                        dispatched_at=None,
                    )

            run_tx(self.sessions, back)

    # -- reconciliation ------------------------------------------------------------------------------

    def reconcile(self) -> int:
        """Bring every dispatched job's state in line with Ray's; returns how many left the active states."""
        with self.sessions() as session:
            rows = (
                session.execute(select(Experiment.id).where(Experiment.state.in_(ACTIVE_STATES)))
                .scalars()
                .all()
            )
        for exp_id in rows:
            try:
                self._reconcile_one(exp_id)
            except RayUnavailable as exc:
                log.warning("cannot reach Ray to reconcile: %s", exc)
                break
            except Exception:
                log.exception("reconciling %s failed", exp_id)
        if not rows:
            return 0
        with self.sessions() as session:
            still = session.scalar(
                select(func.count())
                .select_from(Experiment)
                .where(Experiment.id.in_(rows), Experiment.state.in_(ACTIVE_STATES))
            )
        return len(rows) - int(still or 0)

    def _reconcile_one(self, exp_id: str) -> None:
        with self.sessions() as session:
            exp = session.get(Experiment, exp_id)
            if exp is None or exp.state not in ACTIVE_STATES:
                return
            state, submission_id, cancel = JobState(exp.state), exp.ray_job_id, exp.cancel_requested
            dispatched_at = exp.dispatched_at
            preempting = None if cancel else exp.preempt_requested_at
            is_sweep = exp.is_sweep
        if self.ray is None or submission_id is None:
            return
        ray_state = self.ray.state(submission_id)
        now = utcnow()
        if cancel and ray_state is not None and ray_state.status in RAY_ACTIVE:
            self.ray.stop(submission_id)
            return  # the next round sees STOPPED
        if preempting is not None and ray_state is not None and ray_state.status in RAY_ACTIVE:
            self._stop_overdue_victim(exp_id, submission_id, preempting, now)
        stopped_for_us = False
        if preempting is not None and ray_state is not None and ray_state.status == "SUCCEEDED":
            checkpointed = self._checkpointed_since(exp_id, preempting, is_sweep)
            if checkpointed is None:
                return  # the store did not answer: the next round looks again
            stopped_for_us = checkpointed
        if preempting is not None and (
            ray_state is None or ray_state.status in ("STOPPED", "FAILED") or stopped_for_us
        ):
            if self.store_monitor.available and (
                ray_state is None or self._ingest_metrics(exp_id, force=True)
            ):
                self._preempted(exp_id)
            return
        store_up = self.store_monitor.available
        still_running = ray_state is None or ray_state.status in RAY_ACTIVE
        if not store_up and still_running and self._outage_too_long():
            self._fail_for_outage(exp_id, submission_id, ray_state)
            return
        if ray_state is None:
            if cancel:
                self._finish(exp_id, JobState.cancelled, "cancelled before Ray started it")
            elif state is JobState.dispatching:
                age = (now - dispatched_at).total_seconds() if dispatched_at else 1e9
                if age > self.settings.lost_job_grace_s:
                    log.warning("%s: Ray has no job %s; submitting it again", exp_id, submission_id)
                    self.submit(exp_id)
            else:
                self._attempt_failed(exp_id, f"Ray lost job {submission_id} (cluster restarted?)")
            return
        status = ray_state.status
        if status == "PENDING":
            return
        if status == "RUNNING":
            if state is JobState.dispatching:
                self._started(exp_id)
            if store_up:
                self._ingest_metrics(exp_id)
            return
        if not store_up or not self._ingest_metrics(exp_id, force=True):
            return  # finished: finalised once the store answers and its metrics and results are read
        if status == "SUCCEEDED":
            self._succeeded(exp_id)
        elif status == "STOPPED":
            reason = (
                "cancelled; Ray job stopped"
                if cancel
                else f"Ray job {submission_id} was stopped outside the service"
            )
            self._finish(exp_id, JobState.cancelled, reason)
        elif cancel:  # FAILED
            self._finish(exp_id, JobState.cancelled, "cancelled")
        else:
            failure = self._failure(submission_id, ray_state)
            if failure.exit_code == EXIT_PREEMPTED:
                # the worker checkpointed and stopped on its own (a node drained under it): not a failure
                self._preempted(exp_id, by_worker=failure.error)
                return
            self._attempt_failed(
                exp_id, failure.error, log_tail=failure.log_tail, retry=not failure.bad_input
            )

    def _stop_overdue_victim(
        self, exp_id: str, submission_id: str, asked_at: datetime, now: datetime
    ) -> None:
        """A victim Ray still runs past grace + margin (Ray should have killed it after the grace):
        ask Ray to stop it again, at most once per grace period."""
        grace = self.settings.preemption_grace_s
        overdue = (now - asked_at).total_seconds() - grace - self.settings.preemption_stop_margin_s
        if overdue <= 0 or time.monotonic() - self._restopped.get(exp_id, 0.0) < grace:
            return
        self._restopped[exp_id] = time.monotonic()
        log.warning("%s: still running %.0f s after its preemption; stopping it again", exp_id, overdue)
        self._stop_victim(exp_id, submission_id)

    def _preempted(self, exp_id: str, *, by_worker: str | None = None) -> None:
        """The victim's Ray job ended: back to `queued` (it keeps its place), its attempt not charged.
        Its just-in-time checkpoint's time (preempted.json) becomes `last_checkpoint_at`; the work since
        the last checkpoint is counted as lost. `by_worker`: the worker stopped without being asked
        (exit code EXIT_PREEMPTED, e.g. its node was drained), with this error line."""
        with self.sessions() as session:
            exp = session.get(Experiment, exp_id)
            if exp is None or exp.state not in ACTIVE_STATES:
                return
            kind, is_sweep, started_at = exp.kind, exp.is_sweep, exp.started_at
        saved: float | None = None
        if kind != "evaluation":
            try:
                saved = self._checkpoint_saved_at(exp_id, is_sweep=is_sweep)
            except StoreUnavailable as exc:
                self.store_monitor.record_failure(exc)
                return  # finalised once the store answers
            except StoreError as exc:
                log.warning("%s: reading its preempted.json: %s", exp_id, exc)
        if saved is not None and started_at is not None and saved < started_at.timestamp() - 1:
            saved = None  # an earlier attempt's marker

        def go(session: Session) -> None:
            exp = session.get(Experiment, exp_id)
            if exp is None or exp.state not in ACTIVE_STATES:
                return
            if exp.preempt_requested_at is None and by_worker is None:
                return
            now = utcnow()
            checkpoint = exp.last_checkpoint_at
            if saved is not None:
                at = datetime.fromtimestamp(min(saved, now.timestamp()), tz=now.tzinfo)
                checkpoint = at if checkpoint is None or at > checkpoint else checkpoint
            lost = 0.0
            if exp.started_at is not None:
                since = max(exp.started_at, checkpoint) if checkpoint is not None else exp.started_at
                lost = max(0.0, (now - since).total_seconds()) * exp.charge_rate
            transition(
                session,
                exp,
                JobState.queued,
                reason=requeue_reason(
                    exp.preempted_by if by_worker is None else None,
                    checkpoint_saved=saved is not None,
                    why=by_worker,
                ),
                attempts=max(0, exp.attempts - 1),
                preemptions=(exp.preemptions or 0) + 1,
                preempt_requested_at=None,
                last_checkpoint_at=checkpoint,
                lost_gpu_seconds=(exp.lost_gpu_seconds or 0.0) + lost,
                # dispatched_at stays: the next run gets a new Ray submission id (ray_submission_id)
                estimated_start_at=None,
            )

        run_tx(self.sessions, go)
        self._restopped.pop(exp_id, None)

    def _checkpointed_since(self, exp_id: str, asked_at: datetime, is_sweep: bool) -> bool | None:
        """A victim whose Ray job SUCCEEDED: did it stop for the preemption (a preempted.json saved
        after the stop was asked for) rather than finish? Ray reports a stopped job SUCCEEDED when its
        entrypoint exits 0 on SIGTERM before the job supervisor has recorded the stop. None: the
        store did not answer."""
        try:
            saved = self._checkpoint_saved_at(exp_id, is_sweep=is_sweep)
        except StoreUnavailable as exc:
            self.store_monitor.record_failure(exc)
            return None
        except StoreError as exc:  # not a passing outage: taken as no marker, so it ends as Ray says
            log.warning("%s: reading its preempted.json: %s", exp_id, exc)
            return False
        return saved is not None and saved >= asked_at.timestamp() - 1

    def _checkpoint_saved_at(self, exp_id: str, *, is_sweep: bool) -> float | None:
        """The newest `saved_at` of the run's preempted.json files (every trial's, for a sweep)."""
        if is_sweep:
            prefix = experiment_prefix(exp_id)
            keys = [i.key for i in self._store.list(prefix) if i.key.endswith("/" + PREEMPTED_FILE)]
        else:
            keys = [experiment_prefix(exp_id, "main") + PREEMPTED_FILE]
        times = []
        for key in keys:
            try:
                value = saved_at(self._store.get_json(key))
            except KeyNotFound:
                continue
            if value is not None:
                times.append(value)
        return max(times) if times else None

    def _failure(self, submission_id: str, ray_state: RayJobState) -> Failure:
        try:
            logs = self.ray.logs(submission_id) if self.ray else ""
        except RayUnavailable:
            logs = ""
        return describe_failure(submission_id, ray_state.message, logs[-200_000:], ray_state.exit_code)

    def _outage_too_long(self) -> bool:
        return self.store_monitor.outage_s() > self.settings.store_outage_fail_s

    def _fail_for_outage(self, exp_id: str, submission_id: str, ray_state: RayJobState | None) -> None:
        """The store stayed down past `store_outage_fail_s`: stop the run (it can save neither
        checkpoints nor results) and fail the job with a reason that says so in one line."""
        outage, limit = self.store_monitor.outage_s(), self.settings.store_outage_fail_s
        error = one_line(
            f"artifact store {self.store.url} unreachable for {outage:.0f} s (more than "
            f"{env_name('store_outage_fail_s')}={limit:g}): the run could not save checkpoints or results "
            f"and was stopped; `lbgat retry` resumes it from its last checkpoint "
            f"(last error: {self.store_monitor.error})",
            MAX_ERROR_CHARS,
        )
        if ray_state is not None and ray_state.status in RAY_ACTIVE and self.ray is not None:
            try:
                self.ray.stop(submission_id)
            except RayUnavailable as exc:
                log.warning("%s: could not stop Ray job %s: %s", exp_id, submission_id, exc)
        log.warning("%s: %s", exp_id, error)
        self._finish(
            exp_id,
            JobState.failed,
            "artifact store unreachable for too long",
            error=error,
            error_log_tail=None,
        )

    def _started(self, exp_id: str) -> None:
        def go(session: Session) -> float | None:
            exp = session.get(Experiment, exp_id)
            if exp is None or exp.state != JobState.dispatching.value:
                return None
            now = utcnow()
            reason = "Ray job running"
            stopping = session.scalars(
                select(Experiment.id).where(
                    Experiment.preempted_by == exp_id,
                    Experiment.preempt_requested_at.is_not(None),
                    Experiment.state.in_(ACTIVE_STATES),
                )
            ).all()
            if stopping:  # dispatched on what its victims free (see plan)
                reason += f"; its workers start as {', '.join(sorted(stopping))} release their resources"
            if transition(session, exp, JobState.running, reason=reason, started_at=now):
                return (now - exp.dispatched_at).total_seconds() if exp.dispatched_at else None
            return None

        latency = run_tx(self.sessions, go)
        if latency is not None:
            from service.metrics import observe_dispatch

            observe_dispatch(latency)

    def _finish(self, exp_id: str, new: JobState, reason: str, **fields) -> None:
        def go(session: Session) -> None:
            exp = session.get(Experiment, exp_id)
            if exp is not None and exp.state in ACTIVE_STATES:
                transition(session, exp, new, reason=reason, **fields)

        run_tx(self.sessions, go)

    def _attempt_failed(
        self, exp_id: str, error: str, *, log_tail: str | None = None, retry: bool = True
    ) -> None:
        """Retry from the last checkpoint while attempts remain (and `retry`), else fail the job."""

        def go(session: Session) -> None:
            exp = session.get(Experiment, exp_id)
            if exp is None or exp.state not in ACTIVE_STATES:
                return
            if retry and exp.attempts < exp.max_attempts:
                new = JobState.retrying
                reason = f"attempt {exp.attempts} failed; retrying from the last checkpoint: {error}"
            elif retry:
                new, reason = JobState.failed, f"attempt {exp.attempts} of {exp.max_attempts} failed"
            else:
                new = JobState.failed
                reason = (
                    f"attempt {exp.attempts} failed on bad input (exit code {EXIT_BAD_INPUT}); not retried, "
                    "the same input would fail again"
                )
            transition(session, exp, new, reason=reason, error=error, error_log_tail=log_tail)

        run_tx(self.sessions, go)

    def _succeeded(self, exp_id: str) -> None:
        """Read the results, then mark the job succeeded; a store that stops answering meanwhile
        leaves the job as it is, to be finalised in a later round (its results are not lost)."""
        with self.sessions() as session:
            exp = session.get(Experiment, exp_id)
            if exp is None:
                return
            is_sweep, kind = exp.is_sweep, exp.kind
        try:
            results = ingest.read_results(self._store, exp_id, is_sweep=is_sweep, kind=kind)
        except StoreUnavailable as exc:
            self.store_monitor.record_failure(exc)
            log.warning("%s succeeded; its results will be read when the store answers: %s", exp_id, exc)
            return
        except (StoreError, ValueError) as exc:  # no summary written, an unreadable one, or a refusal
            log.warning("%s succeeded but its results cannot be read: %s", exp_id, exc)
            results = None

        def go(session: Session) -> None:
            exp = session.get(Experiment, exp_id)
            if exp is None or exp.state not in ACTIVE_STATES:
                return
            fields = {}
            if results is not None:
                # trials' summaries, and the (checkpoint, protocol) row of eval_results
                ingest.apply_results(session, exp, results)
                fields = {
                    "results": results.row,
                    "clean_accuracy": results.row.get("clean_accuracy"),
                    "robust_accuracy": results.row.get("robust_accuracy"),
                    "autoattack_accuracy": results.row.get("autoattack_accuracy"),
                }
            transition(
                session,
                exp,
                JobState.succeeded,
                reason="Ray job succeeded",
                error=None,
                error_log_tail=None,
                **fields,
            )

        run_tx(self.sessions, go)

    def _ingest_metrics(self, exp_id: str, *, force: bool = False) -> bool:
        """Bring in new metrics.jsonl lines (every `metrics_interval_s`, or now if `force`); False when
        the store did not answer (the breaker is then open)."""
        now = time.monotonic()
        if not force and now - self._metrics_at.get(exp_id, 0.0) < self.settings.metrics_interval_s:
            return True
        self._metrics_at[exp_id] = now
        try:
            run_tx(self.sessions, lambda session: ingest.ingest_metrics(session, self._store, exp_id))
        except StoreUnavailable as exc:
            self.store_monitor.record_failure(exc)
            log.warning("reading metrics of %s: %s", exp_id, exc)
            return False
        except StoreError as exc:  # retrying cannot fix it; the next interval tries again anyway
            log.warning("reading metrics of %s: %s", exp_id, exc)
        return True
