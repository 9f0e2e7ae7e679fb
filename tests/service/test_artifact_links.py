"""Symbolic links in the local artifact store, through the real API (issue 11: a link under an
experiment's prefix served /etc/passwd to a token of the experiment's team)."""

from __future__ import annotations

from pathlib import Path

from tests.service.conftest import Api, Person, digits_spec
from workers.storage import LocalStore, experiment_prefix


def _submit(person: Person, name: str) -> str:
    r = person.http.post("/v1/experiments", json={"spec": digits_spec(name)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_links_out_of_an_experiment_are_neither_served_nor_listed(api: Api, tmp_path: Path) -> None:
    store = api.store
    assert isinstance(store, LocalStore)
    alice, bob = api.person(), api.person()  # two teams
    mine, also_mine, theirs = _submit(alice, "mine"), _submit(alice, "also-mine"), _submit(bob, "theirs")
    store.put_bytes(experiment_prefix(mine, "main") + "summary.json", b'{"ok": true}')
    store.put_bytes(experiment_prefix(theirs, "main") + "summary.json", b"team b's results")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for the api")

    folder = store.root / "experiments" / mine
    (folder / "linkfile").symlink_to(outside / "secret.txt")  # a file outside the store
    (folder / "linkdir").symlink_to(outside)  # a folder outside the store
    (folder / "etc").symlink_to("/etc")
    (folder / "other").symlink_to(store.root / "experiments" / theirs)  # another team's experiment
    (folder / "main" / "peek.json").symlink_to(f"../../{theirs}/main/summary.json")  # relative
    (store.root / "experiments" / also_mine).symlink_to(store.root / "experiments" / theirs)

    refused = [
        (mine, "linkfile"),
        (mine, "linkdir/secret.txt"),
        (mine, "etc/passwd"),
        (mine, "other/main/summary.json"),
        (mine, "main/peek.json"),
        (also_mine, "main/summary.json"),
    ]
    for exp_id, path in refused:
        r = alice.http.get(f"/v1/experiments/{exp_id}/artifacts/{path}")
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert path in r.json()["detail"]  # names what was asked for (the log says it is a link)
        assert "not for the api" not in r.text and "team b" not in r.text and "root:" not in r.text

    listed = alice.http.get(f"/v1/experiments/{mine}/artifacts").json()
    assert [(a["path"], a["size"]) for a in listed] == [("main/summary.json", 12)]
    assert alice.http.get(f"/v1/experiments/{also_mine}/artifacts").json() == []
    assert alice.http.get(f"/v1/experiments/{mine}/artifacts/main/summary.json").content == b'{"ok": true}'
    # the experiment the links point to is still served to its own team, and only to it
    assert bob.http.get(f"/v1/experiments/{theirs}/artifacts/main/summary.json").text == "team b's results"
    assert alice.http.get(f"/v1/experiments/{theirs}/artifacts/main/summary.json").status_code == 404
