"""The team's pages (service/web) over real sockets, read as a browser without JavaScript would: the
HTML itself must hold each page's content. Sign-in sessions (cookie flags, revocation on sign-out),
CSRF refusals, and the API's team rules on every page, stream and form."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from api_schemas.jobs import JobState
from service.db.engine import run_tx
from service.db.models import ApiToken, Event, Experiment, Trial
from service.web.sessions import SESSION_COOKIE, SESSION_LABEL, SIGNIN_COOKIE
from tests.service.conftest import Api, Person, digits_spec
from tests.service.evaluations_helpers import evaluate, finish_evaluation, job_spec, trained
from tests.service.test_api import set_state

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Browser:
    """An HTTP client that keeps cookies and reads forms, as a browser with JavaScript off."""

    def __init__(self, api: Api, **headers: str) -> None:
        self.http = api.client(**headers)
        self.http.follow_redirects = False

    def csrf(self, html: str) -> str:
        found = CSRF.search(html)
        assert found, "the page has no form with a CSRF token"
        return found.group(1)

    def sign_in(self, token: str, next_path: str = "/queue") -> httpx.Response:
        page = self.http.get("/")
        assert page.status_code == 200 and "Sign in" in page.text
        return self.http.post(
            "/sign-in", data={"token": token, "csrf": self.csrf(page.text), "next": next_path}
        )

    def page(self, path: str, **params: Any) -> httpx.Response:
        r = self.http.get(path, params=params or None)
        assert r.status_code == 200, (path, r.status_code, r.text[:500])
        assert r.headers["content-type"].startswith("text/html")
        return r


def signed_in(api: Api, person: Person) -> Browser:
    browser = Browser(api)
    r = browser.sign_in(person.token)
    assert r.status_code == 303 and r.headers["location"] == "/queue", r.text
    return browser


def submit(person: Person, name: str, **extra: Any) -> dict[str, Any]:
    r = person.http.post("/v1/experiments", json={"spec": digits_spec(name), **extra})
    assert r.status_code == 201, r.text
    return r.json()


def finish(api: Api, exp_id: str, *, clean: float, attacks: dict[str, float], aa: float | None) -> None:
    robust = min(attacks.values())
    nrr = 2 * clean * robust / (clean + robust)
    results = {
        "clean_accuracy": clean,
        "robust_accuracy": robust,
        "autoattack_accuracy": aa,
        "nrr": nrr,
        "attacks": attacks,
        "precision": "fp32",
    }
    set_state(
        api,
        exp_id,
        JobState.dispatching,
        JobState.running,
        JobState.succeeded,
        results=results,
        clean_accuracy=clean,
        robust_accuracy=robust,
        autoattack_accuracy=aa,
    )


def add_metrics(api: Api, exp_id: str, epochs: int, trial: str = "main") -> None:
    def go(session):
        for epoch in range(1, epochs + 1):
            row = {
                "epoch": epoch,
                "lr": 0.1 / epoch,
                "loss": 2.0 / epoch,
                "train_adv_accuracy": 0.2 + 0.1 * epoch,
                "train_clean_accuracy": 0.4 + 0.1 * epoch,
                "test_clean_accuracy": 0.45 + 0.1 * epoch,
                "images_per_second": 1000.0 + epoch,
                "seconds": 1.0,
                "val": {"clean_acc": 0.5 + 0.05 * epoch, "pgd_acc": 0.25 + 0.05 * epoch},
            }
            session.add(Event(experiment_id=exp_id, kind="metric", trial=trial, data=row))
        session.add(Trial(experiment_id=exp_id, name=trial, state="succeeded", metrics_lines=epochs))

    run_tx(api.sessions, go)


# -- sessions ----------------------------------------------------------------------------------------


def test_sign_in_gives_a_strict_httponly_session_that_sign_out_revokes(api: Api) -> None:
    alice = api.person()
    browser = Browser(api)
    form = browser.http.get("/")
    assert form.status_code == 200 and 'name="token"' in form.text
    nonce_cookie = form.headers["set-cookie"]
    assert nonce_cookie.startswith(f"{SIGNIN_COOKIE}=")
    assert "HttpOnly" in nonce_cookie and "SameSite=strict" in nonce_cookie.replace("Strict", "strict")

    r = browser.http.post(
        "/sign-in", data={"token": alice.token, "csrf": browser.csrf(form.text), "next": "/queue"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/queue"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}="))
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert "secure" not in flags, "served over http: a Secure cookie would never come back"
    session_token = cookie.split(";", 1)[0].split("=", 1)[1]
    assert session_token != alice.token and session_token.startswith("lbgs_")

    # stored as an ApiToken row of its own: the hash only, labelled as a page session
    with api.sessions() as session:
        rows = session.scalars(select(ApiToken).where(ApiToken.label == SESSION_LABEL)).all()
        mine = [row for row in rows if row.user.name == alice.name]
        assert len(mine) == 1 and mine[0].revoked_at is None
        assert session_token not in mine[0].token_hash and len(mine[0].token_hash) == 64

    queue = browser.page("/queue")
    assert alice.name in queue.text and f"team {alice.team}" in queue.text
    # the session is no API token, and an API token is no session
    assert api.client(session_token).get("/v1/users/me").status_code == 401
    impostor = Browser(api)
    impostor.http.cookies.set(SESSION_COOKIE, alice.token)
    assert impostor.http.get("/queue").status_code == 303

    out = browser.http.post("/sign-out", data={"csrf": browser.csrf(queue.text)})
    assert out.status_code == 303 and out.headers["location"] == "/"
    assert 'lbgat_session=""' in out.headers["set-cookie"] or "Max-Age=0" in out.headers["set-cookie"]
    with api.sessions() as session:
        row = session.get(ApiToken, mine[0].id)
        assert row.revoked_at is not None
    # the old cookie, replayed, opens nothing
    replay = Browser(api)
    replay.http.cookies.set(SESSION_COOKIE, session_token)
    r = replay.http.get("/queue")
    assert r.status_code == 303 and r.headers["location"].startswith("/?next=")


def test_the_session_cookie_is_secure_when_served_over_https(api: Api) -> None:
    # uvicorn trusts X-Forwarded-Proto from 127.0.0.1: the page is then served over https
    alice = api.person()
    browser = Browser(api, **{"X-Forwarded-Proto": "https"})
    form = browser.http.get("/")
    nonce = form.headers["set-cookie"]
    assert "secure" in [part.strip().lower() for part in nonce.split(";")]
    # httpx keeps Secure cookies for https URLs only: hand the nonce back as the browser would
    browser.http.cookies.set(SIGNIN_COOKIE, nonce.split(";", 1)[0].split("=", 1)[1])
    r = browser.http.post("/sign-in", data={"token": alice.token, "csrf": browser.csrf(form.text)})
    assert r.status_code == 303
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}="))
    assert "secure" in [part.strip().lower() for part in cookie.split(";")]


def test_a_wrong_token_does_not_sign_in_and_pages_send_strangers_to_the_form(api: Api) -> None:
    browser = Browser(api)
    r = browser.sign_in("lbg_not-a-token")
    assert r.status_code == 401 and "not a valid API token" in r.text
    assert SESSION_COOKIE not in browser.http.cookies
    for path in ("/queue", "/leaderboard", "/experiments/whatever"):
        r = browser.http.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/?next="), path
    for path in ("/queue/events", "/queue/table", "/experiments/whatever/curves", "/experiments/x/log"):
        assert browser.http.get(path).status_code == 401, path  # what web.js fetches: no redirect
    r = browser.http.post("/experiments/whatever/cancel", data={"csrf": "x"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    # after signing in, the browser goes where it was going, but never to another site
    alice = api.person()
    assert browser.sign_in(alice.token, "/leaderboard").headers["location"] == "/leaderboard"
    other = Browser(api)
    assert other.sign_in(alice.token, "//evil.example/x").headers["location"] == "/queue"
    assert other.http.get("/", params={"next": "https://evil.example"}).headers["location"] == "/queue"


# -- CSRF --------------------------------------------------------------------------------------------


def test_forms_without_their_csrf_token_are_refused(api: Api) -> None:
    alice = api.person()
    exp = submit(alice, "csrf-target")
    browser = signed_in(api, alice)
    page = browser.page(f"/experiments/{exp['id']}")
    token = browser.csrf(page.text)
    assert f'action="/experiments/{exp["id"]}/cancel"' in page.text

    for data in (
        {},
        {"csrf": ""},
        {"csrf": "0" * 64},
        {"csrf": token[:-1] + ("0" if token[-1] != "0" else "1")},
    ):
        r = browser.http.post(f"/experiments/{exp['id']}/cancel", data=data)
        assert r.status_code == 403 and "CSRF" in r.text, data
    assert browser.http.post("/sign-out", data={}).status_code == 403
    # another browser's session has another token: a form's token does not carry over
    bob_browser = signed_in(api, api.person(alice.team))
    assert bob_browser.http.post("/sign-out", data={"csrf": token}).status_code == 403
    assert api.admin.http.get(f"/v1/experiments/{exp['id']}").json()["state"] == "queued"
    browser.page("/queue")  # still signed in: the refused sign-out ended nothing

    r = browser.http.post(f"/experiments/{exp['id']}/cancel", data={"csrf": token, "next": "/queue"})
    assert r.status_code == 303 and r.headers["location"] == "/queue"
    assert api.admin.http.get(f"/v1/experiments/{exp['id']}").json()["state"] == "cancelled"
    r = browser.http.post(f"/experiments/{exp['id']}/retry", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == f"/experiments/{exp['id']}"
    assert api.admin.http.get(f"/v1/experiments/{exp['id']}").json()["state"] == "queued"

    # the sign-in form is tied to its own cookie
    fresh = Browser(api)
    assert fresh.http.post("/sign-in", data={"token": alice.token}).status_code == 403
    assert fresh.http.post("/sign-in", data={"token": alice.token, "csrf": token}).status_code == 403


# -- pages, without JavaScript -----------------------------------------------------------------------


def test_queue_page_shows_waiting_jobs_with_their_reason_and_buttons(api: Api) -> None:
    alice = api.person()
    bob = api.person(alice.team)
    first = submit(alice, "queue-a", priority=5)
    second = submit(bob, "queue-b")
    done = submit(alice, "queue-done")
    set_state(
        api, done["id"], JobState.dispatching, JobState.running, JobState.failed, error="boom: out of memory"
    )
    browser = signed_in(api, alice)
    html = browser.page("/queue").text
    table = html.split('id="queue-table"')[1].split("</table>")[0]
    for exp in (first, second):
        assert exp["id"] in table and f'href="/experiments/{exp["id"]}"' in table
    row_a = table.split(f'data-experiment="{first["id"]}"')[1].split("</tr>")[0]
    assert alice.name in row_a and alice.team in row_a and ">5<" in row_a
    assert "Ray is not reachable" in row_a  # the scheduler's reason (no Ray here)
    assert f'action="/experiments/{first["id"]}/cancel"' in row_a
    row_b = table.split(f'data-experiment="{second["id"]}"')[1].split("</tr>")[0]
    assert "/cancel" not in row_b, "bob's job: alice may not cancel it"
    assert table.index(first["id"]) < table.index(second["id"]), "priority 5 waits in front"
    recent = html.split('id="recent-table"')[1]
    assert (
        done["id"] in recent
        and "boom: out of memory" in recent
        and f"/experiments/{done['id']}/retry" in recent
    )
    assert "<script" not in html.split("</head>")[1], "no inline script: the content is in the HTML"


def test_experiment_page_has_spec_history_curves_results_and_artifacts(api: Api) -> None:
    alice = api.person()
    exp = submit(alice, "page-run")
    add_metrics(api, exp["id"], epochs=3)
    finish(api, exp["id"], clean=0.91, attacks={"fgsm": 0.7, "pgd20": 0.6}, aa=0.55)

    def summary(session):
        trial = session.scalar(select(Trial).where(Trial.experiment_id == exp["id"]))
        trial.summary = {
            "final": {
                "clean_accuracy": 0.91,
                "attacks": [
                    {
                        "name": "fgsm",
                        "kind": "fgsm",
                        "accuracy": 0.7,
                        "nrr": 0.7913,
                        "n_examples": 200,
                        "seconds": 1.5,
                    },
                    {
                        "name": "pgd20",
                        "kind": "pgd",
                        "accuracy": 0.6,
                        "nrr": 0.7232,
                        "n_examples": 200,
                        "seconds": 3.0,
                    },
                ],
            }
        }

    run_tx(api.sessions, summary)
    api.store.put_bytes(f"experiments/{exp['id']}/main/metrics.jsonl", b'{"epoch": 1}\n')
    api.store.put_json(f"experiments/{exp['id']}/main/summary.json", {"ok": True})

    browser = signed_in(api, alice)
    html = browser.page(f"/experiments/{exp['id']}").text
    assert "page-run" in html and exp["id"] in html and "succeeded" in html
    assert "name: page-run" in html and "method:" in html, "the spec as YAML"
    history = html.split('id="history"')[1].split("</table>")[0]
    assert [s for s in ("queued", "dispatching", "running", "succeeded") if s in history] == [
        "queued",
        "dispatching",
        "running",
        "succeeded",
    ]
    curves = html.split('id="curves"')[1].split("</section>")[0]
    assert curves.count("<svg") == 4 and curves.count("<polyline") >= 8
    for title in ("Training loss", "Accuracy", "Learning rate", "Throughput"):
        assert title in curves
    for label in ("train adversarial", "test clean", "val PGD"):
        assert f'data-label="{label}"' in curves
    results = html.split('id="results"')[1].split("</section>")[0]
    assert "fgsm" in results and "pgd20" in results and "91.0%" in results and "60.0%" in results
    assert "72.3%" in results, "the attack's NRR"
    assert "55.0%" in results, "AutoAttack"
    link = f'href="/experiments/{exp["id"]}/artifacts/main/summary.json"'
    assert link in html and "main/metrics.jsonl" in html
    download = browser.http.get(f"/experiments/{exp['id']}/artifacts/main/summary.json")
    assert download.status_code == 200 and download.json() == {"ok": True}
    assert "attachment" in download.headers["content-disposition"]
    assert browser.http.get(f"/experiments/{exp['id']}/artifacts/../x").status_code in (400, 404)
    assert browser.http.get(f"/experiments/{exp['id']}/artifacts/nope.json").status_code == 404
    # the curves alone, as web.js redraws them
    fragment = browser.page(f"/experiments/{exp['id']}/curves").text
    assert fragment.count("<svg") == 4


def test_a_sweep_page_draws_one_line_per_trial_and_the_pareto_plot(api: Api) -> None:
    alice = api.person()
    exp = submit(alice, "sweep-page")

    def make_sweep(session):
        session.get(Experiment, exp["id"]).is_sweep = True

    run_tx(api.sessions, make_sweep)
    for trial in ("t0", "t1", "t2"):
        add_metrics(api, exp["id"], epochs=2, trial=trial)

    def summaries(session):
        for trial, (clean, robust, pareto) in {
            "t0": (0.9, 0.3, True),
            "t1": (0.8, 0.5, True),
            "t2": (0.7, 0.4, False),
        }.items():
            row = session.scalar(select(Trial).where(Trial.experiment_id == exp["id"], Trial.name == trial))
            row.summary = {
                "trial": trial,
                "clean_accuracy": clean,
                "robust_accuracy": robust,
                "pareto": pareto,
            }

    run_tx(api.sessions, summaries)
    html = signed_in(api, alice).page(f"/experiments/{exp['id']}").text
    curves = html.split('id="curves"')[1].split("<h3>Trials</h3>")[0]
    for trial in ("t0", "t1", "t2"):
        assert f'data-label="{trial}"' in curves
    pareto = html.split("<h3>Trials</h3>")[1].split("</figure>")[0]
    assert pareto.count('class="point"') == 3 and 'class="front"' in pareto


def test_leaderboard_filters_sorts_plots_and_compares(api: Api) -> None:
    alice = api.person()
    bob = api.person(alice.team)
    a = submit(alice, "board-a")["id"]
    b = submit(bob, "board-b")["id"]
    c = submit(alice, "board-c")["id"]
    finish(api, a, clean=0.80, attacks={"fgsm": 0.60, "pgd20": 0.52}, aa=0.48)
    finish(api, b, clean=0.85, attacks={"fgsm": 0.62, "cw20": 0.53}, aa=0.50)
    finish(api, c, clean=0.95, attacks={"pgd20": 0.30}, aa=0.20)
    browser = signed_in(api, alice)
    html = browser.page("/leaderboard").text
    table = html.split('id="leaderboard"')[1].split("</table>")[0]
    assert table.index(b) < table.index(a) < table.index(c), "ranked by AutoAttack accuracy"
    assert 'name="compare"' in table and f'href="/experiments/{a}"' in table
    assert html.count('class="point"') >= 3, "the scatter of the rows shown"
    assert '<option value="digits"' in html and '<option value="lbgat"' in html

    by_clean = browser.page("/leaderboard", sort="clean_accuracy", order="desc").text.split(
        'id="leaderboard"'
    )[1]
    assert by_clean.index(c) < by_clean.index(b) < by_clean.index(a)
    ascending = browser.page("/leaderboard", sort="clean_accuracy", order="asc").text.split(
        'id="leaderboard"'
    )[1]
    assert ascending.index(a) < ascending.index(b) < ascending.index(c)

    filtered = browser.page("/leaderboard", method="trades").text
    assert a not in filtered.split('id="leaderboard"')[1]
    assert browser.page("/leaderboard", threat="linf 0.1").text.count('name="compare" value=') >= 3
    assert browser.http.get("/leaderboard", params={"threat": "linf"}).status_code == 422

    compared = browser.http.get("/leaderboard", params=[("compare", a), ("compare", b)])
    side = compared.text.split('id="comparison"')[1]
    assert "board-a" in side and "board-b" in side and "cw20" in side and "fgsm" in side
    assert "53.0%" in side and "62.0%" in side
    # a protocol switches to that protocol's board; one that does not exist is refused, named
    r = browser.http.get("/leaderboard", params={"protocol": "cifar10-linf-v1"})
    assert r.status_code == 422 and "unknown protocol" in r.text and "robustbench-linf" in r.text


def _board(html: str) -> str:
    return html.split('id="leaderboard"')[1].split("</table>")[0]


def _row(board: str, key: str) -> str:
    return board.split(f'data-row="{key}"')[1].split("</tr>")[0]


def _keys(board: str) -> list[str]:
    return re.findall(r'<tr data-row="([^"]+)"', board)


def test_leaderboard_shows_a_protocols_rows_partial_below_full_and_marked(api: Api) -> None:
    rita, sam = api.person(), api.person()
    teammate = api.person(rita.team)
    # a: its training run reported under digits@1 -> a full row of its own
    a = trained(api, rita, "pb-a", aa=0.50, summary_extra={"protocol_id": "digits", "protocol_version": "1"})
    b = trained(api, teammate, "pb-b", selection_split="test")
    c = trained(api, rita, "pb-c")
    full_b = evaluate(teammate, b, protocol="digits")["id"]
    finish_evaluation(api, full_b, clean=0.80, attacks={"pgd20": 0.60}, aa=0.48)
    # better numbers on 100 of 450 examples: still below every full row
    partial_c = evaluate(rita, c, protocol="digits", n_examples=100)["id"]
    finish_evaluation(api, partial_c, clean=0.95, attacks={"pgd20": 0.90}, aa=0.90, n_total=450)
    custom = evaluate(
        rita, c, suite={"threat_model": {"eps": 0.1, "step_size": 0.01}, "attacks": [{"kind": "fgsm"}]}
    )["id"]
    finish_evaluation(api, custom, clean=0.95, attacks={"fgsm": 0.99})
    custom_key = f"custom@{job_spec(api, custom).protocol_version}"
    outsider = trained(api, sam, "pb-outsider")
    theirs = evaluate(sam, outsider, protocol="digits")["id"]
    finish_evaluation(api, theirs, clean=0.99, attacks={"pgd20": 0.99}, aa=0.99)

    browser = signed_in(api, rita)
    # the default view is still the experiments' board; the select offers the protocols
    home = browser.page("/leaderboard").text
    select = home.split('<select name="protocol">')[1].split("</select>")[0]
    assert '<option value="">experiments (training suites)</option>' in select
    with_results = select.split('label="protocols with results"')[1].split("</optgroup>")[0]
    assert '<option value="digits@1">digits@1 (3 results)' in with_results
    assert f'<option value="{custom_key}">' in with_results
    assert '<option value="lbgat@1" title="LBGAT paper' in select.split('label="shipped protocols"')[1]
    assert 'data-board="protocol"' not in home and f'data-experiment="{a}"' in home

    html = browser.page("/leaderboard", protocol="digits@1").text
    assert '<option value="digits@1" selected>' in html
    board = _board(html)
    keys = _keys(board)
    assert [k.split(":")[0] for k in keys] == [a, full_b, partial_c], "partial 0.90 below full 0.48"
    assert theirs not in html and "pb-outsider" not in html, "another team's rows"
    full_body, partial_body = board.split('<tbody class="full"')[1], board.split('<tbody class="partial"')[1]
    assert full_body.index(keys[1]) < board.index('<tbody class="partial"')
    assert keys[2] in partial_body and "partial rows" in partial_body
    row_c = _row(board, keys[2])
    assert "100 / 450" in row_c and 'class="tag partial"' in row_c and ">partial</abbr>" in row_c
    row_b = _row(board, keys[1])
    assert ">test-selected</abbr>" in row_b and "450 / 450" in row_b and "partial</abbr>" not in row_b
    assert f'href="/experiments/{full_b}"' in row_b and f'href="/experiments/{b}"' in row_b
    assert "test-selected" not in _row(board, keys[0]) and "digits@1" in row_b
    assert ">1<" in _row(board, keys[0]) and ">3<" in row_c, "rank within the protocol"

    # sorting on the server stays within the partial boundary, either direction
    for order, full in (("desc", [a, full_b]), ("asc", [full_b, a])):
        keys_sorted = _keys(
            _board(browser.page("/leaderboard", protocol="digits@1", sort="clean_accuracy", order=order).text)
        )
        assert [k.split(":")[0] for k in keys_sorted] == [*full, partial_c], order

    # the scatter plots the rows (the partial one labelled so); compare works on these rows
    chart = html.split('class="chart-box"')[1].split("</figure>")[0]
    assert chart.count('class="point"') == 3 and "partial 100/450" in chart
    compared = browser.http.get(
        "/leaderboard", params=[("protocol", "digits@1"), ("compare", keys[0]), ("compare", keys[2])]
    )
    side = compared.text.split('id="comparison"')[1]
    assert "pgd20" in side and "100 / 450" in side and "95.0%" in side and "50.0%" in side
    assert 'class="chosen"' in _board(compared.text)

    # a custom suite's board, a protocol without its version, and no results yet
    custom_board = _board(browser.page("/leaderboard", protocol=custom_key).text)
    assert [k.split(":")[0] for k in _keys(custom_board)] == [custom]
    every_custom = browser.page("/leaderboard", protocol="custom").text
    assert '<option value="custom" selected>' in every_custom and custom in every_custom
    assert 'id="no-scatter"' in every_custom, "several custom suites: no plot mixes them"
    latest = browser.page("/leaderboard", protocol="lbgat").text
    assert '<option value="lbgat@1" selected' in latest and "No result under lbgat@1" in latest

    # another team sees its own row only, and none of this team's protocols
    outsider_html = signed_in(api, sam).page("/leaderboard", protocol="digits@1").text
    assert [k.split(":")[0] for k in _keys(_board(outsider_html))] == [theirs]
    assert custom_key not in outsider_html and partial_c not in outsider_html


# -- team rules --------------------------------------------------------------------------------------


def test_another_team_sees_none_of_it_and_teammates_cannot_change_it(api: Api) -> None:
    alice = api.person()
    exp = submit(alice, "private-run")
    done = submit(alice, "private-done")
    finish(api, done["id"], clean=0.9, attacks={"pgd20": 0.5}, aa=0.45)
    api.store.put_json(f"experiments/{done['id']}/main/summary.json", {"secret": 1})

    mallory = signed_in(api, api.person())
    queue = mallory.page("/queue").text
    assert exp["id"] not in queue and done["id"] not in queue and "private-" not in queue
    board = mallory.page("/leaderboard").text
    assert done["id"] not in board and "private-done" not in board
    for path in (
        f"/experiments/{exp['id']}",
        f"/experiments/{done['id']}/artifacts/main/summary.json",
        f"/experiments/{exp['id']}/curves",
        f"/experiments/{exp['id']}/events",
        f"/experiments/{exp['id']}/log",
    ):
        r = mallory.http.get(path)
        assert r.status_code == 404 and "secret" not in r.text, path
    compare = mallory.http.get("/leaderboard", params=[("compare", done["id"])])
    assert compare.status_code == 404
    token = mallory.csrf(queue)
    r = mallory.http.post(f"/experiments/{exp['id']}/cancel", data={"csrf": token})
    assert r.status_code == 404
    assert api.admin.http.get(f"/v1/experiments/{exp['id']}").json()["state"] == "queued"

    bob = signed_in(api, api.person(alice.team))
    page = bob.page(f"/experiments/{exp['id']}").text
    assert "private-run" in page and "/cancel" not in page, "a teammate sees it, without the button"
    r = bob.http.post(f"/experiments/{exp['id']}/cancel", data={"csrf": bob.csrf(page)})
    assert r.status_code == 403 and "only its owner or an admin" in r.text
    admin = signed_in(api, api.admin)
    assert exp["id"] in admin.page("/queue").text, "an admin sees every team's queue"


# -- live streams ------------------------------------------------------------------------------------


def _stream(response: httpx.Response, timeout_s: float = 15) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of an event stream, for at most `timeout_s`."""
    kind = None
    deadline = time.monotonic() + timeout_s
    for line in response.iter_lines():
        if line.startswith("event:"):
            kind = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and kind:
            yield kind, json.loads(line.split(":", 1)[1])
        if time.monotonic() > deadline:
            raise AssertionError(f"the stream did not deliver within {timeout_s} s")


def _events(response: httpx.Response, want: int) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for event in _stream(response):
        events.append(event)
        if len(events) == want:
            break
    return events


def test_queue_stream_tells_the_team_about_state_changes_only(api: Api) -> None:
    alice = api.person()
    browser = signed_in(api, alice)
    html = browser.page("/queue").text
    after = re.search(r'data-queue-live="/queue/events\?after=(\d+)"', html).group(1)
    outsider = submit(api.person(), "outsider")  # another team's job: at most a `moved`
    mine = submit(alice, "streamed")
    with browser.http.stream(
        "GET", "/queue/events", params={"after": after}, timeout=httpx.Timeout(10, read=20)
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = []
        for kind, data in _stream(r):
            events.append((kind, data))
            if kind == "state" and data.get("experiment") == mine["id"]:
                break
    states = [(k, d.get("experiment"), d.get("to")) for k, d in events if k == "state"]
    assert (("state", mine["id"], "queued")) in states
    assert not [e for e in events if outsider["id"] in json.dumps(e)]
    table = browser.page("/queue/table").text
    assert mine["id"] in table and "<html" not in table


def test_experiment_stream_sends_state_and_metric_events_to_a_signed_in_browser(api: Api) -> None:
    alice = api.person()
    exp = submit(alice, "live-exp")
    browser = signed_in(api, alice)
    set_state(api, exp["id"], JobState.dispatching, JobState.running)
    add_metrics(api, exp["id"], epochs=1)
    with browser.http.stream(
        "GET", f"/experiments/{exp['id']}/events", timeout=httpx.Timeout(10, read=20)
    ) as r:
        assert r.status_code == 200
        events = _events(r, want=4)
    assert [k for k, _ in events] == ["state", "state", "state", "metric"]
    assert events[-1][1]["epoch"] == 1


# -- /metrics for Prometheus -------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_metrics_token_reads_metrics_and_nothing_else(make_api) -> None:
    api = make_api(metrics_token="scrape-" + "x" * 32)
    alice = api.person()
    submit(alice, "wait-a")
    submit(alice, "wait-b")
    scraper = api.client("scrape-" + "x" * 32)
    r = scraper.get("/metrics")
    assert r.status_code == 200, r.text
    assert 'lbgat_jobs{state="queued"} 2.0' in r.text
    waits = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in r.text.splitlines()
        if line.startswith("lbgat_jobs_state_seconds_max{")
    }
    assert set(waits) == {'state="queued"', 'state="retrying"', 'state="dispatching"', 'state="running"'}
    assert 0 <= waits['state="queued"'] < 120 and waits['state="running"'] == 0
    assert scraper.get("/v1/experiments").status_code == 401, "the scraper's token opens nothing else"
    assert api.client("wrong").get("/metrics").status_code == 401
    assert alice.http.get("/metrics").status_code == 200
