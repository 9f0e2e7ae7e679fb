"""The control plane served for real: `create_app` under uvicorn on 127.0.0.1 (a free port, in a thread),
a real database (SQLite file and PostgreSQL, see tests/databases.py) and a local artifact store,
spoken to with httpx over the socket.

`api` is one server per module and backend (starting one costs a migration, and a database on
PostgreSQL), so tests that share it work in their own team and count only their own jobs;
`make_api` serves a fresh database for tests that count everything (metrics) or break something.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import ServiceSettings
from tests.databases import BACKENDS, database
from workers.storage import ArtifactStore, LocalStore

ADMIN_TOKEN = "lbg_test-admin-" + secrets.token_hex(16)


def make_settings(database_url: str, **overrides: Any) -> ServiceSettings:
    """Settings for a test server: no scheduler, no Ray, the bootstrap admin, nothing from .env."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "scheduler_enabled": False,
        "ray_address": None,
        "admin_token": ADMIN_TOKEN,
        "max_spec_bytes": 16 * 1024,
        "max_page_size": 50,
        **overrides,
    }
    return ServiceSettings(_env_file=None, **values)  # type: ignore[call-arg]


@contextmanager
def serve(app: Any, *, timeout_s: float = 30.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread on 127.0.0.1; yields its base URL.

    The socket is bound before the server starts (port 0: the OS picks a free one), so there is no
    window in which another process could take the port.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the test server stopped during startup (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the test server did not start within {timeout_s} s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@dataclass
class Person:
    name: str
    team: str
    token: str
    http: httpx.Client
    is_admin: bool = False


@dataclass
class Api:
    """A running server: its URL, app (state: sessions, store), and people with clients."""

    url: str
    app: Any
    store: ArtifactStore
    settings: ServiceSettings
    _clients: list[httpx.Client] = field(default_factory=list)

    @property
    def sessions(self) -> Any:
        return self.app.state.sessions

    def client(self, token: str | None = None, **headers: str) -> httpx.Client:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self._clients.append(client)
        return client

    @property
    def admin(self) -> Person:
        return Person("admin", "default", ADMIN_TOKEN, self.client(ADMIN_TOKEN), is_admin=True)

    def person(self, team: str | None = None, *, is_admin: bool = False, prefix: str = "u") -> Person:
        """A new user (created over the API by the admin) in `team` (default: a team of their own)."""
        name = f"{prefix}-{secrets.token_hex(4)}"
        team = team or f"team-{secrets.token_hex(4)}"
        r = self.admin.http.post("/v1/users", json={"name": name, "team": team, "is_admin": is_admin})
        assert r.status_code == 201, r.text
        token = r.json()["token"]["token"]
        return Person(name, team, token, self.client(token), is_admin)

    def close(self) -> None:
        for client in self._clients:
            client.close()


@contextmanager
def running_api(
    database_url: str,
    root: Path,
    *,
    store: ArtifactStore | None = None,
    scheduler: bool = False,
    **overrides: Any,
) -> Iterator[Api]:
    """A served app; `scheduler` True runs its real dispatcher (give it `ray_address` and an entrypoint)."""
    from service.app import create_app

    settings = make_settings(database_url, **overrides)
    store = store if store is not None else LocalStore(root / "store")
    app = create_app(settings, store=store, scheduler=scheduler)
    with serve(app) as url:
        api = Api(url=url, app=app, store=store, settings=settings)
        try:
            yield api
        finally:
            api.close()


@pytest.fixture(scope="module", params=BACKENDS)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One server per test module and database backend."""
    root = tmp_path_factory.mktemp(f"api-{request.param}")
    with database(request.param, root) as url, running_api(url, root) as running:
        yield running


@pytest.fixture
def make_api(database_url: str, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """A server on a fresh database (both backends, through `database_url`); call it at most once."""
    stack: list[Any] = []

    def start(*, store: ArtifactStore | None = None, **overrides: Any) -> Api:
        context = running_api(database_url, tmp_path, store=store, **overrides)
        stack.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stack):
        context.__exit__(None, None, None)


def digits_spec(name: str = "digits", **method: Any) -> dict[str, Any]:
    """The CPU demo preset as a spec dict (valid; `method` overrides its method's fields)."""
    import copy

    from api_schemas.presets import PRESETS

    data = copy.deepcopy(PRESETS["digits"].data)
    spec = {**data, "name": name}
    spec["method"] = {**data["method"], **method}
    return spec
