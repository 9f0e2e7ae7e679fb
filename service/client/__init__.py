"""The control plane's client side: the Python SDK (`sdk`), where API tokens are kept (`credentials`)
and the `lbgat` command (`cli`).

    from service.client import Client, ApiError

Nothing in this package imports the server (FastAPI, SQLAlchemy, uvicorn, Ray, `service.app`,
`service.db`, `service.scheduler`) or torch at import time; `lbgat serve` and the local training
commands import theirs when they run. The SDK's names are re-exported from here on first use, so
`import service.client.cli` (every `lbgat` start) does not pay for httpx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.client.sdk import ApiError, Client, ClientError, ServiceUnreachable

__all__ = ["ApiError", "Client", "ClientError", "ServiceUnreachable"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("service.client.sdk"), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
