"""An experiment's artifacts in the store: list, download (streamed), or a presigned S3 link.

Paths are relative to `experiments/<id>/` and checked before the store is asked: no absolute paths,
no empty, '.' or '..' segments, no backslashes or control characters, so no request can read outside
the experiment's prefix (the store checks keys again on its side).
"""

from __future__ import annotations

import mimetypes
from itertools import chain
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import StreamingResponse

from api_schemas.jobs import ArtifactLink, ArtifactOut, ErrorDetail
from service import jobs
from service.api.deps import CurrentUser, SessionDep, SettingsDep, StoreDep
from workers.storage import KeyNotFound, experiment_prefix, validate_key

router = APIRouter(prefix="/experiments", tags=["artifacts"])

CHUNK = 1 << 20
_TYPES = {
    ".jsonl": "application/x-ndjson",
    ".json": "application/json",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".csv": "text/csv",
    ".txt": "text/plain",
    ".log": "text/plain",
    ".png": "image/png",
    ".pt": "application/octet-stream",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "the path is not a clean relative path"},
    401: {"model": ErrorDetail},
    404: {"model": ErrorDetail, "description": "no such experiment in your team, or no such object"},
}


def artifact_key(experiment_id: str, path: str) -> str:
    """The store key of `path` under the experiment's prefix; 400 (naming `path`) unless it is clean."""
    problem = None
    if not path:
        problem = "empty"
    elif path.startswith("/"):
        problem = "must be relative to the experiment (no leading '/')"
    elif "\\" in path:
        problem = "backslashes are not allowed"
    elif any(part in ("", ".", "..") for part in path.split("/")):
        problem = "empty, '.' and '..' segments are not allowed"
    elif any(ord(c) < 32 or ord(c) == 127 for c in path):
        problem = "control characters are not allowed"
    prefix = experiment_prefix(experiment_id)
    key = prefix + path
    if problem is None:
        try:
            validate_key(key)
        except ValueError as exc:
            problem = str(exc)
    if problem is None and not key.startswith(prefix):  # belt and braces: the checks above imply it
        problem = "outside the experiment's artifacts"
    if problem is not None:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"path {path!r}: {problem}")
    return key


def _media_type(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    return _TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def _disposition(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    fallback = name.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


@router.get(
    "/{experiment_id}/artifacts",
    response_model=list[ArtifactOut],
    summary="The experiment's objects in the artifact store (paths relative to experiments/<id>/)",
    responses=_ERRORS,
)
def read_artifacts(
    experiment_id: str, current_user: CurrentUser, session: SessionDep, store: StoreDep
) -> list[ArtifactOut]:
    exp = jobs.get_experiment(session, experiment_id, viewer=current_user)
    session.close()  # the store may be slow: do not hold a database connection meanwhile
    prefix = experiment_prefix(exp.id)
    return [ArtifactOut(path=o.key[len(prefix) :], size=o.size) for o in store.list(prefix)]


@router.get(
    "/{experiment_id}/artifacts/{path:path}",
    response_model=ArtifactLink,
    summary="Download one object (streamed), or with presign=true a time-limited S3 link",
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "the object (or an ArtifactLink as JSON with presign=true)",
        },
        **_ERRORS,
    },
)
def read_artifact(
    experiment_id: str,
    path: str,
    current_user: CurrentUser,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    presign: Annotated[bool, Query(description="answer a presigned URL (S3 stores only)")] = False,
) -> Any:
    exp = jobs.get_experiment(session, experiment_id, viewer=current_user)
    session.close()
    key = artifact_key(exp.id, path)
    if presign:
        try:
            url = store.presigned_get(key, settings.presign_expiry_s)
        except NotImplementedError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"presign: {exc}") from None
        if not store.exists(key):
            raise KeyNotFound(f"no artifact {path!r} in experiment {exp.id}")
        return ArtifactLink(path=path, url=url, expires_in_s=settings.presign_expiry_s)
    chunks = store.iter_chunks(key, CHUNK)  # KeyNotFound here -> 404, before any byte is sent
    first = next(chunks, b"")
    return StreamingResponse(
        chain([first], chunks),
        media_type=_media_type(path),
        headers={"Content-Disposition": _disposition(path)},
    )
