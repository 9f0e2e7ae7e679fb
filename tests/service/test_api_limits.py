"""Submission limits (issue 11): YAML alias bombs, specs too large to store, numbers that could not
run, tags and Idempotency-Key headers. Every refusal names where, and stores nothing.

Against a real server and both databases, like tests/service/test_api.py.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from sqlalchemy import func, select

from service.db.models import Experiment, User
from tests.service.conftest import Api, Person, digits_spec

YAML = {"Content-Type": "application/yaml"}


def stored(api: Api, person: Person) -> int:
    with api.sessions() as session:
        query = (
            select(func.count())
            .select_from(Experiment)
            .join(User, Experiment.owner_id == User.id)
            .where(User.name == person.name)
        )
        return session.scalar(query)


def sweep_yaml(values_yaml: str) -> str:
    """The digits spec with a grid sweep over method.alpha whose `values` are the given YAML block."""
    spec = digits_spec("limits")
    spec["dataset"]["val_size"] = 100
    text = yaml.safe_dump(spec, sort_keys=False)
    return text + "sweep:\n  parameters:\n    method.alpha:\n      kind: grid\n      values:\n" + values_yaml


def test_yaml_alias_bomb_is_413_with_the_path_and_nothing_is_stored(api: Api) -> None:
    amy = api.person()
    # The body: 7 levels of 10 nested anchors, about 1.3 KB, 10**7 values once expanded.
    levels = ["        - &a0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"        - &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    body = sweep_yaml("\n".join(levels) + "\n")
    assert len(body) < api.settings.max_spec_bytes

    started = time.perf_counter()
    r = amy.http.post("/v1/experiments", content=body, headers=YAML)
    assert time.perf_counter() - started < 5
    assert r.status_code == 413, r.text
    (error,) = r.json()["errors"]
    assert error["loc"] == "sweep.parameters.method.alpha.values[4][0]"  # where the count passed
    assert "expands to more than 20000 nodes" in error["msg"]
    assert r.json()["detail"].startswith("spec too large: sweep.parameters.method.alpha.values[4][0]: ")
    assert stored(api, amy) == 0


@pytest.mark.parametrize(
    ("values", "loc", "message"),
    [
        ("        - " + "[" * 40 + "]" * 40 + "\n", "values[0]" + "[0]" * 27, "nested deeper than 32 levels"),
        (
            "        - &s 1\n" + "".join("        - *s\n" for _ in range(101)),
            "values[101]",
            "more than 100 aliases",
        ),
        ("        - &r [1, *r]\n", "values[0][1]", "refers to a node that contains it"),
    ],
    ids=["depth", "aliases", "recursive"],
)
def test_yaml_past_the_loader_bounds_is_422_with_the_path(
    api: Api, values: str, loc: str, message: str
) -> None:
    bo = api.person()
    r = bo.http.post("/v1/experiments", content=sweep_yaml(values), headers=YAML)
    assert r.status_code == 422, r.text
    (error,) = r.json()["errors"]
    assert error["loc"] == f"sweep.parameters.method.alpha.{loc}"
    assert message in error["msg"]
    assert stored(api, bo) == 0


def test_yaml_anchors_within_bounds_are_fine(api: Api) -> None:
    cy = api.person()
    r = cy.http.post(
        "/v1/experiments", content=sweep_yaml("        - &one 1.0\n        - *one\n"), headers=YAML
    )
    assert r.status_code == 201, r.text
    assert cy.http.get(f"/v1/experiments/{r.json()['id']}").json()["spec"]["sweep"]["parameters"][
        "method.alpha"
    ]["values"] == [1.0, 1.0]


def test_a_spec_too_large_to_store_is_413_and_nothing_is_stored(make_api) -> None:
    limit = 256 * 1024
    api = make_api(max_stored_spec_bytes=limit)
    dee = api.person()
    # 30 copies of one list of 64 strings of 250 characters: a 2 KB body within every loader bound
    # (92 aliases, about 2,000 nodes once expanded) that stores as about 480 KB
    values = "        - &l [" + ", ".join(["&s " + "y" * 250] + ["*s"] * 63) + "]\n"
    values += "        - *l\n" * 29
    body = sweep_yaml(values)
    assert len(body) < 4096

    r = dee.http.post("/v1/experiments", content=body, headers=YAML)
    assert r.status_code == 413, r.text
    (error,) = r.json()["errors"]
    assert error["loc"] == "sweep"
    assert f"over LBGAT_MAX_STORED_SPEC_BYTES ({limit})" in error["msg"]
    assert stored(api, dee) == 0

    # a tenth of it is stored, and its stored size is what was measured
    small = "        - &l [" + ", ".join(["&s " + "y" * 250] + ["*s"] * 63) + "]\n" + "        - *l\n" * 2
    r = dee.http.post("/v1/experiments", content=sweep_yaml(small), headers=YAML)
    assert r.status_code == 201, r.text
    with api.sessions() as session:
        spec = session.get(Experiment, r.json()["id"]).spec
    assert 40_000 < len(json.dumps(spec)) <= limit
    assert stored(api, dee) == 1


# -- numbers that could not run ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "largest"),
    [
        (("seed",), 2**70, 2**32 - 1),
        (("runtime", "cpu_threads"), 1_000_000, 1024),
        (("evaluation", "batch_size"), 10**12, 65_536),
        (("optimization", "epochs"), 2**63, 10_000),
    ],
)
@pytest.mark.parametrize("as_yaml", [False, True], ids=["json", "yaml"])
def test_numbers_past_their_bounds_are_422_with_the_field_path(
    api: Api, path: tuple[str, ...], value: int, largest: int, as_yaml: bool
) -> None:
    eve = api.person()
    spec: dict[str, Any] = digits_spec("bounds")
    node = spec
    for section in path[:-1]:
        node = node.setdefault(section, {})
    node[path[-1]] = value
    if as_yaml:
        r = eve.http.post("/v1/experiments", content=yaml.safe_dump(spec), headers=YAML)
    else:
        r = eve.http.post("/v1/experiments", json={"spec": spec})
    assert r.status_code == 422, r.text
    assert r.json()["errors"] == [
        {"loc": ".".join(path), "msg": f"Input should be less than or equal to {largest}"}
    ]
    assert stored(api, eve) == 0


def test_infinite_floats_are_422(api: Api) -> None:
    fay = api.person()
    spec = digits_spec("inf")
    spec["optimization"]["lr"] = float("inf")
    body = json.dumps({"spec": spec})  # Python writes Infinity, which the service's json.loads reads
    assert "Infinity" in body
    r = fay.http.post("/v1/experiments", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["errors"] == [{"loc": "optimization.lr", "msg": "Input should be a finite number"}]
    r = fay.http.post("/v1/experiments", content=sweep_yaml("        - .nan\n"), headers=YAML)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == "sweep.parameters.method.alpha.values[0]"
    assert stored(api, fay) == 0


# -- tags and Idempotency-Key ------------------------------------------------------------------------


def test_tags_are_bounded(api: Api) -> None:
    gus = api.person()
    spec = digits_spec("tags")
    r = gus.http.post("/v1/experiments", json={"spec": spec, "tags": ["ok", "x" * 10_000]})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["errors"]] == ["body.tags[1]"]

    r = gus.http.post("/v1/experiments", json={"spec": spec, "tags": [""] * 16})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["errors"]] == [f"body.tags[{i}]" for i in range(16)]

    r = gus.http.post(
        "/v1/experiments", content=yaml.safe_dump(spec), params={"tags": ["ok", "has space"]}, headers=YAML
    )
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["errors"]] == ["query.tags[1]"]
    assert stored(api, gus) == 0

    r = gus.http.post("/v1/experiments", json={"spec": spec, "tags": ["paper", "lr=0.1", "t" * 64]})
    assert r.status_code == 201, r.text
    assert r.json()["tags"] == ["paper", "lr=0.1", "t" * 64]


def _post_raw_key(api: Api, token: str, key: bytes) -> tuple[int, dict[str, Any]]:
    """POST with an Idempotency-Key of raw bytes, which httpx (rightly) would not send."""
    url = urlsplit(api.url)
    body = json.dumps({"spec": digits_spec("raw-key")}).encode()
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/experiments", skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Idempotency-Key", key)
        conn.endheaders(body)
        response = conn.getresponse()
        text = response.read()
        is_json = response.getheader("Content-Type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else {"text": text.decode("latin-1")}
    finally:
        conn.close()


def test_idempotency_keys_are_printable_ascii(api: Api) -> None:
    hal = api.person()
    spec = digits_spec("key")
    for key in ["a\tb", "x\ty z"]:
        r = hal.http.post("/v1/experiments", json={"spec": spec}, headers={"Idempotency-Key": key})
        assert r.status_code == 422, (key, r.text)
        (error,) = r.json()["errors"]
        assert error["loc"] == "header.idempotency-key"
        assert "printable ASCII" in error["msg"]

    for raw in [b"caf\xc3\xa9", b"caf\xe9"]:  # UTF-8 and Latin-1 bytes: Starlette reads them as Latin-1
        status, body = _post_raw_key(api, hal.token, raw)
        assert status == 422, (raw, body)
        assert [e["loc"] for e in body["errors"]] == ["header.idempotency-key"], body
    for raw in [b"a\x01b", b"a\x7fb"]:
        status, body = _post_raw_key(api, hal.token, raw)
        # uvicorn's HTTP parser refuses most control characters itself (400, before the app); any
        # that gets through is refused naming the header
        assert status in (400, 422), (raw, status, body)
        if status == 422:
            assert [e["loc"] for e in body["errors"]] == ["header.idempotency-key"], body
    assert stored(api, hal) == 0

    key = "release 2026-05 #1: lr=0.1 (retry ok) ~"
    first = hal.http.post("/v1/experiments", json={"spec": spec}, headers={"Idempotency-Key": key})
    again = hal.http.post("/v1/experiments", json={"spec": spec}, headers={"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (201, 200), first.text
    assert stored(api, hal) == 1


def test_openapi_documents_the_new_limits(api: Api) -> None:
    doc = httpx.get(f"{api.url}/openapi.json").json()
    create = doc["paths"]["/v1/experiments"]["post"]
    assert "LBGAT_MAX_STORED_SPEC_BYTES" in create["responses"]["413"]["description"]
    header = next(p for p in create["parameters"] if p["name"] == "idempotency-key")
    assert "printable ASCII" in header["description"]
