"""`service.client` is the client side only: the SDK, the credentials file and the `lbgat` command import
no server code (FastAPI, SQLAlchemy, uvicorn, Ray, the service's app/db/scheduler) and no torch, and
`lbgat --help` lists the commands of every command-group module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SERVER_MODULES = (
    "fastapi",
    "sqlalchemy",
    "uvicorn",
    "torch",
    "ray",
    "service.app",
    "service.db",
    "service.scheduler",
    "service.server",
)

# every `lbgat` command, by the module of service/client/cli that registers it
COMMANDS = {
    "local": ["train", "eval", "presets"],
    "serve": ["serve"],
    "login": ["login", "logout"],
    "experiments": ["submit", "ls", "show", "logs", "cancel", "retry"],
    "queue": ["queue"],
    "results": ["results", "artifacts"],
    "evaluate": ["evaluate", "protocols"],
    "accounts": ["users", "token"],
    "usage": ["usage", "budget", "webhooks"],
}


def _env(home: Path) -> dict[str, str]:
    """This environment with an empty home and no LBGAT/XDG settings: nothing reads the user's files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LBGAT_", "XDG_"))}
    return {**env, "HOME": str(home), "COLUMNS": "200"}


def _python(code: str, home: Path) -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=_env(home),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _loaded(names: tuple[str, ...]) -> str:
    """Python text: the JSON list of the modules in `names` (or below them) that sys.modules holds."""
    return (
        f"names = {names!r}\n"
        "found = sorted(m for m in sys.modules if any(m == n or m.startswith(n + '.') for n in names))\n"
    )


def test_the_cli_starts_without_server_code_torch_or_httpx(tmp_path: Path):
    found = _python(
        "import sys\n"
        "import service.client, service.client.cli\n"
        "service.client.cli.build_parser()\n"
        + _loaded((*SERVER_MODULES, "httpx"))
        + "import json; print(json.dumps({'found': found}))\n",
        tmp_path,
    )["found"]
    # httpx comes with the SDK, on the first use of a name such as `service.client.Client`, so
    # `lbgat --help` and `lbgat presets` start without it
    assert found == [], f"`import service.client.cli` and build_parser() loaded {found}"


def test_no_module_of_the_client_package_imports_server_code(tmp_path: Path):
    result = _python(
        "import importlib, pkgutil, sys\n"
        "import service.client\n"
        "modules = ['service.client'] + [m.name for m in pkgutil.walk_packages(\n"
        "    service.client.__path__, 'service.client.') if not m.name.endswith('__main__')]\n"
        "for name in modules:\n"
        "    importlib.import_module(name)\n"
        "from service.client import ApiError, Client, ClientError, ServiceUnreachable\n"
        "service.client.cli.build_parser()\n"
        + _loaded(SERVER_MODULES)
        + "import json; print(json.dumps({'found': found, 'modules': modules}))\n",
        tmp_path,
    )
    assert result["found"] == [], f"importing service.client's modules loaded {result['found']}"
    groups = {f"service.client.cli.{group}" for group in COMMANDS}
    assert {"service.client.sdk", "service.client.credentials", *groups} <= set(result["modules"])


def test_the_sdk_names_are_re_exported():
    import service.client
    from service.client import sdk

    for name in service.client.__all__:
        assert getattr(service.client, name) is getattr(sdk, name)
    assert set(service.client.__all__) <= set(dir(service.client))
    with pytest.raises(AttributeError):
        service.client.NoSuchName  # noqa: B018


def test_every_command_module_is_a_registered_group():
    """A new module under service/client/cli (queue, usage, ...) is a command group only once
    build_parser registers it; this test names the commands it adds."""
    from service.client import cli

    folder = Path(cli.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "__main__", "common"}
    assert {group.__name__.rsplit(".", 1)[1] for group in cli.COMMAND_GROUPS} == modules == set(COMMANDS)
    sub = next(a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert list(sub.choices) == [
        name for group in cli.COMMAND_GROUPS for name in COMMANDS[group.__name__.rsplit(".", 1)[1]]
    ]


def _lbgat_commands() -> list[list[str]]:
    script = Path(sys.executable).with_name("lbgat")
    found = [[sys.executable, "-m", "service.client.cli"]]
    return [*found, [str(script)]] if script.exists() else found


@pytest.mark.parametrize("command", _lbgat_commands(), ids=lambda c: Path(c[-1]).name)
def test_lbgat_help_lists_every_command_group(command: list[str], tmp_path: Path):
    proc = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    listed = {
        line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ") and line.split()
    }
    for group, names in COMMANDS.items():
        assert set(names) <= listed, f"`lbgat --help` misses {group}'s {set(names) - listed}:\n{proc.stdout}"
    assert "exit codes: 0 done" in proc.stdout
