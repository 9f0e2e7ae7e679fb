"""POST /v1/checkpoints over HTTP (SQLite and PostgreSQL): uploads are streamed within
LBGAT_MAX_UPLOAD_BYTES, checked without torch and without running anything in them, stored once by
their sha256 and reachable only by the teams that uploaded them; evaluations name them by sha256."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from service.db.models import Checkpoint
from tests.service.conftest import Api, Person
from tests.service.evaluations_helpers import job_spec, save_digits_checkpoint

LIMIT = 1024 * 1024  # this server's LBGAT_MAX_UPLOAD_BYTES


def upload(person: Person, data: bytes, **params: Any) -> Any:
    return person.http.post(
        "/v1/checkpoints", content=data, params=params, headers={"Content-Type": "application/octet-stream"}
    )


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


def _stored(api: Api) -> list[str]:
    return [o.key for o in api.store.list("checkpoints/")]


def _rows(api: Api) -> int:
    with api.sessions() as session:
        return session.scalar(select(func.count()).select_from(Checkpoint))


def test_uploads_are_checked_stored_once_and_owned_by_the_team(make_api, tmp_path: Path) -> None:
    import torch

    api = make_api(max_upload_bytes=LIMIT)
    alice, bob = api.person(), api.person()
    carol = api.person(alice.team)

    # refused before anything is stored, and nothing in the file ran
    marker = tmp_path / "ran"
    torch.save({"robust": {"w": torch.zeros(2)}, "x": _System(f"touch {marker}")}, tmp_path / "evil.pt")
    r = upload(alice, (tmp_path / "evil.pt").read_bytes(), model="tiny_cnn", dataset="digits")
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == "body"
    assert "system" in r.json()["detail"] and "nothing in it ran" in r.json()["detail"]
    assert not marker.exists()
    opener = pickle.dumps({"x": _Open(str(marker))}, protocol=2)
    with zipfile.ZipFile(tmp_path / "open.pt", "w") as archive:
        archive.writestr("archive/data.pkl", opener)
    assert upload(alice, (tmp_path / "open.pt").read_bytes()).status_code == 422
    assert not marker.exists()
    r = upload(alice, b"GIF89a not a checkpoint at all")
    assert r.status_code == 422 and "not torch's zip format" in r.json()["detail"]
    with zipfile.ZipFile(tmp_path / "bomb.pt", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("archive/data/0", bytes(4 * LIMIT))
    bomb = (tmp_path / "bomb.pt").read_bytes()
    assert len(bomb) < LIMIT
    r = upload(alice, bomb)
    assert r.status_code == 422 and "unpacks to" in r.json()["detail"]
    r = upload(alice, b"")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "body"

    too_big = b"\0" * (LIMIT + 1)
    r = upload(alice, too_big)
    assert r.status_code == 413 and "LBGAT_MAX_UPLOAD_BYTES" in r.json()["detail"]

    def chunked():  # no Content-Length: counted as it arrives
        for start in range(0, len(too_big), 65536):
            yield too_big[start : start + 65536]

    r = alice.http.post(
        "/v1/checkpoints", content=chunked(), headers={"Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 413
    r = alice.http.post("/v1/checkpoints", content=b"x", headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    assert _stored(api) == [] and _rows(api) == 0

    # this project's checkpoint: it says what it is
    ours = save_digits_checkpoint(tmp_path / "ours.pt").read_bytes()
    sha = hashlib.sha256(ours).hexdigest()
    r = upload(alice, ours, name="digits-run")
    assert r.status_code == 201, r.text
    out = r.json()
    assert (out["sha256"], out["size"], out["created"], out["name"]) == (sha, len(ours), True, "digits-run")
    assert (out["model"], out["dataset"], out["num_classes"], out["norm"], out["eps"]) == (
        "tiny_cnn",
        "digits",
        10,
        "linf",
        0.1,
    )
    assert _stored(api) == [f"checkpoints/{sha}.pt"]
    assert api.store.get_bytes(f"checkpoints/{sha}.pt") == ours
    again = upload(carol, ours)  # the same team: the same row, nothing stored again
    assert (
        again.status_code == 200 and again.json()["created"] is False and again.json()["name"] == "digits-run"
    )
    r = upload(alice, ours, dataset="mnist")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "query.dataset"

    # a plain state dict must be named; its classifier must fit the dataset
    plain = save_digits_checkpoint(tmp_path / "plain.pt", plain=True).read_bytes()
    r = upload(bob, plain)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "query.model"
    r = upload(bob, plain, model="tiny_cnn")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "query.dataset"
    seven = save_digits_checkpoint(tmp_path / "seven.pt", plain=True, classes=7).read_bytes()
    r = upload(bob, seven, model="tiny_cnn", dataset="digits")
    assert r.status_code == 422 and "has 7 outputs; digits has 10 classes" in r.json()["detail"]
    r = upload(bob, plain, model="tiny_cnn", dataset="cifar10")
    assert r.status_code == 422 and "cifar10 has 3 channels" in r.json()["detail"]
    r = upload(bob, plain, model="tiny_cnn", dataset="digits")
    assert r.status_code == 201 and r.json()["model"] == "tiny_cnn"
    plain_sha = r.json()["sha256"]
    # the file alice's team stored is already there: bob's team gets its own row, no second copy
    r = upload(bob, ours)
    assert r.status_code == 201 and r.json()["created"] is False
    assert len(_stored(api)) == 2

    assert [c["sha256"] for c in alice.http.get("/v1/checkpoints").json()] == [sha]
    assert {c["sha256"] for c in bob.http.get("/v1/checkpoints").json()} == {sha, plain_sha}

    # evaluations name them by sha256, within the team that uploaded them
    r = alice.http.post("/v1/evaluations", json={"target": {"sha256": sha}, "protocol": "digits"})
    assert r.status_code == 201, r.text
    spec = job_spec(api, r.json()["id"])
    assert (spec.checkpoint.key, spec.checkpoint.sha256, spec.checkpoint.model) == (
        f"checkpoints/{sha}.pt",
        sha,
        None,
    )
    assert (spec.target_weights, spec.source_experiment, spec.dataset.name) == ("upload", None, "digits")
    assert r.json()["target"] == "digits-run"
    r = bob.http.post("/v1/evaluations", json={"target": {"sha256": plain_sha}, "protocol": "digits"})
    assert r.status_code == 201, r.text
    assert job_spec(api, r.json()["id"]).checkpoint.model.name == "tiny_cnn"  # rebuilt from a ModelRef
    r = alice.http.post("/v1/evaluations", json={"target": {"sha256": plain_sha}, "protocol": "digits"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "body.target.sha256"
    r = bob.http.post("/v1/evaluations", json={"target": {"sha256": sha}, "protocol": "robustbench-linf"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == "body.protocol"


class _Open:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))
