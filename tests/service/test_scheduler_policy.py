"""The scheduling policy (service.scheduler.plan) on constructed queues: priority, fair share, FIFO,
limits, capacity and the reasons waiting jobs are given."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from service.ray_jobs import Capacity
from service.scheduler import Candidate, Holder, UserLimits, plan

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
ALICE, BOB, CAROL = 1, 2, 3
TEAM_A, TEAM_B = 10, 20
LIMITS = {
    ALICE: UserLimits("alice", 10, 8),
    BOB: UserLimits("bob", 10, 8),
    CAROL: UserLimits("carol", 10, 8),
}
TEAMS = {ALICE: TEAM_A, BOB: TEAM_A, CAROL: TEAM_B}


def job(
    name: str, owner: int, minute: int, *, priority: int = 0, gpus: float = 1, cpus: float = 1
) -> Candidate:
    return Candidate(
        id=name,
        owner_id=owner,
        team_id=TEAMS[owner],
        priority=priority,
        created_at=T0 + timedelta(minutes=minute),
        gpus=gpus,
        cpus=cpus,
        charge_rate=gpus,
    )


def order(result) -> list[str]:
    """Dispatched jobs first (in dispatch order), then waiting ones by position."""
    waiting = sorted(result.waiting, key=lambda j: result.waiting[j][0])
    return [j.id for j in result.dispatch] + waiting


def run(
    candidates,
    active=(),
    *,
    gpus=8.0,
    cpus=64.0,
    max_running=8,
    user_usage=None,
    team_usage=None,
    quantum=1.0,
    limits=None,
):
    return plan(
        candidates,
        active,
        capacity=Capacity(gpus=gpus, cpus=cpus, nodes=1),
        max_running=max_running,
        limits=limits or LIMITS,
        user_usage=user_usage or {},
        team_usage=team_usage or {},
        quantum_h=quantum,
    )


def test_fifo_for_one_user():
    jobs = [job("a3", ALICE, 3), job("a1", ALICE, 1), job("a2", ALICE, 2)]
    result = run(jobs, max_running=1)
    assert order(result) == ["a1", "a2", "a3"]
    assert result.waiting["a2"] == (1, "all 1 Ray job slots are busy (LBGAT_MAX_RUNNING_JOBS=1)")
    assert result.waiting["a3"][0] == 2


def test_fair_share_alternates_users_with_equal_history():
    # alice submitted three jobs before bob's two; the slots alternate between them
    jobs = [
        job("a1", ALICE, 1),
        job("a2", ALICE, 2),
        job("a3", ALICE, 3),
        job("b1", BOB, 4),
        job("b2", BOB, 5),
    ]
    both_teams = {ALICE: TEAM_A, BOB: TEAM_B}
    jobs = [Candidate(**{**j.__dict__, "team_id": both_teams[j.owner_id]}) for j in jobs]
    result = run(jobs, max_running=5)
    assert [j.id for j in result.dispatch] == ["a1", "b1", "a2", "b2", "a3"]


def test_positions_alternate_while_all_slots_are_busy():
    jobs = [job("a1", ALICE, 1), job("a2", ALICE, 2), job("a3", ALICE, 3), job("c1", CAROL, 4)]
    active = [Holder(99, 30, 1, 1, 1.0)]  # someone of a third team holds the only slot
    result = run(jobs, active, max_running=1)
    assert result.dispatch == []
    assert {j: p for j, (p, _) in result.waiting.items()} == {"a1": 1, "c1": 2, "a2": 3, "a3": 4}


def test_less_usage_goes_first_and_running_jobs_count():
    jobs = [job("a1", ALICE, 1), job("c1", CAROL, 2)]
    # alice's team used 5 GPU-hours this week, carol's none: carol's later job goes first
    assert order(run(jobs, max_running=1, team_usage={TEAM_A: 5.0})) == ["c1", "a1"]
    # equal history, but carol has two one-GPU jobs running (charged 1 h each in advance)
    active = [Holder(CAROL, TEAM_B, 1, 1, 1.0), Holder(CAROL, TEAM_B, 1, 1, 1.0)]
    assert order(run(jobs, active, max_running=3)) == ["a1", "c1"]


def test_team_share_before_user_share():
    # bob alone has used nothing, but his team (with alice) has used more than carol's team
    jobs = [job("b1", BOB, 1), job("c1", CAROL, 2)]
    result = run(
        jobs, max_running=1, user_usage={ALICE: 3.0, CAROL: 1.0}, team_usage={TEAM_A: 3.0, TEAM_B: 1.0}
    )
    assert order(result) == ["c1", "b1"]


def test_priority_beats_fair_share():
    jobs = [job("c1", CAROL, 1), job("a1", ALICE, 2, priority=5)]
    assert order(run(jobs, max_running=1, team_usage={TEAM_A: 100.0})) == ["a1", "c1"]


def test_user_limits_skip_without_blocking_others():
    limits = {**LIMITS, ALICE: UserLimits("alice", 1, 8)}
    jobs = [job("a1", ALICE, 1), job("a2", ALICE, 2), job("b1", BOB, 3)]
    result = run(jobs, limits=limits)
    assert [j.id for j in result.dispatch] == ["a1", "b1"]
    assert result.waiting["a2"] == (1, "alice has 1 running jobs (limit 1)")

    gpu_limits = {**LIMITS, BOB: UserLimits("bob", 10, 2)}
    result = run([job("b1", BOB, 1, gpus=2), job("b2", BOB, 2, gpus=1)], limits=gpu_limits)
    assert [j.id for j in result.dispatch] == ["b1"]
    assert "exceeds the limit 2" in result.waiting["b2"][1]


def test_capacity_admission_without_backfill():
    jobs = [job("a1", ALICE, 1, gpus=2), job("b1", BOB, 2, gpus=4), job("c1", CAROL, 3, gpus=1)]
    active = [Holder(CAROL, TEAM_B, 3, 1, 3.0)]  # 3 of 8 GPUs held; 5 free
    result = run(jobs, active, gpus=8)
    assert [j.id for j in result.dispatch] == ["a1"]  # 3 free after it: b1 (4 GPUs) must wait
    assert result.waiting["b1"][1] == "waits for 4 GPUs and 1 CPUs; 3 GPUs and 62 CPUs are free"
    # c1 would fit in the 3 free GPUs but does not jump the job waiting for capacity
    assert result.waiting["c1"][1] == "behind b1, which waits for cluster capacity"


def test_job_larger_than_the_cluster_does_not_block():
    jobs = [job("a1", ALICE, 1, gpus=16), job("b1", BOB, 2, gpus=1)]
    result = run(jobs, gpus=8)
    assert [j.id for j in result.dispatch] == ["b1"]
    assert result.waiting["a1"] == (1, "asks for 16 GPUs; the cluster has 8 (waits for nodes to join)")


def test_gpu_optional_jobs_run_on_cpu_clusters():
    cpu_job = Candidate("a1", ALICE, TEAM_A, 0, T0, gpus=1, cpus=1, gpu_optional=True, charge_rate=1)
    gpu_job = Candidate("b1", BOB, TEAM_A, 0, T0 + timedelta(minutes=1), gpus=1, cpus=1)
    result = run([cpu_job, gpu_job], gpus=0, cpus=2)
    assert [j.id for j in result.dispatch] == ["a1"]
    assert "asks for 1 GPUs; the cluster has 0" in result.waiting["b1"][1]
    result = run([job("c1", CAROL, 1, gpus=0, cpus=2), job("c2", CAROL, 2, gpus=0, cpus=1)], gpus=0, cpus=2)
    assert [j.id for j in result.dispatch] == ["c1"]


def test_unreachable_ray_dispatches_nothing_and_says_why():
    result = plan(
        [job("a1", ALICE, 1)],
        [],
        capacity=None,
        max_running=4,
        limits=LIMITS,
        user_usage={},
        team_usage={},
        quantum_h=1.0,
        capacity_error="connection refused",
    )
    assert result.dispatch == []
    assert result.waiting["a1"] == (1, "Ray is not reachable (connection refused); waiting for it")


def test_ten_thousand_jobs_get_distinct_positions():
    jobs = [job(f"j{i}", (ALICE, BOB, CAROL)[i % 3], i) for i in range(10_000)]
    result = run(jobs, max_running=4)
    assert len(result.dispatch) == 4 and len(result.waiting) == 9_996
    positions = sorted(p for p, _ in result.waiting.values())
    assert positions == list(range(1, 9_997))
