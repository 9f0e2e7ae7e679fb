"""The team's pages in a real browser, and our metrics in a real Prometheus, against the whole system on
loopback: the service (uvicorn child process) on the session's local Ray and SeaweedFS.

One run (about two minutes on 2 CPUs): alice's long digits job holds the only Ray slot, so her short
digits job waits in the queue with its reason; she cancels the long one from its page in a second
tab while the queue page, never reloaded, shows the short one reach `running`; its page shows curves
and results once it succeeds, the leaderboard its row; another team's user sees none of it. Chromium
is Debian's (`/usr/bin/chromium`, driven by Playwright; no browser is downloaded), Prometheus is
Debian's, started here on a free 127.0.0.1 port with a temporary storage folder and stopped at the
end. Screenshots of each page at 1280 px go to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.local_service import LocalService
from tests.e2e.conftest import auth
from tests.e2e.test_service import digits_spec, get, state_is, submit
from tests.waiting import wait_for
from workers.ray_auth import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMETHEUS = shutil.which("prometheus")
METRICS_TOKEN = "lbgat-metrics-" + os.urandom(12).hex()

pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/test.sh)"
    ),
    pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (scripts/test.sh)"),
]


# -- Prometheus --------------------------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def series(self, query: str, start: float) -> list[dict[str, Any]]:
        """Every series `query` returned between `start` and now (a range query, 1 s steps)."""
        return self.get("/api/v1/query_range", query=query, start=start, end=time.time(), step=1)["result"]


def ray_session_dir() -> Path:
    """The session folder of the Ray head this test process joined (the ray_head fixture)."""
    import ray

    return Path(ray._private.worker.global_worker.node.get_session_dir_path())


@pytest.fixture
def prometheus(ray_head, tmp_path) -> Iterator[Prometheus]:
    """Prometheus on 127.0.0.1 scraping the local Ray's nodes (the session's service-discovery file)
    and, once `service` is known, the service's /metrics with the metrics token; every 2 s."""
    folder = tmp_path / "prometheus"
    folder.mkdir()
    sd_file = ray_session_dir() / "prom_metrics_service_discovery.json"
    wait_for(sd_file.exists, timeout_s=30, what="Ray's service-discovery file")
    (folder / "token").write_text(METRICS_TOKEN)
    port = free_port()
    config = {
        "global": {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [
            {"job_name": "ray", "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "5s"}]},
            {
                "job_name": "lbgat",
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials_file": str(folder / "token")},
                "file_sd_configs": [{"files": [str(folder / "service.json")], "refresh_interval": "2s"}],
            },
        ],
    }
    (folder / "service.json").write_text("[]")
    (folder / "prometheus.yml").write_text(json.dumps(config))
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(prom.url + "/-/ready", timeout=2) as response:
                    return response.status == 200
            except OSError:
                assert process.poll() is None, log.read_text()[-3000:]
                return False

        wait_for(ready, timeout_s=60, what="Prometheus ready")
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the browser -------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path_factory, monkeypatch) -> Iterator[Any]:
    """Debian's Chromium under Playwright, with a home of its own: Chromium writes crash reports and
    profiles under $HOME/.config, and Playwright looks for browsers under $HOME/.cache."""
    sync_api = pytest.importorskip("playwright.sync_api")
    home = tmp_path_factory.mktemp("browser-home")
    for name, value in (
        ("HOME", home),
        ("XDG_CONFIG_HOME", home / ".config"),
        ("XDG_CACHE_HOME", home / ".cache"),
        ("PLAYWRIGHT_BROWSERS_PATH", home / "no-browsers"),  # never a bundled or downloaded one
    ):
        monkeypatch.setenv(name, str(value))
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-breakpad", "--no-first-run"],
            env=dict(os.environ),
        )
        try:
            yield chromium
        finally:
            chromium.close()


def sign_in(browser: Any, url: str, token: str, shots: Path, name: str) -> tuple[Any, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the Cancel button asks first
    page.goto(url + "/")
    page.screenshot(path=str(shots / f"{name}-sign-in.png"))
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(url + "/queue")
    return context, page


def no_horizontal_scroll(page: Any, width: int) -> None:
    page.set_viewport_size({"width": width, "height": 800})
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"{page.url} is {overflow}px wider than a {width}px screen"
    page.set_viewport_size({"width": 1280, "height": 900})


# -- the run -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_pages_in_a_browser_and_metrics_in_prometheus(
    service_env, ray_cluster, ray_auth_token, prometheus, browser, tmp_path
):
    env = {**service_env, "LBGAT_METRICS_TOKEN": METRICS_TOKEN}
    admin = env["LBGAT_ADMIN_TOKEN"]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    started = time.time()
    service = LocalService(env, tmp_path / "service.log").start()
    try:
        host = service.url.split("://", 1)[1]
        (Path(prometheus.log.parent) / "service.json").write_text(json.dumps([{"targets": [host]}]))
        with httpx.Client(base_url=service.url, timeout=30) as client:
            tokens = {}
            for name, team in (("alice", "vision"), ("mallory", "elsewhere")):
                r = client.post("/v1/users", json={"name": name, "team": team}, headers=auth(admin))
                assert r.status_code == 201, r.text
                tokens[name] = r.json()["token"]["token"]
            alice = tokens["alice"]
            # the long job takes the only Ray slot; the short one waits behind it
            blocker = submit(client, alice, digits_spec("e2e-web-blocker", "optimization.epochs=200"))
            wait_for(
                state_is(client, alice, blocker["id"], "dispatching", "running"), timeout_s=60, what="blocker"
            )
            short = submit(client, alice, digits_spec("e2e-web"))
            reason = get(client, alice, short["id"])["queue"]["reason"]
            assert "running jobs (limit 1)" in reason or "slots are busy" in reason, reason
            _browse(browser, service.url, tokens, blocker["id"], short["id"], reason, shots)
            final = get(client, alice, short["id"])
        _check_ray_job_name(ray_cluster, short["id"])
        _check_prometheus(prometheus, ray_cluster, ray_auth_token, short["id"], final, started)
    finally:
        service.stop()
        service.kill()
    for name in ("alice-sign-in", "queue", "experiment", "experiment-phone", "leaderboard", "mallory-queue"):
        assert (shots / f"{name}.png").stat().st_size > 5000, name
    print(f"screenshots in {shots}")


def _browse(
    browser, url: str, tokens: dict[str, str], blocker: str, short: str, reason: str, shots: Path
) -> None:
    context, queue = sign_in(browser, url, tokens["alice"], shots, "alice")
    row = f'tr[data-experiment="{short}"]'
    queue.wait_for_selector(f"{row} td.reason")
    assert queue.inner_text(f"{row} td.reason") == reason
    assert queue.inner_text(f"{row} .state") == "queued"
    queue.wait_for_selector("[data-live-status]:not([hidden])")  # the event stream is open
    queue.screenshot(path=str(shots / "queue.png"), full_page=True)
    queue.evaluate("window.__notReloaded = true")

    # a second tab: cancel the long job from its page
    other = context.new_page()
    other.on("dialog", lambda dialog: dialog.accept())
    other.goto(f"{url}/experiments/{blocker}")
    other.click(f'form[action="/experiments/{blocker}/cancel"] button')
    other.wait_for_url(f"{url}/experiments/{blocker}")
    other.wait_for_selector(".summary .state[data-state='cancelled']", timeout=90_000)
    other.close()

    # the queue page follows by itself: the short job reaches running, the long one is gone
    queue.wait_for_selector(f"{row} .state[data-state='running']", timeout=120_000)
    assert queue.evaluate("window.__notReloaded") is True, "the queue page reloaded"
    queue.wait_for_selector(f'#recent-table tr[data-experiment="{blocker}"]')
    assert queue.locator(f'#queue-table tr[data-experiment="{blocker}"]').count() == 0

    # its page: live while it runs, then (it reloads itself once at the end) curves and results
    queue.click(f'{row} a[href="/experiments/{short}"]')
    page = queue
    page.wait_for_url(f"{url}/experiments/{short}")
    page.wait_for_selector(".summary .state[data-state='succeeded']", timeout=300_000)
    page.wait_for_selector("#results table.results")
    curves = page.locator("#curves svg.chart")
    assert curves.count() == 4
    assert page.locator("#curves polyline").count() >= 6
    assert page.locator('#curves g.series[data-label="train adversarial"] circle').count() == 3
    results = page.inner_text("#results")
    assert "pgd10" in results and "AutoAttack" in results and "NRR" in results
    assert page.locator('a[href$="/artifacts/main/summary.json"]').count() == 1
    assert short in page.inner_text("#log")
    ray_link = page.get_attribute(".summary a[target=_blank]", "href")
    assert ray_link.endswith(f"/#/jobs/{short}-a1")
    page.screenshot(path=str(shots / "experiment.png"), full_page=True)
    no_horizontal_scroll(page, 390)
    page.set_viewport_size({"width": 390, "height": 800})
    page.screenshot(path=str(shots / "experiment-phone.png"))
    page.set_viewport_size({"width": 1280, "height": 900})

    page.goto(f"{url}/leaderboard")
    board = page.locator(f'#leaderboard tr[data-experiment="{short}"]')
    assert board.count() == 1 and "e2e-web" in board.inner_text()
    assert page.locator("svg.chart circle.point").count() >= 1
    page.screenshot(path=str(shots / "leaderboard.png"), full_page=True)
    no_horizontal_scroll(page, 390)
    page.goto(f"{url}/queue")
    no_horizontal_scroll(page, 390)
    context.close()

    # another team: none of it
    context, page = sign_in(browser, url, tokens["mallory"], shots, "mallory")
    text = page.inner_text("main")
    assert short not in text and blocker not in text and "e2e-web" not in text
    page.screenshot(path=str(shots / "mallory-queue.png"), full_page=True)
    response = page.goto(f"{url}/experiments/{short}")
    text = page.inner_text("main")
    assert response.status == 404 and "not found" in text and "alice" not in text and "history" not in text
    page.goto(f"{url}/leaderboard")
    assert short not in page.content()
    context.close()


def _check_ray_job_name(ray_cluster: str, experiment_id: str) -> None:
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_cluster).list_jobs()
    (job,) = [j for j in jobs if j.submission_id == f"{experiment_id}-a1"]
    assert job.metadata["job_name"] == f"e2e-web ({experiment_id}) by alice"


def _check_prometheus(
    prom: Prometheus, ray_cluster: str, ray_token: str, exp_id: str, final: dict, start: float
) -> None:
    # Ray's HTTP service discovery (what the compose and Kubernetes Prometheus read) lists the same
    # targets as the session's file that this Prometheus read
    request = urllib.request.Request(
        f"{ray_cluster}/api/prometheus/sd", headers={"Authorization": f"Bearer {ray_token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        http_sd = json.loads(response.read())
    file_sd = json.loads((ray_session_dir() / "prom_metrics_service_discovery.json").read_text())
    assert sorted(http_sd[0]["targets"]) == sorted(file_sd[0]["targets"])

    selector = f'{{experiment="{exp_id}"}}'
    accuracy = wait_for(
        lambda: prom.series(f"ray_lbgat_train_accuracy{selector}", start) or None,
        timeout_s=30,
        what="the experiment's accuracy in Prometheus",
        interval_s=1.0,
    )
    kinds = {s["metric"]["kind"] for s in accuracy}
    assert {"train_adv", "test_clean"} <= kinds, kinds
    for series in accuracy:
        labels = series["metric"]
        assert (labels["experiment"], labels["trial"], labels["user"]) == (exp_id, "main", "alice")
        assert all(0 <= float(v) <= 1 for _, v in series["values"])
    train_adv = next(s for s in accuracy if s["metric"]["kind"] == "train_adv")
    last_epoch = final["metrics"][-1]
    assert float(train_adv["values"][-1][1]) == pytest.approx(last_epoch["train_adv_accuracy"])
    (speed,) = prom.series(f"ray_lbgat_train_images_per_second{selector}", start)
    assert speed["metric"]["user"] == "alice" and max(float(v) for _, v in speed["values"]) > 0
    epochs = prom.series(f"max(ray_lbgat_train_epoch{selector})", start)
    assert max(float(v) for _, v in epochs[0]["values"]) == 3

    # the queue-depth series, from the service's /metrics: the short job waited, then ran
    queued = prom.series('lbgat_jobs{state="queued"}', start)
    assert queued and queued[0]["metric"]["job"] == "lbgat"
    assert max(float(v) for _, v in queued[0]["values"]) >= 1
    running = prom.series('lbgat_jobs{state="running"}', start)
    assert max(float(v) for _, v in running[0]["values"]) >= 1
    waited = prom.series('lbgat_jobs_state_seconds_max{state="queued"}', start)
    assert max(float(v) for _, v in waited[0]["values"]) > 0

    # every panel of our Grafana dashboard has data from this run
    from service.grafana import all_queries

    for query in all_queries():
        assert prom.series(query, start), f"no data for the dashboard's {query!r}"
