"""Preemption decisions of the planner (service.scheduler.plan with service.preemption) and start-time
estimates (service.estimates) on constructed queues, without Ray or a database."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from service.estimates import (
    Ahead,
    Busy,
    epoch_seconds,
    estimate_starts,
    evaluation_left_s,
    expected_end,
    training_left_s,
)
from service.preemption import PreemptionPolicy, choose_victims, work_lost_s
from service.ray_jobs import Capacity
from service.scheduler import Candidate, Holder, UserLimits, plan

NOW = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
ALICE, BOB, CAROL = 1, 2, 3
TEAMS = {ALICE: 10, BOB: 10, CAROL: 20}
LIMITS = {u: UserLimits(n, 10, 8) for u, n in ((ALICE, "alice"), (BOB, "bob"), (CAROL, "carol"))}
POLICY = PreemptionPolicy(min_priority=1, min_run_s=600, now=NOW)


def waiting(
    name: str, owner: int = ALICE, *, priority: int = 5, gpus: float = 1, minute: int = 0
) -> Candidate:
    return Candidate(
        id=name,
        owner_id=owner,
        team_id=TEAMS[owner],
        priority=priority,
        created_at=NOW - timedelta(hours=1) + timedelta(minutes=minute),
        gpus=gpus,
        cpus=1,
        charge_rate=gpus,
    )


def running(
    name: str,
    owner: int = BOB,
    *,
    priority: int = 0,
    gpus: float = 1,
    started_min: float = 60,
    checkpoint_min: float | None = None,
    preempting_for: str | None = None,
) -> Holder:
    return Holder(
        owner_id=owner,
        team_id=TEAMS[owner],
        gpus=gpus,
        cpus=1,
        charge_rate=gpus,
        id=name,
        priority=priority,
        started_at=NOW - timedelta(minutes=started_min),
        last_checkpoint_at=None if checkpoint_min is None else NOW - timedelta(minutes=checkpoint_min),
        preempting_for=preempting_for,
    )


def run(candidates, active, *, gpus=2.0, max_running=8, limits=None, policy=POLICY):
    return plan(
        candidates,
        active,
        capacity=Capacity(gpus=gpus, cpus=64, nodes=1),
        max_running=max_running,
        limits=limits or LIMITS,
        user_usage={},
        team_usage={},
        quantum_h=1.0,
        preemption=policy,
    )


def test_victims_by_least_work_lost_then_lowest_priority_then_latest_start():
    active = [
        running("old-ckpt", started_min=120, checkpoint_min=30),  # 30 GPU-min lost
        running("fresh-ckpt", started_min=120, checkpoint_min=2),  # 2 lost
        running("no-ckpt", started_min=20),  # 20 lost
    ]
    result = run([waiting("urgent")], active, gpus=3)
    assert result.preempt == {"urgent": ["fresh-ckpt"]}
    # dispatched at the decision, on what its victim frees (its Ray job starts while the victim saves)
    assert [j.id for j in result.dispatch] == ["urgent"] and result.waiting == {}
    assert result.handover == {"urgent": ["fresh-ckpt"]}

    # equal work lost: the lowest priority goes first, then the most recent start
    tie = [
        running("p1", priority=1, started_min=30, checkpoint_min=10),
        running("p0-early", priority=0, started_min=60, checkpoint_min=10),
        running("p0-late", priority=0, started_min=30, checkpoint_min=10),
    ]
    order = choose_victims(priority=5, need_slots=0, need_gpus=3, need_cpus=0, running=tie, policy=POLICY)
    assert [v.id for v in order] == ["p0-late", "p0-early", "p1"]
    assert work_lost_s(tie[0], NOW) == 600


def test_only_as_many_victims_as_needed():
    active = [running("small-a", gpus=1, started_min=30), running("big", gpus=2, started_min=40)]
    # 2 GPUs needed; small-a (least lost) alone is not enough, big alone is: small-a is dropped
    result = run([waiting("urgent", gpus=2)], active, gpus=3)
    assert result.preempt == {"urgent": ["big"]}
    # one slot needed (all slots busy, capacity free): one victim
    result = run([waiting("urgent", gpus=0)], active, gpus=8, max_running=2)
    assert result.preempt == {"urgent": ["small-a"]}


def test_min_run_time_and_priority_rule():
    young = running("young", started_min=5)  # under 10 minutes
    assert run([waiting("urgent")], [young], gpus=1).preempt == {}
    same = running("same", priority=5)
    assert run([waiting("urgent", priority=5)], [same], gpus=1).preempt == {}  # strictly lower only
    low = running("low", priority=0)
    # below the lowest priority that may preempt
    assert run([waiting("meh", priority=0)], [low], gpus=1).preempt == {}
    assert run([waiting("urgent", priority=1)], [low], gpus=1).preempt == {"urgent": ["low"]}
    # preemption off: no decision
    assert run([waiting("urgent")], [low], gpus=1, policy=None).preempt == {}
    # not enough to free even with every eligible victim: none is stopped
    assert run([waiting("huge", gpus=2)], [low, young], gpus=2).preempt == {}


def test_no_preemption_for_a_job_blocked_by_its_owner_limits():
    limits = {**LIMITS, ALICE: UserLimits("alice", 1, 8)}
    active = [running("alices", owner=ALICE, priority=0), running("bobs", priority=0)]
    result = run([waiting("urgent", owner=ALICE)], active, gpus=2, limits=limits)
    assert result.preempt == {}
    assert "limit 1" in result.waiting["urgent"][1]
    gpu_limits = {**LIMITS, ALICE: UserLimits("alice", 10, 1)}
    result = run([waiting("urgent", owner=ALICE)], active, gpus=2, limits=gpu_limits)
    assert result.preempt == {} and "exceeds the limit" in result.waiting["urgent"][1]


def test_one_decision_per_job_in_flight():
    # the preemptor is back in the queue (its submission failed) while its victim stops: dispatched
    # again on that victim, with no second decision nor a second victim
    active = [running("stopping", preempting_for="urgent"), running("other", priority=0)]
    result = run([waiting("urgent")], active, gpus=2)
    assert result.preempt == {}
    assert [j.id for j in result.dispatch] == ["urgent"] and result.handover == {"urgent": ["stopping"]}
    # a victim being stopped for one job is not chosen again for another
    result = run([waiting("second", minute=5)], [running("stopping", preempting_for="urgent")], gpus=1)
    assert result.preempt == {} and result.dispatch == []
    # victims in flight that no longer cover their preemptor (a node left): it waits, naming them
    active = [running("stopping", preempting_for="urgent"), running("young", started_min=5)]
    result = run([waiting("urgent", gpus=2)], active, gpus=2)
    assert result.preempt == {} and result.dispatch == []
    assert result.waiting["urgent"] == (1, "waiting for stopping to checkpoint and stop (preempted)")


def test_a_victim_handed_over_holds_nothing_and_nothing_is_given_twice():
    """Rounds after the decision: the preemptor is dispatched (a holder) while its victim still
    stops. The victim's slot and GPU are the preemptor's now: counted once, not free again."""
    victim = running("victim", preempting_for="urgent")
    urgent = running("urgent", owner=ALICE, priority=5, started_min=0)
    # 1 GPU, 2 slots: the GPU is the preemptor's; the victim's slot too, so one slot is left
    result = run([waiting("next", owner=CAROL, priority=5)], [victim, urgent], gpus=1, max_running=2)
    assert result.dispatch == [] and result.preempt == {}  # urgent is not lower, victim already stops
    assert "0 GPUs" in result.waiting["next"][1]
    cpu_jobs = [waiting(f"cpu-{i}", owner=CAROL, gpus=0, minute=i) for i in range(2)]
    result = run(cpu_jobs, [victim, urgent], gpus=1, max_running=2)
    assert [j.id for j in result.dispatch] == ["cpu-0"]
    assert "slots are busy" in result.waiting["cpu-1"][1]
    # a victim whose preemptor is not running (cancelled before it ended) still holds its GPU
    result = run([waiting("next", owner=CAROL, priority=0)], [victim], gpus=1)
    assert result.dispatch == [] and "0 GPUs" in result.waiting["next"][1]


def test_what_a_victim_frees_beyond_its_preemptors_need_goes_to_the_jobs_after_it_once():
    big = running("big", gpus=2, started_min=30)
    # the decision: urgent takes 1 of big's 2 GPUs, the job after it the other
    result = run([waiting("urgent"), waiting("after", owner=CAROL, priority=0, minute=1)], [big], gpus=2)
    assert result.preempt == {"urgent": ["big"]}
    assert [j.id for j in result.dispatch] == ["urgent", "after"]
    # the next round: both hold their GPU, big (stopping) holds nothing; a third job waits
    stopping = running("big", gpus=2, started_min=30, preempting_for="urgent")
    holders = [
        stopping,
        running("urgent", owner=ALICE, priority=5, started_min=0),
        running("after", owner=CAROL, started_min=0),
    ]
    result = run([waiting("third", owner=CAROL, priority=0, minute=2)], holders, gpus=2)
    assert result.dispatch == [] and "0 GPUs" in result.waiting["third"][1]


def test_two_urgent_jobs_each_get_their_own_victim_and_later_jobs_wait():
    active = [running("a", started_min=30), running("b", started_min=40)]
    result = run(
        [waiting("u1", minute=1), waiting("u2", minute=2), waiting("low", priority=0, minute=0)],
        active,
        gpus=2,
    )
    assert result.preempt == {"u1": ["a"], "u2": ["b"]}
    assert [j.id for j in result.dispatch] == ["u1", "u2"]
    assert result.waiting["low"][0] == 1 and "0 GPUs" in result.waiting["low"][1]


# -- estimates -----------------------------------------------------------------------------------


def test_estimates_simulate_capacity_freeing_in_queue_order():
    # 2 GPUs: r1 ends in 10 min, r2 in 30 min; w1 (1 GPU, 20 min), w2 (2 GPUs, 5 min), w3 (1 GPU)
    busy = [
        Busy("r1", 1, 1, NOW + timedelta(minutes=10)),
        Busy("r2", 1, 1, NOW + timedelta(minutes=30)),
    ]
    ahead = [
        Ahead("w1", 1, 1, 20 * 60),
        Ahead("w2", 2, 1, 5 * 60),
        Ahead("w3", 1, 1, 60),
        Ahead("giant", 4, 1, 60),
    ]
    got = estimate_starts(ahead, busy, gpus=2, cpus=8, max_running=4, now=NOW)
    assert got["w1"] == NOW + timedelta(minutes=10)  # when r1 frees its GPU
    assert got["w2"] == NOW + timedelta(minutes=30)  # needs both: r2 ends at 30, w1 at 30
    assert got["w3"] == NOW + timedelta(minutes=35)  # no backfill: after w2
    assert got["giant"] is None
    # slots are capacity too
    got = estimate_starts([Ahead("w", 0, 1, 60)], busy, gpus=2, cpus=8, max_running=2, now=NOW)
    assert got["w"] == NOW + timedelta(minutes=10)


def test_expected_end_from_epochs_and_shards():
    spec = {"optimization": {"epochs": 10}}
    rows = [{"epoch": e, "seconds": 30.0} for e in range(1, 5)]
    assert training_left_s(spec, rows) == 6 * 30
    last = NOW - timedelta(seconds=20)
    end = expected_end(
        kind="training", spec=spec, rows=rows, last_row_at=last, started_at=None, now=NOW, default_s=3600
    )
    assert end == last + timedelta(seconds=180)
    # no rows yet: the default duration from the start
    start = NOW - timedelta(minutes=5)
    end = expected_end(
        kind="training", spec=spec, rows=[], last_row_at=None, started_at=start, now=NOW, default_s=600
    )
    assert end == start + timedelta(seconds=600)
    # an evaluation: 4 of 10 shards in 40 s of this attempt -> 60 s left after the last row
    t0 = start.timestamp()
    progress = [{"shards_done": k, "n_shards": 10, "time": t0 + 10 * k} for k in range(1, 5)]
    assert evaluation_left_s(progress, start) == pytest.approx(60)


def test_an_epoch_lasts_the_wall_time_between_rows_where_rows_tell_it():
    """Training `seconds` leave out validation and reporting; consecutive rows' finish times do not.
    Their median skips a restart's gap, and rows that do not follow each other fall back to
    `seconds`."""
    spec = {"optimization": {"epochs": 10}}
    t = 1_000_000.0
    finished = [t, t + 40, t + 80, t + 500, t + 540]  # epoch 4 came after a 380 s restart
    rows = [
        {"epoch": e, "seconds": 30.0, "extra": {"finished_at": at}} for e, at in enumerate(finished, start=1)
    ]
    assert epoch_seconds(rows) == 40.0
    assert training_left_s(spec, rows) == 5 * 40.0
    assert epoch_seconds(rows[:1]) == 30.0  # one row: its training seconds
    gap = [rows[0], rows[2]]  # epochs 1 and 3: no consecutive pair
    assert epoch_seconds(gap) == 30.0
    assert epoch_seconds([{"epoch": 1}]) is None and training_left_s(spec, [{"epoch": 1}]) is None


def test_last_checkpoint_from_metrics_rows_and_evaluation_progress():
    from types import SimpleNamespace

    from service.ingest import _note_checkpoint

    training = SimpleNamespace(kind="training", last_checkpoint_at=None)
    _note_checkpoint(training, [{"epoch": 1}], NOW)
    assert training.last_checkpoint_at is None  # no checkpoint_at: unknown
    t = (NOW - timedelta(minutes=3)).timestamp()
    _note_checkpoint(training, [{"epoch": 1, "checkpoint_at": t - 60}, {"epoch": 2, "checkpoint_at": t}], NOW)
    assert training.last_checkpoint_at == NOW - timedelta(minutes=3)
    _note_checkpoint(training, [{"epoch": 3, "checkpoint_at": t - 600}], NOW)  # never goes back
    assert training.last_checkpoint_at == NOW - timedelta(minutes=3)
    evaluation = SimpleNamespace(kind="evaluation", last_checkpoint_at=None)
    _note_checkpoint(evaluation, [{"shards_done": 1, "time": t}], NOW)
    assert evaluation.last_checkpoint_at == NOW - timedelta(minutes=3)
    _note_checkpoint(evaluation, [{"shards_done": 2}], NOW)  # no time: when it was read
    assert evaluation.last_checkpoint_at == NOW
