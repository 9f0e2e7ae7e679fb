"""Engine and sessions for SQLite (WAL, the single-box default) and PostgreSQL (a team deployment)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("service.db")

T = TypeVar("T")


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            # WAL: readers never block the writer; NORMAL is durable across process crashes in WAL mode.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _locked(exc: OperationalError) -> bool:
    text = str(exc.orig).lower() if exc.orig is not None else str(exc).lower()
    return "database is locked" in text or "database is busy" in text


def run_tx(sessions: sessionmaker[Session], fn: Callable[[Session], T], *, attempts: int = 8) -> T:
    """Run `fn` in one transaction and commit; retry the whole transaction when SQLite reports a
    write conflict (a deferred transaction that read before another writer committed cannot
    upgrade to a write lock, and busy_timeout does not cover that case)."""
    for attempt in range(attempts):
        with sessions() as session:
            try:
                result = fn(session)
                session.commit()
                return result
            except OperationalError as exc:
                session.rollback()
                if not _locked(exc) or attempt == attempts - 1:
                    raise
        time.sleep(0.005 * 2**attempt)
    raise AssertionError("unreachable")
