"""An experiment's artifacts in the store: list, download (streamed), or a presigned S3 link.

Paths are relative to `experiments/<id>/` and checked before the store is asked: no absolute paths,
no empty, '.' or '..' segments, no backslashes or control characters, so no request can read outside
the experiment's prefix (the store checks keys again on its side).
"""

from __future__ import annotations

import logging
import mimetypes
from itertools import chain
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Query, status
from fastapi.responses import StreamingResponse

from api_schemas.jobs import ArtifactLink, ArtifactOut
from service import jobs
from service.api.deps import CurrentUser, ExperimentId, SessionDep, SettingsDep, StoreDep
from service.api.responses import Responses, errors
from workers.storage import KeyNotFound, experiment_prefix, validate_key

log = logging.getLogger("service.api")

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
_ERRORS: Responses = errors(
    401,
    404,
    422,
    503,
    descriptions={
        404: "no such experiment in your team, or no such object",
        503: "the artifact store is unreachable (the service log says where and why)",
    },
)


# The rules `artifact_key` checks, as the pattern the OpenAPI document gives clients (ECMA-262 syntax):
# not absolute, no empty, '.' or '..' segment, no reserved '.lbgat-tmp' name, no backslash or control
# character. Violations answer 400 naming the path (tests check both agree).
PATH_PATTERN = (
    r"^(?!/)(?!.*//)(?!.*/$)(?!(?:.*/)?\.\.?(?:/|$))(?!(?:.*/)?[^/]*\.lbgat-tmp(?:/|$))"
    r"[^\x00-\x1f\x7f\\]+$"
)


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


def _no_artifact(path: str, experiment_id: str) -> HTTPException:
    """The 404 of a missing object: it names the artifact, never the store's location."""
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no artifact {path!r} in experiment {experiment_id}")


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
    experiment_id: ExperimentId, current_user: CurrentUser, session: SessionDep, store: StoreDep
) -> list[ArtifactOut]:
    exp = jobs.get_experiment(session, experiment_id, viewer=current_user)
    session.close()  # the store may be slow: do not hold a database connection meanwhile
    prefix = experiment_prefix(exp.id)
    return [ArtifactOut(path=o.key[len(prefix) :], size=o.size) for o in store.list(prefix)]


@router.get(
    "/{experiment_id}/artifacts/{path:path}",
    # No response_model: a download of a JSON artifact is application/json too, so the 200's JSON
    # is an ArtifactLink (presign=true) or the stored document; both are declared below.
    response_model=None,
    summary="Download one object (streamed), or with presign=true a time-limited S3 link",
    responses={
        200: {
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": "#/components/schemas/ArtifactLink"},
                            {"description": "a JSON artifact, as stored"},
                        ]
                    }
                },
                # any other object: its type as guessed from its name
                "*/*": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "the object, streamed; with presign=true an ArtifactLink",
        },
        **_ERRORS,
        **errors(
            400,
            descriptions={400: "the path is not a clean relative path, or presign=true on a local store"},
        ),
    },
)
def read_artifact(
    experiment_id: ExperimentId,
    path: Annotated[
        str,
        Path(
            description="relative to the experiment's prefix, e.g. main/summary.json",
            json_schema_extra={"pattern": PATH_PATTERN},  # documented only: violations answer 400
        ),
    ],
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
            log.info("presign %s of %s: %s", path, exp.id, exc)  # the message names the store's location
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, "presign: only an s3:// artifact store can make presigned URLs"
            ) from None
        if not store.exists(key):
            raise _no_artifact(path, exp.id)
        return ArtifactLink(path=path, url=url, expires_in_s=settings.presign_expiry_s)
    try:  # a missing object raises here, before any byte is sent
        chunks = store.iter_chunks(key, CHUNK)
        first = next(chunks, b"")
    except KeyNotFound as exc:
        log.info("artifact %s of %s: %s", path, exp.id, exc)  # the store's message names its location
        raise _no_artifact(path, exp.id) from None
    return StreamingResponse(
        chain([first], chunks),
        media_type=_media_type(path),
        headers={"Content-Disposition": _disposition(path)},
    )
