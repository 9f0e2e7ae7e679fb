"""The bootstrap admin token (LBGAT_ADMIN_TOKEN) once it has been revoked, across restarts of a real
server on SQLite and PostgreSQL (issue 11: the restart failed with a UNIQUE constraint violation)."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.auth import hash_token
from service.db.models import ApiToken
from tests.service.conftest import ADMIN_TOKEN, running_api


def test_a_revoked_bootstrap_token_stays_revoked_and_the_service_starts(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_api(database_url, tmp_path) as api:
        admin = api.admin
        r = admin.http.post("/v1/users", json={"name": "ops", "team": "default", "is_admin": True})
        assert r.status_code == 201, r.text
        ops_token = r.json()["token"]["token"]
        with api.sessions() as session:
            bootstrap = session.scalar(
                select(ApiToken.id).where(ApiToken.token_hash == hash_token(ADMIN_TOKEN))
            )
        assert admin.http.delete(f"/v1/tokens/{bootstrap}").status_code == 204
        assert admin.http.get("/v1/users/me").status_code == 401

    caplog.set_level(logging.WARNING, logger="service.auth")
    with running_api(database_url, tmp_path) as api:  # the same LBGAT_ADMIN_TOKEN: it starts
        r = api.client(ADMIN_TOKEN).get("/v1/users/me")
        assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API token"
        assert api.client(ops_token).get("/v1/users/me").json()["name"] == "ops"
        with api.sessions() as session:
            rows = session.scalars(
                select(ApiToken).where(ApiToken.token_hash == hash_token(ADMIN_TOKEN))
            ).all()
            assert [(row.id, row.revoked_at is not None) for row in rows] == [(bootstrap, True)]
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.auth"]
    assert len(warnings) == 1 and "LBGAT_ADMIN_TOKEN is revoked" in warnings[0]
    assert "replace LBGAT_ADMIN_TOKEN" in warnings[0] and ADMIN_TOKEN not in caplog.text

    rotated = "lbg_test-rotated-" + secrets.token_hex(16)
    with running_api(database_url, tmp_path, admin_token=rotated) as api:  # a new secret: a new admin token
        me = api.client(rotated).get("/v1/users/me").json()
        assert (me["name"], me["is_admin"]) == ("admin", True)
        assert api.client(ADMIN_TOKEN).get("/v1/users/me").status_code == 401
        with api.sessions() as session:
            assert (
                session.scalar(
                    select(func.count()).select_from(ApiToken).where(ApiToken.label == "bootstrap")
                )
                == 2
            )
