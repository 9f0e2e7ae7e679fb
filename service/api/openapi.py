"""The OpenAPI document, made true where FastAPI's generator cannot see what the routes do.

FastAPI documents what it validates itself; what it cannot see is added here:

* Schemas only referenced by hand-written parts of the document: the submit routes read their bodies
  themselves (within the body limit) and declare them with `openapi_extra` as
  `#/components/schemas/ExperimentCreate` (JSON or YAML), `EvaluationCreate` and `BulkEvaluation`;
  the artifact download declares `ArtifactLink` next to the raw object. Their models are added to
  `components` here (`EXTRA_SCHEMAS`).
* What a submitted spec must be: the model types it as a plain object (the route validates it
  itself, to answer the spec's own field paths), but what is accepted is an `ExperimentSpec`, so
  the document says that, for the JSON body's `spec` and for a YAML upload. Rules across fields
  (a teacher for LBGAT, a step no larger than the radius, ...) are checked too and have no JSON
  Schema; they answer 422 naming the fields.
* Bounds that come from settings: `GET /v1/experiments?limit=` and `GET /v1/evaluations?limit=` are at
  most `max_page_size` of this deployment (the routes check it), so the document says so.
* That an optional parameter is absent, never null: FastAPI writes `anyOf: [T, {type: null}]` for
  `T | None = None`, but a query string or header has no null (`?after=null` is the string "null",
  a 422), so the null branch is dropped from parameters (bodies keep theirs: JSON has null).
* That a discriminated union's tag is required: pydantic gives a tag such as a method's `name` a
  default, so its schema does not list it as required, but the union cannot pick a branch without it
  (a spec without `method.name` is refused), so each branch of such a union requires its tag here.
* That the operations take no other query parameters than the declared ones:
  `reject_undeclared_query` (a dependency of every /v1 route) refuses others with a 422.
* That every `$ref` resolves: a dangling one makes generated clients and fuzzers unable to build a
  request, so building the document fails instead (tests build it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from api_schemas import ExperimentSpec
from api_schemas.evaluations import BulkEvaluation, EvaluationCreate
from api_schemas.jobs import ArtifactLink, ExperimentCreate
from service.metrics import route_template
from service.settings import ServiceSettings

REF_PREFIX = "#/components/schemas/"
EXTRA_SCHEMAS: tuple[type[BaseModel], ...] = (
    ExperimentCreate,
    ArtifactLink,
    ExperimentSpec,
    EvaluationCreate,
    BulkEvaluation,
)
# list operations whose `limit` is bounded by the deployment's max_page_size
PAGED = ("/v1/experiments", "/v1/evaluations")
SUBMIT = ("/v1/experiments", "post")


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every object of a JSON document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def dangling_refs(document: dict[str, Any]) -> list[str]:
    """`$ref`s of the document that name no schema of its `components`."""
    schemas = document.get("components", {}).get("schemas", {})
    refs = {node["$ref"] for node in _walk(document) if isinstance(node.get("$ref"), str)}
    return sorted(
        r for r in refs if not r.startswith(REF_PREFIX) or r.removeprefix(REF_PREFIX) not in schemas
    )


def _canonical(node: Any) -> Any:
    """A schema as far as it constrains data: FastAPI's generator leaves out `default: null` and writes
    integral bounds as floats (1.0) where pydantic's writes them as integers, for the same model."""
    if isinstance(node, dict):
        return {k: _canonical(v) for k, v in node.items() if not (k == "default" and v is None)}
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    if isinstance(node, float) and node.is_integer():
        return int(node)
    return node


def _add_schemas(document: dict[str, Any], models: tuple[type[BaseModel], ...]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        schema = model.model_json_schema(ref_template=REF_PREFIX + "{model}")
        for name, definition in [*schema.pop("$defs", {}).items(), (model.__name__, schema)]:
            if _canonical(schemas.setdefault(name, definition)) != _canonical(definition):
                raise RuntimeError(f"two different schemas are named {name!r} in the OpenAPI document")


def _typed_spec(document: dict[str, Any]) -> None:
    spec_ref = {"$ref": REF_PREFIX + ExperimentSpec.__name__}
    create = document["components"]["schemas"][ExperimentCreate.__name__]
    create["properties"]["spec"] = {
        **spec_ref,
        "description": create["properties"]["spec"].get("description"),
    }
    path, method = SUBMIT
    content = document["paths"][path][method]["requestBody"]["content"]
    content["application/yaml"]["schema"] = {**spec_ref, "description": "an ExperimentSpec as a YAML file"}


def _tags_required(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for node in list(_walk(document)):
        discriminator = node.get("discriminator")
        if not isinstance(discriminator, dict):
            continue
        tag = discriminator["propertyName"]
        refs = {
            *discriminator.get("mapping", {}).values(),
            *(b["$ref"] for b in node.get("oneOf", []) if "$ref" in b),
        }
        for ref in refs:
            branch = schemas[ref.removeprefix(REF_PREFIX)]
            if tag in branch.get("properties", {}) and tag not in branch.get("required", []):
                branch["required"] = [*branch.get("required", []), tag]


def _absent_not_null(document: dict[str, Any]) -> None:
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                schema = parameter["schema"]
                branches = [b for b in schema.get("anyOf", []) if b.get("type") != "null"]
                if len(branches) == len(schema.get("anyOf", [])):
                    continue
                del schema["anyOf"]
                if len(branches) == 1:
                    schema.update(branches[0])
                else:
                    schema["anyOf"] = branches


def _bound_page_size(document: dict[str, Any], max_page_size: int) -> None:
    for path in PAGED:
        operation = document["paths"][path]["get"]
        for parameter in operation["parameters"]:
            if parameter["in"] == "query" and parameter["name"] == "limit":
                parameter["schema"]["maximum"] = max_page_size


def build_openapi(app: FastAPI, settings: ServiceSettings) -> dict[str, Any]:
    """The document `app.openapi()` serves (built once, then cached on the app as FastAPI does)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        openapi_version=app.openapi_version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    _add_schemas(document, EXTRA_SCHEMAS)
    _typed_spec(document)
    _tags_required(document)
    _absent_not_null(document)
    _bound_page_size(document, settings.max_page_size)
    missing = dangling_refs(document)
    if missing:
        raise RuntimeError(f"the OpenAPI document refers to schemas it does not define: {missing}")
    app.openapi_schema = document
    return document


def reject_undeclared_query(request: Request) -> None:
    """A dependency of every /v1 route: a query parameter the document does not declare for the operation
    is a 422 naming it, as an unknown field of a body is. Silently ignoring it would turn a typo
    (`?stat=running`) into an answer to another question (every experiment)."""
    if not request.query_params:
        return
    operations = request.app.openapi()["paths"].get(route_template(request.scope), {})
    operation = operations.get(request.method.lower())
    if operation is None:
        return
    declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
    unknown = sorted(set(request.query_params) - declared)
    if unknown:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": "not a parameter of this operation",
                    "type": "extra_forbidden",
                }
                for name in unknown
            ]
        )
