"""Evaluation protocols: the named, versioned suites results are ranked under (api_schemas.protocols)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api_schemas.protocols import Protocol, UnknownProtocol, get_protocol, list_protocols
from service.api.deps import CurrentUser
from service.api.responses import errors
from service.jobs import JobError

router = APIRouter(prefix="/protocols", tags=["protocols"])


@router.get(
    "",
    response_model=list[Protocol],
    summary="Every protocol and version: attacks with their parameters, threat model, split, examples",
    responses=errors(401, 422),
)
def read_protocols(current_user: CurrentUser) -> list[Protocol]:
    return list_protocols()


@router.get(
    "/{protocol_ref}",
    response_model=Protocol,
    summary="One protocol: 'id' (its latest version) or 'id@version'",
    responses=errors(401, 404, 422, descriptions={404: "no such protocol or version"}),
)
def read_protocol(
    protocol_ref: Annotated[
        str, Path(max_length=80, pattern=r"^[^\x00]*$", description="e.g. robustbench-linf or lbgat@1")
    ],
    current_user: CurrentUser,
) -> Protocol:
    try:
        return get_protocol(protocol_ref)
    except UnknownProtocol as exc:
        raise JobError(f"{exc}; `GET /v1/protocols` lists them", status=404) from None
