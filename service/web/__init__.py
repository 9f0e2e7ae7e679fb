"""The team's web pages, served by the control plane (service/web/pages.py): `install(app)`.

Imported lazily so that service.api can use service.web.sessions without a cycle."""

from __future__ import annotations

from typing import Any


def install(app: Any) -> None:
    from service.web.pages import install as install_pages

    install_pages(app)


__all__ = ["install"]
