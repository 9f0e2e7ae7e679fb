"""Listings over a long queue: migration 0005's indexes (both backends; on SQLite the page's keys are
read in index order, no sort of the matches), and how listings reuse the scheduler's queue view."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect, text

from api_schemas.jobs import JobState
from service import jobs, queue_report
from service.auth import create_user
from service.db.engine import make_engine, run_tx, session_factory
from service.db.migrate import current_revision, downgrade, upgrade
from service.db.models import Base, User

NEW = {"ix_experiments_state_created", "ix_experiments_team_created", "ix_experiments_team_state_created"}


def _indexes(engine) -> set[str]:
    return {i["name"] for i in inspect(engine).get_indexes("experiments")}


def _key_query_plan(engine) -> list[str]:
    """SQLite's plan of the page's key query (list_experiments' first statement), as a team member
    lists its queued jobs and as an admin lists every team's."""
    sessions = session_factory(engine)
    member = run_tx(sessions, lambda s: create_user(s, name="lister", team="listers").id)
    plans = []
    for admin in (False, True):
        statements: list[tuple[str, Any]] = []

        def capture(conn, cursor, statement, parameters, context, executemany, into=statements):
            into.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", capture)
        try:
            with sessions() as session:
                viewer = session.get(User, member)
                viewer.is_admin = admin
                jobs.list_experiments(session, viewer=viewer, state=[JobState.queued], limit=50)
                session.rollback()
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        statement, parameters = next((s, p) for s, p in statements if "ORDER BY" in s)
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
        plans.append(" / ".join(str(r[-1]) for r in rows))
    return plans


def test_migration_0005_listing_indexes(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0004")
        assert "ix_experiments_team_id" in _indexes(engine) and not NEW & _indexes(engine)
        upgrade(engine)
        assert current_revision(engine) == "0005"
        assert _indexes(engine) >= NEW and "ix_experiments_team_id" not in _indexes(engine)
        with engine.connect() as conn:  # the models and the migrated schema (head) agree
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        if engine.dialect.name == "sqlite":
            member, admin = _key_query_plan(engine)
            assert "ix_experiments_team_state_created" in member and "TEMP B-TREE" not in member, member
            assert "ix_experiments_state_created" in admin and "TEMP B-TREE" not in admin, admin
        downgrade(engine, "0004")
        assert "ix_experiments_team_id" in _indexes(engine) and not NEW & _indexes(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM experiments")).scalar() == 0
    finally:
        engine.dispose()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Scheduler:
    """Scheduler.queue_view's contract: the view if it is young enough and knows every id asked,
    else a new plan (of `waiting`), which costs `plan_s` on the clock."""

    def __init__(self, clock: _Clock, plan_s: float) -> None:
        self.clock, self.plan_s = clock, plan_s
        self.waiting: list[str] = []
        self.view: dict[str, tuple[Any, ...]] = {}
        self.view_at = -1e9
        self.plans = 0

    def queue_view(self, ids=(), max_age_s: float = 2.0):
        if self.clock.now - self.view_at <= max_age_s and all(i in self.view for i in ids):
            return self.view
        self.plans += 1
        self.clock.now += self.plan_s
        self.view = {exp_id: (n, "waits", None) for n, exp_id in enumerate(self.waiting, 1)}
        self.ends = {"running": self.plans}  # which plan the ends are of
        self.view_at = self.clock.now
        return self.view

    def expected_ends(self, max_age_s: float = 2.0):
        self.queue_view((), max_age_s)
        return dict(self.ends)


def test_listings_reuse_a_costly_view(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(queue_report, "time", SimpleNamespace(monotonic=clock))

    cheap = _Scheduler(clock, plan_s=0.05)  # a short queue: exactly queue_view(ids)
    cheap.waiting = ["a"]
    assert queue_report.current_view(cheap, ["a"]) == {"a": (1, "waits", None)} and cheap.plans == 1
    cheap.waiting = ["a", "b"]
    assert queue_report.current_view(cheap, ["b"])["b"] == (2, "waits", None) and cheap.plans == 2
    clock.now += 2.5
    queue_report.current_view(cheap, ["a"])
    assert cheap.plans == 3

    costly = _Scheduler(clock, plan_s=3.0)  # 100,000 queued: a plan takes seconds
    costly.waiting = ["a"]
    assert queue_report.current_view(costly, ["a"]) == {"a": (1, "waits", None)} and costly.plans == 1
    costly.waiting = ["a", "b"]
    clock.now += 5  # older than 2 s, and "b" is new: the view is still used (up to 4 x 3 s)
    view = queue_report.current_view(costly, ["a", "b"])
    assert costly.plans == 1 and "b" not in view and view["a"] == (1, "waits", None)
    clock.now += 8  # 13 s old: planned again
    assert queue_report.current_view(costly, ["b"])["b"] == (2, "waits", None) and costly.plans == 2
    # the queue's own table (GET /v1/queue) reuses the view by the same rule, and takes the running
    # jobs' ends from the plan its view is of
    clock.now += 5
    view, ends = queue_report.current_view_and_ends(costly, ["a"])
    assert costly.plans == 2 and view is costly.view and ends == {"running": 2}
    clock.now += 8
    view, ends = queue_report.current_view_and_ends(costly, ["a"])
    assert costly.plans == 3 and view is costly.view and ends == {"running": 3}


def test_queue_table_reads_waiting_ids_only_while_plans_are_cheap(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(queue_report, "time", SimpleNamespace(monotonic=clock))
    asked: list[int] = []

    def ids() -> list[str]:
        asked.append(1)
        return ["a", "b"]

    cheap = _Scheduler(clock, plan_s=0.05)
    cheap.waiting = ["a"]
    queue_report.current_view_and_ends(cheap, ids)
    assert len(asked) == 1 and cheap.plans == 1
    view, ends = queue_report.current_view_and_ends(cheap, ids)  # "b" is not in the view: planned
    assert len(asked) == 2 and cheap.plans == 2 and ends == {"running": 2} and view is cheap.view
    costly = _Scheduler(clock, plan_s=3.0)
    costly.waiting = ["a"]
    queue_report.current_view_and_ends(costly, ids)
    asked.clear()
    costly.waiting = ["a", "b"]
    clock.now += 5
    view, _ = queue_report.current_view_and_ends(costly, ids)
    assert asked == [] and costly.plans == 1 and "b" not in view
