"""The API's contract at its edges (issue 11), against a real server on SQLite and PostgreSQL.

* Integers beyond what the database column holds (PostgreSQL's `integer` is 32-bit) are a 422 naming
  the field, never a driver overflow (a 500, or a stream that dies after its 200).
* Strings PostgreSQL cannot store (a NUL) are a 422 naming the field, on both backends alike.
* The OpenAPI document is true: every referenced schema exists, errors are the ErrorDetail the service
  answers, every status an operation answers is listed (tests/service/test_openapi_fuzz.py checks
  the answers themselves).
* 404/503 answers never show where the artifact store or Ray is (a local path, an internal endpoint).
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from fastapi import HTTPException

from api_schemas.jobs import DB_INT_MAX, JobState
from service.api.deps import get_ray, get_store
from service.api.openapi import dangling_refs
from service.api.routes.artifacts import PATH_PATTERN, artifact_key
from service.api.routes.experiments import RAY_UNAVAILABLE
from service.app import STORE_NOT_FOUND, STORE_UNAVAILABLE
from service.db.engine import run_tx
from service.db.models import Experiment
from service.jobs import transition
from service.ray_jobs import RayUnavailable
from tests.service.conftest import Api, Person, digits_spec, make_settings
from workers.storage import KeyNotFound, LocalStore, StoreError

TOO_LARGE = [DB_INT_MAX + 1, 4294967296, 3_000_000_000, 10**23, 485776436104319988469334016]
ERROR_REF = "#/components/schemas/ErrorDetail"


def submit(person: Person, name: str = "digits") -> str:
    r = person.http.post("/v1/experiments", json={"spec": digits_spec(name)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def move(api: Api, exp_id: str, *path: JobState, **fields: Any) -> None:
    """Through the lifecycle as the scheduler would (checked transitions, recorded events)."""

    def change(session: Any) -> None:
        exp = session.get(Experiment, exp_id)
        for state in path:
            assert transition(session, exp, state, reason="test")
        for key, value in fields.items():
            setattr(exp, key, value)

    run_tx(api.sessions, change)


def error_locs(response: Any) -> list[str]:
    assert response.status_code == 422, (response.status_code, response.text)
    return [e["loc"] for e in response.json()["errors"]]


# -- integers bounded by their columns ---------------------------------------------------------------


def test_token_ids_beyond_the_column_are_422(api: Api) -> None:
    admin = api.admin.http
    for token_id in TOO_LARGE:
        assert error_locs(admin.delete(f"/v1/tokens/{token_id}")) == ["path.token_id"], token_id
    assert error_locs(admin.delete("/v1/tokens/0")) == ["path.token_id"]  # ids start at 1
    r = admin.delete(f"/v1/tokens/{DB_INT_MAX}")  # the largest id a row can have: not found
    assert r.status_code == 404 and r.json()["detail"] == f"token {DB_INT_MAX} not found (or already revoked)"


def test_user_limits_beyond_the_column_are_422(api: Api) -> None:
    admin = api.admin.http

    def create(**fields: Any) -> Any:
        return admin.post("/v1/users", json={"name": f"lim-{secrets.token_hex(4)}", **fields})

    for value in [*TOO_LARGE, -1, True, "3", 2.5]:
        assert error_locs(create(max_running_jobs=value)) == ["body.max_running_jobs"], value
    for value in [False, "1", -0.5]:
        assert error_locs(create(max_gpus=value)) == ["body.max_gpus"], value
    r = admin.post(
        "/v1/users",
        content=b'{"name": "inf-gpus", "max_gpus": Infinity}',  # Python's JSON reader takes it
        headers={"Content-Type": "application/json"},
    )
    assert error_locs(r) == ["body.max_gpus"]
    assert error_locs(create(is_admin=1)) == ["body.is_admin"]
    r = create(max_running_jobs=DB_INT_MAX, max_gpus=1e300)
    assert r.status_code == 201, r.text
    assert (r.json()["user"]["max_running_jobs"], r.json()["user"]["max_gpus"]) == (DB_INT_MAX, 1e300)


def test_event_resume_points_beyond_the_column_are_422(api: Api) -> None:
    ann = api.person()
    exp_id = submit(ann)
    move(api, exp_id, JobState.cancelled)
    events = f"/v1/experiments/{exp_id}/events"
    for value in TOO_LARGE:
        # before: 200, then the stream died in the database driver
        assert error_locs(ann.http.get(events, params={"after": value})) == ["query.after"]
        r = ann.http.get(events, headers={"Last-Event-ID": str(value)})
        assert error_locs(r) == ["header.last-event-id"]
    assert error_locs(ann.http.get(events, headers={"Last-Event-ID": "not-an-id"})) == [
        "header.last-event-id"
    ]
    for params, headers in [({"after": DB_INT_MAX}, {}), ({}, {"Last-Event-ID": str(DB_INT_MAX)})]:
        r = ann.http.get(events, params=params, headers=headers)
        assert r.status_code == 200, r.text
        assert r.text.endswith('event: end\ndata: {"state":"cancelled"}\n\n')  # nothing after the bound


def test_submission_options_beyond_their_bounds_are_422(api: Api) -> None:
    bob = api.person()
    yaml_upload = {"Content-Type": "application/yaml"}
    for name, value in [
        ("priority", 10**23),
        ("priority", 101),
        ("max_attempts", 10**23),
        ("max_attempts", 0),
    ]:
        r = bob.http.post("/v1/experiments", content=b"name: x\n", params={name: value}, headers=yaml_upload)
        assert error_locs(r) == [f"query.{name}"], (name, value)
        r = bob.http.post("/v1/experiments", json={"spec": digits_spec(), name: value})
        assert error_locs(r) == [f"body.{name}"], (name, value)
    for value in [True, "5", 2.0]:  # not integers, whatever a lax reader would make of them
        r = bob.http.post("/v1/experiments", json={"spec": digits_spec(), "priority": value})
        assert error_locs(r) == ["body.priority"], value


# -- strings PostgreSQL cannot store -----------------------------------------------------------------


def test_strings_with_nul_are_422_on_both_backends(api: Api) -> None:
    cid = api.person()
    exp_id = submit(cid)
    http = cid.http
    assert error_locs(http.get("/v1/experiments/a%00b")) == ["path.experiment_id"]
    assert error_locs(http.post("/v1/experiments/a%00b/cancel")) == ["path.experiment_id"]
    assert error_locs(http.get("/v1/experiments/a%00b/artifacts/main/x.json")) == ["path.experiment_id"]
    for name in ["user", "team", "method", "dataset"]:
        assert error_locs(http.get("/v1/experiments", params={name: "a\x00b"})) == [f"query.{name}"]
    assert error_locs(http.get(f"/v1/experiments/{exp_id}/metrics", params={"trial": "\x00"})) == [
        "query.trial"
    ]
    for name in ["dataset", "norm", "method"]:
        r = http.get("/v1/results/leaderboard", params={name: "\x00"})
        assert error_locs(r) == [f"query.{name}"]
    assert error_locs(http.get("/v1/results/compare", params={"ids": [exp_id, "a\x00"]})) == ["query.ids[1]"]
    assert error_locs(http.post("/v1/tokens", json={"label": "a\x00b"})) == ["body.label"]
    assert error_locs(http.post("/v1/tokens", json={"label": "line\nbreak"})) == ["body.label"]
    assert http.get("/v1/experiments/a%01b").status_code == 404  # other characters: just not found


def _cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def test_cursors_not_from_this_service_are_422(api: Api) -> None:
    dan = api.person()
    submit(dan)
    for raw in [
        "2020-01-01|some-id",  # no time zone: the UTC column refused it in the query (500)
        "2020-01-01T00:00:00+00:00|a\x00b",  # a NUL: PostgreSQL refused it (500)
        "0001-01-01T00:00:00+01:00|some-id",  # before the start of time once in UTC
        "not a cursor",
    ]:
        r = dan.http.get("/v1/experiments", params={"cursor": _cursor(raw)})
        assert r.status_code == 422 and r.json()["detail"] == "cursor: not a cursor this service returned", (
            raw
        )
    first = dan.http.get("/v1/experiments", params={"limit": 1, "user": dan.name}).json()
    assert (
        first["next_cursor"] is None
        or dan.http.get("/v1/experiments", params={"cursor": first["next_cursor"]}).status_code == 200
    )


# -- parameters and methods the document does not declare --------------------------------------------


def test_undeclared_query_parameters_are_422(api: Api) -> None:
    eve = api.person()
    r = eve.http.get("/v1/experiments", params={"stat": "running", "user": eve.name})
    assert r.status_code == 422 and r.json()["errors"] == [
        {"loc": "query.stat", "msg": "not a parameter of this operation", "type": "extra_forbidden"}
    ]
    assert error_locs(eve.http.get("/v1/users/me", params={"x": "1"})) == ["query.x"]
    assert eve.http.get("/v1/experiments", params={"state": "running"}).status_code == 200
    assert api.client().get("/healthz", params={"probe": "k8s"}).status_code == 200  # probes stay lenient


def test_405_names_every_method_of_the_path(api: Api) -> None:
    http = api.admin.http
    for method, path, allowed in [
        ("OPTIONS", "/v1/experiments/some-id", "DELETE, GET"),
        ("PUT", "/v1/experiments/some-id", "DELETE, GET"),
        ("PUT", "/v1/users", "GET, POST"),
        ("PATCH", "/v1/experiments", "GET, POST"),
    ]:
        r = http.request(method, path)
        assert r.status_code == 405, (method, path)
        assert r.headers["allow"] == allowed, (method, path)
        assert r.json() == {"detail": "Method Not Allowed", "errors": []}


# -- messages without the store's or Ray's location --------------------------------------------------


class BrokenStore(LocalStore):
    """A store that fails as a remote one does, with messages naming where it is."""

    WHERE = "http://minio.internal:9000/lbgat-artifacts"

    def __init__(self, root: Any, error: type[StoreError]) -> None:
        super().__init__(root)
        self.error = error

    def list(self, prefix: str = "") -> Any:
        raise self.error(f"artifact store {self.WHERE}: list {prefix!r} failed: connection refused")

    def delete_prefix(self, prefix: str) -> int:
        raise self.error(f"artifact store {self.WHERE}: delete {prefix!r} failed: connection refused")


@pytest.fixture
def break_store(api: Api, tmp_path: Any) -> Iterator[Callable[[type[StoreError]], None]]:
    """`break_store(error)` swaps the server's store for one failing with `error`; undone afterwards."""

    def use(error: type[StoreError]) -> None:
        store = BrokenStore(tmp_path / "broken", error)
        api.app.dependency_overrides[get_store] = lambda: store

    try:
        yield use
    finally:
        api.app.dependency_overrides.pop(get_store, None)


def test_store_errors_answer_without_the_store_location(
    api: Api, break_store: Callable[[type[StoreError]], None]
) -> None:
    fay = api.person()
    exp_id = submit(fay)
    move(api, exp_id, JobState.cancelled)
    missing = fay.http.get(f"/v1/experiments/{exp_id}/artifacts/main/missing.pt")
    assert missing.status_code == 404
    assert missing.json()["detail"] == f"no artifact 'main/missing.pt' in experiment {exp_id}"
    presign = fay.http.get(f"/v1/experiments/{exp_id}/artifacts/main/x.json", params={"presign": "true"})
    assert presign.status_code == 400 and "s3://" in presign.json()["detail"]
    root = str(api.store.url).removeprefix("file://")
    for r in (missing, presign):
        assert root not in r.text and "file://" not in r.text

    break_store(StoreError)
    r = fay.http.get(f"/v1/experiments/{exp_id}/artifacts")
    assert r.status_code == 503 and r.json()["detail"] == STORE_UNAVAILABLE
    assert "minio" not in r.text
    r = fay.http.delete(f"/v1/experiments/{exp_id}")  # rows go; the artifacts stay
    assert r.status_code == 503, r.text
    assert r.json()["detail"].startswith(f"experiment {exp_id} was deleted, but the artifact store")
    assert "minio" not in r.text
    assert fay.http.get(f"/v1/experiments/{exp_id}").status_code == 404
    exp_id = submit(fay)
    break_store(KeyNotFound)
    r = fay.http.get(f"/v1/experiments/{exp_id}/artifacts")
    assert r.status_code == 404 and r.json()["detail"] == STORE_NOT_FOUND
    assert "minio" not in r.text


class UnreachableRay:
    """The RayJobs methods the logs route calls, failing as Ray does (naming its address)."""

    address = "http://ray-head.internal:8265"

    def _fail(self, *args: Any) -> Any:
        raise RayUnavailable(f"Ray dashboard at {self.address}: getting logs failed: connection refused")

    logs = check = _fail

    async def tail_logs(self, submission_id: str) -> AsyncIterator[str]:
        self._fail()
        yield ""  # pragma: no cover - never reached


def test_ray_errors_answer_without_the_ray_address(api: Api) -> None:
    gil = api.person()
    exp_id = submit(gil)
    move(api, exp_id, JobState.dispatching, JobState.running, ray_job_id=f"{exp_id}-a1")
    api.app.dependency_overrides[get_ray] = UnreachableRay
    try:
        for follow in ("false", "true"):
            r = gil.http.get(f"/v1/experiments/{exp_id}/logs", params={"follow": follow})
            assert r.status_code == 503 and r.json()["detail"] == RAY_UNAVAILABLE
            assert "ray-head" not in r.text and "8265" not in r.text
    finally:
        api.app.dependency_overrides.pop(get_ray, None)


# -- the OpenAPI document ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    from service.app import create_app

    return create_app(make_settings("sqlite://", max_page_size=77), scheduler=False).openapi()


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


def test_openapi_references_only_schemas_it_defines(document: dict[str, Any]) -> None:
    assert dangling_refs(document) == []
    schemas = document["components"]["schemas"]
    assert {"ExperimentCreate", "ExperimentSpec", "ArtifactLink", "ErrorDetail"} <= set(schemas)
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas  # never answered
    body = document["paths"]["/v1/experiments"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["$ref"] == "#/components/schemas/ExperimentCreate"
    assert body["application/yaml"]["schema"]["$ref"] == "#/components/schemas/ExperimentSpec"
    assert schemas["ExperimentCreate"]["properties"]["spec"]["$ref"] == "#/components/schemas/ExperimentSpec"


def test_openapi_errors_are_error_details(document: dict[str, Any]) -> None:
    for path, method, operation in _operations(document):
        for code, response in operation["responses"].items():
            if int(code) < 400 or path == "/readyz":  # readiness answers its checks, ready or not
                continue
            assert response["content"] == {"application/json": {"schema": {"$ref": ERROR_REF}}}, (
                path,
                method,
                code,
            )
        if path.startswith("/v1/"):
            assert {"401", "422"} <= set(operation["responses"]), (path, method)
            assert operation["security"] == [{"HTTPBearer": []}], (path, method)
    statuses = {(p, m): set(op["responses"]) for p, m, op in _operations(document)}
    assert {"400", "401", "403", "409", "422"} <= statuses[("/v1/users", "post")]
    assert {"400", "401", "422"} <= statuses[("/v1/tokens", "post")]
    assert {"400", "401", "409", "413", "415", "422"} <= statuses[("/v1/experiments", "post")]
    assert {"401", "403", "404", "409", "422", "503"} <= statuses[
        ("/v1/experiments/{experiment_id}", "delete")
    ]
    assert {"401", "404", "422", "503"} <= statuses[("/v1/experiments/{experiment_id}/logs", "get")]
    assert {"401", "404", "503"} <= statuses[("/v1/experiments/{experiment_id}/artifacts", "get")]
    logs = document["paths"]["/v1/experiments/{experiment_id}/logs"]["get"]["responses"]
    assert set(logs["200"]["content"]) == {"text/plain"}


def test_openapi_integers_are_bounded_by_their_columns(document: dict[str, Any]) -> None:
    """Every integer a client sends in a path, query, header or request body (ExperimentSpec aside:
    its fields have their own bounds) has a maximum the database column holds."""
    found = 0
    for path, method, operation in _operations(document):
        for parameter in operation.get("parameters", []):
            schema = parameter["schema"]
            if schema.get("type") == "integer":
                found += 1
                assert 0 < schema["maximum"] <= DB_INT_MAX, (path, method, parameter["name"])
    for model in ("ExperimentCreate", "UserCreate", "TokenCreate"):
        for name, prop in document["components"]["schemas"][model]["properties"].items():
            for branch in prop.get("anyOf", [prop]):
                if branch.get("type") == "integer":
                    found += 1
                    assert 0 < branch["maximum"] <= DB_INT_MAX, (model, name)
    assert found >= 8
    limit = next(p for p in document["paths"]["/v1/experiments"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == 77  # this deployment's LBGAT_MAX_PAGE_SIZE


def test_openapi_optional_parameters_are_absent_not_null(document: dict[str, Any]) -> None:
    for path, method, operation in _operations(document):
        for parameter in operation.get("parameters", []):
            assert "null" not in str(parameter["schema"]), (path, method, parameter["name"])


@pytest.mark.parametrize(
    ("path", "clean"),
    [
        ("main/summary.json", True),
        ("main/checkpoints/last.pt", True),
        ("a b/c,d=e@f.txt", True),
        ("caf\u00e9/\u00fc.png", True),
        ("...", True),
        ("", False),
        ("/etc/passwd", False),
        ("main//x", False),
        ("main/", False),
        ("./x", False),
        ("x/..", False),
        ("x/../y", False),
        ("back\\slash", False),
        ("tab\there", False),
        ("nul\x00", False),
        ("del\x7f", False),
        ("main/x.lbgat-tmp", False),
        ("main/x.lbgat-tmp/y", False),
    ],
)
def test_artifact_path_pattern_states_the_checks(path: str, clean: bool) -> None:
    documented = re.search(PATH_PATTERN, path) is not None
    try:
        artifact_key("exp-1", path)
        checked = True
    except HTTPException:
        checked = False
    assert (documented, checked) == (clean, clean)
