"""Checkpoint uploads: the raw file as the body, checked without torch, stored once by its sha256.

The body streams to a temporary file while it is hashed and counted: past LBGAT_MAX_UPLOAD_BYTES it
is refused with 413 (by its Content-Length before anything is read, else as the bytes arrive), so no
upload is held in memory. The file is then inspected by service.checkpoint_inspect (a restricted
unpickler: nothing in it runs) and refused with 422 unless it is a checkpoint of this project or a
plain state dict that fits the dataset; only then is it stored at `checkpoints/<sha256>.pt` and
recorded for the uploader's team.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api_schemas.evaluations import CheckpointOut
from api_schemas.spec import DatasetName, ModelName
from service import checkpoints
from service.api.deps import CurrentUser, SessionDep, SessionsDep, SettingsDep, StoreDep
from service.api.responses import errors
from service.checkpoint_inspect import CheckpointRefused, inspect_checkpoint
from service.db.engine import run_tx
from service.evaluations import Invalid

log = logging.getLogger("service.api")

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])

UPLOAD_TYPES = frozenset({"application/octet-stream"})
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "a torch.save file: a checkpoint of this project, or a plain state dict",
                }
            }
        },
    }
}


async def _receive(request: Request, limit: int) -> tuple[Path, str, int]:
    """Stream the body to a temporary file: (path, sha256, size); 413 past `limit` bytes."""
    too_large = HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"checkpoint larger than {limit} bytes (LBGAT_MAX_UPLOAD_BYTES); nothing was stored",
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "Content-Length: not a number of bytes")
        if int(declared) > limit:
            raise too_large
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(prefix="lbgat-upload-", suffix=".pt")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                digest.update(chunk)
                handle.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size


@router.post(
    "",
    response_model=CheckpointOut,
    status_code=status.HTTP_201_CREATED,
    summary="Upload a checkpoint (raw body): checked without running it, stored once by its sha256",
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": CheckpointOut, "description": "your team had uploaded this file already"},
        **errors(
            400,
            401,
            413,
            415,
            422,
            503,
            descriptions={
                400: "Content-Length is not a number of bytes",
                413: "body larger than LBGAT_MAX_UPLOAD_BYTES",
                415: "not application/octet-stream",
                422: "not a checkpoint that may be stored: not torch's zip format, an archive past the size "
                "limit, a pickle that calls anything but tensor rebuilding, a classifier whose classes or "
                "input channels do not fit the dataset, or a plain state dict without model/dataset",
                503: "the artifact store did not answer",
            },
        ),
    },
)
async def create_checkpoint(
    request: Request,
    current_user: CurrentUser,
    sessions: SessionsDep,
    settings: SettingsDep,
    store: StoreDep,
    response: Response,
    model: Annotated[
        ModelName | None, Query(description="the architecture of a plain state dict (ours say it)")
    ] = None,
    dataset: Annotated[
        DatasetName | None, Query(description="the dataset of a plain state dict (ours say it)")
    ] = None,
    name: Annotated[
        str | None, Query(max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$", description="a label for reports")
    ] = None,
) -> CheckpointOut:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in UPLOAD_TYPES:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {content_type!r}: send the file as application/octet-stream",
        )
    path, sha256, size = await _receive(request, settings.max_upload_bytes)
    try:
        if size == 0:
            raise Invalid(("body",), "empty: send the checkpoint file as the body")
        try:
            info = await run_in_threadpool(
                inspect_checkpoint, path, max_unpacked_bytes=settings.max_upload_bytes
            )
        except CheckpointRefused as exc:
            log.info("upload by %s refused: %s", current_user.name, exc)
            raise Invalid(("body",), f"not a checkpoint that can be stored: {exc}") from None
        described = checkpoints.describe(info, model=model, dataset=dataset)
        key = checkpoints.checkpoint_key(sha256)

        def put() -> bool:
            if store.exists(key):
                return False
            store.put_file(key, path)
            return True

        stored = await run_in_threadpool(put)
    finally:
        path.unlink(missing_ok=True)

    def save(session: Session) -> tuple[CheckpointOut, bool]:
        row, created = checkpoints.record(
            session, owner=current_user, sha256=sha256, size=size, described=described, name=name
        )
        return checkpoints.to_out(row, stored=stored), created

    try:
        out, created = await run_in_threadpool(run_tx, sessions, save)
    except IntegrityError:  # the same file from the same team at the same moment: the other row won
        out, created = await run_in_threadpool(run_tx, sessions, save)
    if not created:
        response.status_code = status.HTTP_200_OK
    log.info("checkpoint %s (%d bytes) uploaded by %s", sha256, size, current_user.name)
    return out


@router.get(
    "",
    response_model=list[CheckpointOut],
    summary="Your team's uploaded checkpoints, newest first",
    responses=errors(401, 422),
)
def read_checkpoints(
    current_user: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[CheckpointOut]:
    rows = checkpoints.list_checkpoints(session, viewer=current_user, limit=limit)
    return [checkpoints.to_out(row, stored=False) for row in rows]
