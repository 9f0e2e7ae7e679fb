"""The error answers each route documents, declared once: every 4xx/5xx body is an `ErrorDetail`.

Routes say which statuses they can answer (`responses=errors(401, 404, 422)`), so the OpenAPI document
lists each of them with the shared model (`#/components/schemas/ErrorDetail`) and a description that
says when it happens. Declaring 422 here also keeps FastAPI from documenting its own
`HTTPValidationError` (a list), which this service never answers: app.py turns every validation error
into an ErrorDetail with dotted field paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from api_schemas.jobs import ErrorDetail

Responses = dict[int | str, dict[str, Any]]

# When each status happens, as clients should read it; a route may say more for its own case.
DESCRIPTIONS: dict[int, str] = {
    400: "the request cannot be read: a body that is not UTF-8 JSON, or a malformed header",
    401: "missing, unknown or revoked API token (`Authorization: Bearer <token>`)",
    403: "the token's user may not do this (not the owner, or not an admin)",
    404: "no such resource visible to the token's user",
    409: "the request conflicts with the resource's state, or with a concurrent change; try again",
    413: "the body is larger than LBGAT_MAX_SPEC_BYTES",
    415: "the body's Content-Type is not one this operation reads",
    422: "invalid parameters or body, or an undeclared query parameter; `errors` lists each field's "
    "dotted path (`loc`) and message",
    503: "a backend this operation needs (artifact store, Ray) is unreachable; details are in the service log",
}

# The bearer scheme's challenge, sent with every 401 (RFC 6750).
_CHALLENGE = {
    "WWW-Authenticate": {
        "description": "the authentication scheme to use",
        "schema": {"type": "string", "example": 'Bearer realm="lbgat"'},
    }
}


def errors(*codes: int, descriptions: Mapping[int, str] | None = None) -> Responses:
    """`responses=` for a route: each status in `codes` as an ErrorDetail with its standard
    description, or the route's own wording from `descriptions` (which may name only those codes)."""
    descriptions = descriptions or {}
    unknown = set(descriptions) - set(codes)
    if unknown:
        raise ValueError(f"descriptions for statuses the route does not declare: {sorted(unknown)}")
    out: Responses = {}
    for code in codes:
        out[code] = {"model": ErrorDetail, "description": descriptions.get(code, DESCRIPTIONS[code])}
        if code == 401:
            out[code]["headers"] = _CHALLENGE
    return out
