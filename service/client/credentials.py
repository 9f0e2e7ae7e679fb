"""Where `lbgat login` keeps API tokens: one JSON file, readable by its owner only.

    $LBGAT_CONFIG_DIR/credentials.json   (default ~/.config/lbgat, or $XDG_CONFIG_HOME/lbgat)
    $LBGAT_STATE_DIR/credentials.json    (default ./.lbgat: the admin `lbgat serve` bootstrapped)

    {"default_url": "http://127.0.0.1:8000",
     "servers": {"http://127.0.0.1:8000": {"token": "lbg_...", "user": "alice"}}}

Tokens are keyed by the server URL, so one person can be logged in to several services; the URL of
the last login is the default for later commands. The file is written atomically with mode 0600 (its
folder 0700) and never printed. Only `lbgat login` writes the user's file; `lbgat serve` keeps the
admin it creates in its own state directory, which the CLI reads as a fallback when run from the
same folder (and only when LBGAT_CONFIG_DIR is unset, so a chosen config folder is all there is). Only the standard library here: the CLI imports it at start.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
FILE_NAME = "credentials.json"


class CredentialsError(RuntimeError):
    """The credentials file exists but cannot be read."""


def normalize_url(url: str) -> str:
    """`host:port` or `http://host:port/` -> `http://host:port` (the key of the credentials file)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def config_dir() -> Path:
    if os.environ.get("LBGAT_CONFIG_DIR"):
        return Path(os.environ["LBGAT_CONFIG_DIR"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "lbgat"


def state_dir() -> Path:
    """The local installation's state directory (LBGAT_STATE_DIR, default ./.lbgat)."""
    return Path(os.environ.get("LBGAT_STATE_DIR") or ".lbgat").expanduser()


def credentials_path() -> Path:
    return config_dir() / FILE_NAME


def _sources() -> list[dict[str, Any]]:
    """The user's credentials, then (without LBGAT_CONFIG_DIR) the local `lbgat serve`'s."""
    found = [load()]
    if not os.environ.get("LBGAT_CONFIG_DIR"):
        found.append(load(state_dir()))
    return found


def load(folder: Path | None = None) -> dict[str, Any]:
    """The credentials file's content; empty when there is none or it cannot be read as JSON."""
    path = (folder / FILE_NAME) if folder is not None else credentials_path()
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}; delete it and run `lbgat login` again") from None
    return data if isinstance(data, dict) else {}


def default_url() -> str:
    """LBGAT_API_URL, else the server of the last `lbgat login`, else http://127.0.0.1:8000."""
    if os.environ.get("LBGAT_API_URL"):
        return normalize_url(os.environ["LBGAT_API_URL"])
    for data in _sources():
        stored = data.get("default_url")
        if isinstance(stored, str) and stored:
            return normalize_url(stored)
    return DEFAULT_URL


def stored_token(url: str) -> str | None:
    for data in _sources():
        servers = data.get("servers")
        entry = servers.get(normalize_url(url)) if isinstance(servers, dict) else None
        token = entry.get("token") if isinstance(entry, dict) else None
        if isinstance(token, str) and token:
            return token
    return None


def save(url: str, token: str, *, user: str | None = None, folder: Path | None = None) -> Path:
    """Store `token` for `url` and make `url` the default, in the user's config folder or in `folder`;
    returns the file's path."""
    url = normalize_url(url)
    data = load(folder)
    servers = data.get("servers") if isinstance(data.get("servers"), dict) else {}
    servers[url] = {"token": token, "user": user}
    return _write({**data, "default_url": url, "servers": servers}, folder)


def _write(data: dict[str, Any], folder: Path | None = None) -> Path:
    folder = folder if folder is not None else config_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / FILE_NAME
    # Write a 0600 temporary file next to it and rename: the token is never readable by others,
    # not even for a moment, and a crash leaves the old file whole.
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=folder)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def forget(url: str) -> bool:
    """Remove the token stored for `url`; True if there was one."""
    url = normalize_url(url)
    data = load()
    servers = data.get("servers") if isinstance(data.get("servers"), dict) else {}
    entry = servers.pop(url, None)
    if entry is None:
        return False
    if data.get("default_url") == url:
        data.pop("default_url")
    data["servers"] = servers
    _write(data)
    return True
