"""`service.client.Client` and the `lbgat` control-plane commands against the real API over sockets:
uvicorn on 127.0.0.1 (a free port) in a thread, SQLite in a temporary folder, a local artifact store,
the scheduler off (jobs are moved along directly in the database where a test needs them to run)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from api_schemas.jobs import JobState  # noqa: E402
from api_schemas.presets import PRESETS  # noqa: E402
from service.app import create_app  # noqa: E402
from service.client import ApiError, Client, ServiceUnreachable, credentials  # noqa: E402
from service.client.cli import main  # noqa: E402
from service.db.engine import make_engine, run_tx, session_factory  # noqa: E402
from service.db.models import Event, Experiment  # noqa: E402
from service.jobs import transition  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from workers.dev_s3 import free_port  # noqa: E402
from workers.storage import LocalStore  # noqa: E402

ADMIN_TOKEN = "lbg_test_admin_token_0123456789abcdef"


def _small_digits(epochs: int = 3) -> dict:
    spec = json.loads(json.dumps(PRESETS["digits"].data))
    spec["optimization"]["epochs"] = epochs
    spec["optimization"]["schedule"]["milestones"] = [epochs - 1]
    return spec


@dataclass
class Server:
    url: str
    store: LocalStore
    sessions: object
    alice: str  # tokens; alice and bob share the team `vision`
    bob: str

    def admin(self) -> Client:
        return Client(self.url, ADMIN_TOKEN)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("service")
    settings = ServiceSettings(
        _env_file=None,
        database_url=f"sqlite:///{tmp / 'lbgat.db'}",
        admin_token=ADMIN_TOKEN,
        scheduler_enabled=False,
        ray_address=None,
    )
    store = LocalStore(tmp / "artifacts")
    app = create_app(settings, store=store, scheduler=False)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive(), "uvicorn stopped at start"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    engine = make_engine(settings.database_url)
    try:
        with Client(url, ADMIN_TOKEN) as admin:
            alice = admin.create_user("alice", team="vision").token.token
            bob = admin.create_user("bob", team="vision").token.token
        yield Server(url, store, session_factory(engine), alice, bob)
    finally:
        uv.should_exit = True
        thread.join(timeout=15)
        engine.dispose()


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test has its own credentials folder and no LBGAT_API_URL / LBGAT_TOKEN from outside."""
    folder = tmp_path / "config"
    monkeypatch.setenv("LBGAT_CONFIG_DIR", str(folder))
    monkeypatch.delenv("LBGAT_API_URL", raising=False)
    monkeypatch.delenv("LBGAT_TOKEN", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    return folder


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _login_as(server: Server, token: str) -> None:
    credentials.save(server.url, token, user=None)


def _set_state(server: Server, exp_id: str, *states: JobState, **fields: object) -> None:
    def go(session):  # type: ignore[no-untyped-def]
        exp = session.get(Experiment, exp_id)
        for state in states:
            assert transition(session, exp, state, reason=f"test: {state.value}")
        for key, value in fields.items():
            setattr(exp, key, value)

    run_tx(server.sessions, go)


# ------------------------------------------------------------------------------------------ login


def test_login_writes_a_0600_file_and_later_commands_use_it(server: Server, capsys, _isolated_config):
    code, out, err = _run(capsys, "login", "--url", server.url + "/", "--token", server.alice)
    assert code == 0, err
    assert f"logged in to {server.url} as alice (team vision)" in out
    path = _isolated_config / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["default_url"] == server.url
    assert stored["servers"][server.url] == {"token": server.alice, "user": "alice"}
    assert server.alice not in out + err  # the token is never printed

    # no --url, no LBGAT_TOKEN: the stored server and token are used
    code, out, _ = _run(capsys, "users", "me", "--json")
    assert code == 0
    me = json.loads(out)
    assert (me["name"], me["team"], me["is_admin"]) == ("alice", "vision", False)

    # a refused token is not stored; the earlier one stays
    code, out, err = _run(capsys, "login", "--url", server.url, "--token", "lbg_not-a-token")
    assert code == 2
    assert "refused this token" in err and "nothing stored" in err
    assert json.loads(path.read_text())["servers"][server.url]["token"] == server.alice

    code, out, _ = _run(capsys, "logout")
    assert code == 0 and f"logged out of {server.url}" in out
    code, _, err = _run(capsys, "ls", "--server", server.url)
    assert code == 2
    assert "401" in err and "run `lbgat login`" in err


def test_env_token_wins_over_the_credentials_file(server: Server, monkeypatch):
    _login_as(server, server.alice)
    monkeypatch.setenv("LBGAT_TOKEN", server.bob)
    with Client() as client:
        assert client.base_url == server.url
        assert client.me().name == "bob"
        assert "lbg_" not in repr(client)


# ------------------------------------------------------------------------------------------ submit


def test_submit_json_and_yaml_then_ls_and_show_see_them(server: Server, capsys, tmp_path: Path):
    _login_as(server, server.alice)
    code, out, err = _run(
        capsys,
        "submit",
        "--preset",
        "digits",
        "--set",
        "optimization.epochs=3",
        "--set",
        "optimization.schedule.milestones=[2]",
        "--priority",
        "5",
        "--tag",
        "smoke",
    )
    assert code == 0, err
    first = out.strip()
    assert first.startswith("digits-") and len(out.splitlines()) == 1

    spec_file = tmp_path / "exp.yaml"
    spec_file.write_text(yaml.safe_dump({**_small_digits(2), "name": "yaml-cli"}))
    code, out, err = _run(capsys, "submit", str(spec_file), "--json")
    assert code == 0, err
    second = json.loads(out)
    assert (second["name"], second["owner"], second["team"], second["state"]) == (
        "yaml-cli",
        "alice",
        "vision",
        "queued",
    )

    with Client() as client:
        third = client.submit_yaml(yaml.safe_dump({**_small_digits(2), "name": "yaml-raw"}), priority=-3)
    assert (third.name, third.priority, third.state) == ("yaml-raw", -3, JobState.queued)

    code, out, _ = _run(capsys, "ls", "--json", "--user", "alice")
    listed = {e["id"]: e for e in json.loads(out)}
    assert {first, second["id"], third.id} <= set(listed)
    assert listed[first]["priority"] == 5 and listed[first]["tags"] == ["smoke"]
    assert all(listed[i]["state"] == "queued" for i in (first, second["id"], third.id))

    code, out, _ = _run(capsys, "show", first, "--json")
    assert code == 0
    detail = json.loads(out)
    assert detail["spec"]["optimization"]["epochs"] == 3
    assert detail["spec"]["method"]["name"] == "lbgat"
    assert [h["to_state"] for h in detail["history"]] == ["queued"]

    code, out, _ = _run(capsys, "show", first)
    assert code == 0
    assert first in out and "queued" in out and "history" in out and "vision" in out

    code, out, _ = _run(capsys, "ls")
    assert code == 0 and first in out and "yaml-cli" in out


def test_idempotency_key_reuse_queues_once(server: Server):
    with Client(server.url, server.alice) as client:
        before = sum(1 for _ in client.iter_experiments(page_size=2))
        a = client.submit(_small_digits(), idempotency_key="same-key-1")
        b = client.submit(_small_digits(), idempotency_key="same-key-1")
        assert a.id == b.id
        c = client.submit(_small_digits())  # a fresh key per call: a new experiment
        assert c.id != a.id
        # iter_experiments follows the cursors (page size 2) and finds exactly two more
        assert sum(1 for _ in client.iter_experiments(page_size=2)) == before + 2
        with pytest.raises(ApiError) as info:
            client.submit({**_small_digits(), "seed": 7}, idempotency_key="same-key-1")
    assert info.value.status == 409
    assert a.id in info.value.detail


def test_a_bad_spec_is_refused_with_its_field_path(server: Server, capsys, tmp_path: Path):
    bad = _small_digits()
    bad["method"]["alpha"] = -1
    with Client(server.url, server.alice) as client:
        before = client.list(limit=200).items
        with pytest.raises(ApiError) as info:
            client.submit(bad)
        assert info.value.status == 422
        assert "method.alpha" in [e["loc"] for e in info.value.errors]
        assert "method.alpha" in str(info.value)
        assert len(client.list(limit=200).items) == len(before)  # nothing queued

    _login_as(server, server.alice)
    # refused here already: the local check names the field and sends nothing
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    code, out, err = _run(capsys, "submit", str(path))
    assert code == 2 and out == ""
    assert "method.alpha" in err
    # valid locally, refused by the service (priority is -100..100): its 422 on stderr, exit 2
    code, out, err = _run(capsys, "submit", "--preset", "digits", "--priority", "1000")
    assert code == 2 and out == ""
    assert err.startswith("error: 422") and "priority" in err


# ------------------------------------------------------------------------------------------ lifecycle


def test_cancel_and_retry_change_the_state(server: Server, capsys):
    _login_as(server, server.alice)
    with Client() as client:
        exp = client.submit(_small_digits())
    code, out, err = _run(capsys, "cancel", exp.id)
    assert code == 0, err
    assert out.strip() == f"{exp.id}: cancelled"
    with Client() as client:
        assert client.get(exp.id).state == JobState.cancelled

    code, out, _ = _run(capsys, "retry", exp.id, "--json")
    assert code == 0
    assert json.loads(out)["state"] == "queued"
    code, out, _ = _run(capsys, "show", exp.id, "--json")
    assert [h["to_state"] for h in json.loads(out)["history"]] == ["queued", "cancelled", "queued"]

    # bob (same team) sees it but may not change it
    with Client(server.url, server.bob) as bob:
        assert bob.get(exp.id).owner == "alice"
        with pytest.raises(ApiError) as info:
            bob.cancel(exp.id)
    assert info.value.status == 403
    assert "owner" in str(info.value)


def test_wait_follows_the_event_stream_to_the_end(server: Server, capsys):
    """`submit --wait`: the job is moved along in the database while the CLI follows the SSE stream;
    it prints the results table and exits 0."""
    _login_as(server, server.alice)
    results = {
        "clean_accuracy": 0.9,
        "robust_accuracy": 0.5,
        "autoattack_accuracy": 0.48,
        "nrr": 0.64,
        "attacks": {"fgsm": 0.6, "pgd20": 0.5},
    }

    def worker() -> None:
        deadline = time.monotonic() + 20
        exp_id = None
        while exp_id is None and time.monotonic() < deadline:
            with server.sessions() as session:  # type: ignore[operator]
                exp = session.query(Experiment).filter_by(name="waited").one_or_none()
                exp_id = exp.id if exp is not None else None
            time.sleep(0.05)
        assert exp_id is not None
        _set_state(server, exp_id, JobState.dispatching, JobState.running)

        def metrics(session):  # type: ignore[no-untyped-def]
            for epoch in (1, 2):
                row = {"epoch": epoch, "loss": 1.0 / epoch, "train_adv_accuracy": 0.3 * epoch}
                session.add(Event(experiment_id=exp_id, kind="metric", trial="main", data=row))

        run_tx(server.sessions, metrics)
        _set_state(server, exp_id, JobState.succeeded, results=results, clean_accuracy=0.9)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    code, out, err = _run(
        capsys, "submit", "--preset", "digits", "--set", "name=waited", "--wait", "--timeout", "30"
    )
    thread.join(timeout=5)
    assert code == 0, err
    exp_id = out.splitlines()[0]
    assert f"{exp_id}: queued → dispatching" in err and "running → succeeded" in err
    assert f"{exp_id}: succeeded" in out
    assert "90.0%" in out and "48.0%" in out  # clean, AutoAttack

    with Client() as client:
        rows = client.metrics(exp_id)
        assert [(r["trial"], r["epoch"], r["loss"]) for r in rows] == [("main", 1, 1.0), ("main", 2, 0.5)]
        events = list(client.events(exp_id))
        assert events[-1][0] == "end" and events[-1][1]["state"] == "succeeded"
        assert [d["to"] for e, d in events if e == "state"] == [
            "queued",
            "dispatching",
            "running",
            "succeeded",
        ]
        final = client.wait(exp_id, timeout=10)
        assert final.state == JobState.succeeded and final.results.clean_accuracy == 0.9


# ------------------------------------------------------------------------------------------ artifacts, results


def test_artifacts_list_and_get_download_a_stored_file(server: Server, capsys, tmp_path: Path):
    _login_as(server, server.alice)
    with Client() as client:
        exp = client.submit(_small_digits())
    payload = os.urandom(300_000)
    server.store.put_bytes(f"experiments/{exp.id}/main/checkpoints/last.pt", payload)
    server.store.put_bytes(f"experiments/{exp.id}/main/metrics.jsonl", b'{"epoch": 1}\n')

    code, out, _ = _run(capsys, "artifacts", exp.id, "--json")
    assert code == 0
    listed = {a["path"]: a["size"] for a in json.loads(out)}
    assert listed == {"main/checkpoints/last.pt": 300_000, "main/metrics.jsonl": 13}

    target = tmp_path / "out" / "ckpt.pt"
    code, out, err = _run(capsys, "artifacts", exp.id, "get", "main/checkpoints/last.pt", "-o", str(target))
    assert code == 0, err
    assert target.read_bytes() == payload
    assert f"main/checkpoints/last.pt -> {target}" in out
    assert not list(target.parent.glob(".*.part"))

    code, _, err = _run(capsys, "artifacts", exp.id, "get", "main/nope.pt", "-o", str(tmp_path))
    assert code == 2 and "404" in err
    assert not (tmp_path / "nope.pt").exists()


def test_results_leaderboard_shows_a_finished_experiment(server: Server, capsys):
    _login_as(server, server.alice)
    with Client() as client:
        a = client.submit({**_small_digits(), "name": "board-a"})
        b = client.submit({**_small_digits(), "name": "board-b"})
    row = {"clean_accuracy": 0.93, "robust_accuracy": 0.61, "autoattack_accuracy": 0.58, "nrr": 0.7365}
    row |= {"attacks": {"fgsm": 0.7, "pgd20": 0.61}, "precision": "fp32", "selection_split": "test"}
    done = (JobState.dispatching, JobState.running, JobState.succeeded)
    _set_state(
        server, a.id, *done, results=row, clean_accuracy=0.93, robust_accuracy=0.61, autoattack_accuracy=0.58
    )
    _set_state(server, b.id, *done, results={**row, "autoattack_accuracy": 0.40}, autoattack_accuracy=0.40)

    code, out, _ = _run(capsys, "results", "--leaderboard", "--dataset", "digits", "--json")
    assert code == 0
    board = [r for r in json.loads(out) if r["experiment_id"] in (a.id, b.id)]
    assert [r["experiment_id"] for r in board] == [a.id, b.id]  # ranked by AutoAttack accuracy
    assert board[0]["clean_accuracy"] == 0.93 and board[0]["attacks"] == {"fgsm": 0.7, "pgd20": 0.61}
    assert (board[0]["owner"], board[0]["method"], board[0]["norm"]) == ("alice", "lbgat", "linf")
    assert (board[0]["precision"], board[0]["selection_split"]) == ("fp32", "test")

    code, out, _ = _run(capsys, "results")
    assert code == 0 and a.id in out and "93.0%" in out and "58.0%" in out
    assert "fp32 / test" in out and "chosen on the test set" in out

    code, out, _ = _run(capsys, "results", "--compare", a.id, b.id, "--json")
    comparison = json.loads(out)
    assert [r["experiment_id"] for r in comparison["rows"]] == [a.id, b.id]
    assert set(comparison["attacks"]) == {"fgsm", "pgd20"}


# ------------------------------------------------------------------------------------------ admin, errors


def test_users_create_needs_an_admin_and_gives_a_token(server: Server, capsys):
    _login_as(server, server.alice)
    code, _, err = _run(capsys, "users", "create", "carol")
    assert code == 2 and "403" in err

    _login_as(server, ADMIN_TOKEN)
    code, out, err = _run(capsys, "users", "create", "carol", "--team", "audio")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "created user carol (team audio)"
    token = lines[1]
    with Client(server.url, token) as carol:
        assert carol.me().team == "audio"
        new = carol.create_token("laptop")
        assert new.user == "carol" and new.label == "laptop"
    with Client(server.url, new.token) as carol:
        assert carol.me().name == "carol"
        assert carol.list().items == []  # another team's experiments are not visible


def test_unreachable_service_names_the_url_and_lbgat_serve(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, "lbg_x", retries=2, backoff_s=0.01) as client, pytest.raises(ServiceUnreachable) as info:
        client.health()
    assert url in str(info.value) and "connection refused" in str(info.value)
    assert "lbgat serve" in str(info.value)
    code, _, err = _run(capsys, "ls", "--server", url)
    assert code == 3
    assert url in err and "lbgat serve" in err


def test_health_and_readiness(server: Server):
    with Client(server.url) as client:
        assert client.health()
        ready = client.ready()
    assert "database" in ready.checks and ready.checks["database"] == "ok"


def test_submit_and_show_print_the_experiments_page(server: Server, capsys):
    _login_as(server, server.alice)
    code, out, err = _run(capsys, "submit", "--preset", "digits", "--set", "name=paged")
    assert code == 0, err
    exp_id = out.strip()
    page = f"{server.url}/experiments/{exp_id}"
    assert f"page: {page}" in err.splitlines()
    code, out, _ = _run(capsys, "show", exp_id)
    assert code == 0 and page in out
    # the address is the service's own page (it sends a browser without a session to sign in)
    import httpx

    r = httpx.get(page, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/?next=")
