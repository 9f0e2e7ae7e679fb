"""Tokens, users and who may see or change what, over HTTP against a real server and database."""

from __future__ import annotations

from sqlalchemy import select

from service.auth import hash_token
from service.db.models import ApiToken
from tests.service.conftest import ADMIN_TOKEN, Api, digits_spec


def _submit(person, name: str = "digits") -> dict:
    r = person.http.post("/v1/experiments", json={"spec": digits_spec(name)})
    assert r.status_code == 201, r.text
    return r.json()


def test_missing_bad_and_revoked_tokens_are_refused(api: Api) -> None:
    anonymous = api.client()
    for method, path in [
        ("GET", "/v1/experiments"),
        ("POST", "/v1/experiments"),
        ("GET", "/v1/users/me"),
        ("GET", "/v1/results/leaderboard"),
        ("GET", "/metrics"),
    ]:
        r = anonymous.request(method, path)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "missing API token" in r.json()["detail"]
        assert r.json()["errors"] == []

    r = api.client("lbg_not-a-token").get("/v1/users/me")
    assert r.status_code == 401
    assert r.json()["detail"] == "invalid or revoked API token"
    r = api.client("").get("/v1/users/me", headers={"Authorization": "Basic YTpi"})
    assert r.status_code == 401

    alice = api.person()
    r = alice.http.post("/v1/tokens", json={"label": "laptop"})
    assert r.status_code == 201, r.text
    second = r.json()
    assert second["user"] == alice.name and second["label"] == "laptop"
    assert second["token"].startswith("lbg_") and second["prefix"] == second["token"][:10]
    with api.sessions() as session:  # only the hash is stored
        row = session.get(ApiToken, second["id"])
        assert row.token_hash == hash_token(second["token"]) and second["token"] not in row.token_hash
    laptop = api.client(second["token"])
    with api.sessions() as session:
        assert session.get(ApiToken, second["id"]).last_used_at is None
    assert laptop.get("/v1/users/me").json()["name"] == alice.name
    with api.sessions() as session:  # the first use is recorded (later ones at most every 5 minutes)
        assert session.get(ApiToken, second["id"]).last_used_at is not None

    assert alice.http.delete(f"/v1/tokens/{second['id']}").status_code == 204
    r = laptop.get("/v1/users/me")
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API token"
    assert alice.http.delete(f"/v1/tokens/{second['id']}").status_code == 404  # already revoked
    assert alice.http.get("/v1/users/me").status_code == 200  # her first token still works

    # someone else's token cannot be revoked by a non-admin (and does not reveal that it exists)
    bob = api.person(alice.team)
    with api.sessions() as session:
        bob_token_id = session.scalar(select(ApiToken.id).where(ApiToken.token_hash == hash_token(bob.token)))
    assert alice.http.delete(f"/v1/tokens/{bob_token_id}").status_code == 404
    assert bob.http.get("/v1/users/me").status_code == 200


def test_health_needs_no_token(api: Api) -> None:
    anonymous = api.client()
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    assert anonymous.get("/readyz").status_code == 200


def test_only_admins_manage_users(api: Api) -> None:
    carol = api.person()
    r = carol.http.post("/v1/users", json={"name": "mallory"})
    assert r.status_code == 403 and r.json()["detail"] == "this needs an admin token"
    assert carol.http.get("/v1/users").status_code == 403

    me = carol.http.get("/v1/users/me").json()
    assert me["name"] == carol.name and me["team"] == carol.team and me["is_admin"] is False

    admin = api.admin
    r = admin.http.post("/v1/users", json={"name": carol.name, "team": "x"})
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    r = admin.http.post("/v1/users", json={"name": "bad name!", "team": "x"})
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["errors"]] == ["body.name"]
    r = admin.http.post(
        "/v1/users", json={"name": "quota-" + carol.name, "max_running_jobs": 1, "max_gpus": 2}
    )
    assert r.status_code == 201
    created = r.json()
    assert created["user"]["team"] == "default" and created["user"]["max_running_jobs"] == 1
    assert created["user"]["max_gpus"] == 2.0 and created["token"]["user"] == "quota-" + carol.name

    names = [u["name"] for u in admin.http.get("/v1/users").json()]
    assert {"admin", carol.name, "quota-" + carol.name} <= set(names)
    assert names == sorted(names)
    assert admin.http.get("/v1/users/me").json()["is_admin"] is True


def test_team_visibility_and_ownership(api: Api) -> None:
    owner = api.person(prefix="owner")
    teammate = api.person(owner.team, prefix="mate")
    stranger = api.person(prefix="stranger")
    exp = _submit(owner)
    exp_id = exp["id"]
    assert exp["owner"] == owner.name and exp["team"] == owner.team

    # the team sees it; another team gets 404 everywhere (its existence is not revealed)
    assert teammate.http.get(f"/v1/experiments/{exp_id}").status_code == 200
    assert [e["id"] for e in teammate.http.get("/v1/experiments").json()["items"]] == [exp_id]
    for method, path in [
        ("GET", f"/v1/experiments/{exp_id}"),
        ("GET", f"/v1/experiments/{exp_id}/metrics"),
        ("GET", f"/v1/experiments/{exp_id}/events"),
        ("GET", f"/v1/experiments/{exp_id}/artifacts"),
        ("GET", f"/v1/experiments/{exp_id}/artifacts/main/summary.json"),
        ("POST", f"/v1/experiments/{exp_id}/cancel"),
        ("POST", f"/v1/experiments/{exp_id}/retry"),
        ("DELETE", f"/v1/experiments/{exp_id}"),
    ]:
        r = stranger.http.request(method, path)
        assert r.status_code == 404, (path, r.status_code, r.text)
        assert r.json()["detail"] == f"experiment {exp_id!r} not found"
    assert stranger.http.get("/v1/experiments").json() == {"items": [], "next_cursor": None}
    r = stranger.http.get("/v1/results/compare", params={"ids": [exp_id, exp_id + "x"]})
    assert r.status_code == 404

    # a teammate may look but not change
    for method, path in [
        ("POST", f"/v1/experiments/{exp_id}/cancel"),
        ("DELETE", f"/v1/experiments/{exp_id}"),
    ]:
        r = teammate.http.request(method, path)
        assert r.status_code == 403, r.text
        assert f"belongs to {owner.name}" in r.json()["detail"]
    assert owner.http.get(f"/v1/experiments/{exp_id}").json()["state"] == "queued"

    # an admin (any team) may change it
    r = api.client(ADMIN_TOKEN).post(f"/v1/experiments/{exp_id}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    history = owner.http.get(f"/v1/experiments/{exp_id}").json()["history"]
    assert [(h["from_state"], h["to_state"]) for h in history] == [(None, "queued"), ("queued", "cancelled")]
    assert history[-1]["reason"] == "cancelled by admin"
    # ... and the teammate still may not retry it
    assert teammate.http.post(f"/v1/experiments/{exp_id}/retry").status_code == 403
    assert owner.http.post(f"/v1/experiments/{exp_id}/retry").json()["state"] == "queued"
