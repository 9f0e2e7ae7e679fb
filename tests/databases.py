"""Databases for the service's tests: a fresh SQLite file, and a fresh PostgreSQL database on the
machine's server (127.0.0.1:5432, trust auth) created and dropped by the fixture.

PostgreSQL is required where it runs (CI here has it): set LBGAT_TEST_POSTGRES=skip to run without.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PG_ADMIN_URL = os.environ.get("LBGAT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgres"]


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new database on the test server; yields its SQLAlchemy URL and drops it afterwards."""
    if os.environ.get("LBGAT_TEST_POSTGRES") == "skip":
        pytest.skip("LBGAT_TEST_POSTGRES=skip")
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lbgat_t_{secrets.token_hex(6)}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        raise RuntimeError(
            f"PostgreSQL at {PG_ADMIN_URL} is needed by this test ({exc}); start it, or set "
            "LBGAT_TEST_POSTGRES=skip to run without it"
        ) from exc
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def database(backend: str, tmp_path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'lbgat.db'}"
    else:
        with postgres_database() as url:
            yield url
