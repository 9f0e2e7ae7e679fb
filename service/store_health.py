"""Whether the artifact store answers, known without waiting for it: the scheduler's circuit breaker.

Every dispatch writes the spec to the store, and every round reads metrics and results from it. When
the store is down, each of those requests used to sit through the store client's whole retry schedule
(seconds) and the job went back to the queue, to be claimed and given back again in the next round:
hundreds of state events per job, and a scheduler stuck in retries. Instead:

* a daemon thread probes the store every `interval_s` with one short request (`check()` on a view
  with one attempt and a `timeout_s` timeout, see `ArtifactStore.with_timeout`);
* a request of the scheduler's that fails with StoreUnavailable opens the breaker at once
  (`record_failure`), so the rest of the round skips the store;
* while it is open the scheduler claims nothing and reads nothing from the store, and waiting jobs
  show the reason; the first probe that succeeds closes it.

A probe still in flight after its timeout counts as a failure (a hung NFS mount, a black-holed
endpoint), so `available` never waits for the store either. Without the thread (a scheduler driven by
`run_round()` in tests or tools), `poll()` probes inline when a probe is due.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from service.text import one_line
from workers.storage import ArtifactStore

log = logging.getLogger("service.store")

MAX_REASON = 200  # characters of the last error kept for queue reasons and failure messages


class StoreMonitor:
    def __init__(
        self,
        store: ArtifactStore,
        *,
        interval_s: float,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store.with_timeout(timeout_s)  # the view the scheduler's own requests use too
        self.url = store.url
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._error: str | None = None
        self._probe_started: float | None = None
        self._probed_at = -float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"StoreMonitor({self.url!r}, {'up' if self.available else 'down'})"

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lbgat-store-probe", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.probe()
            self._stop.wait(self.interval_s)

    # -- state ---------------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the breaker is open, or while a probe has hung for longer than its timeout."""
        with self._lock:
            if self._down_since is not None:
                return False
            started = self._probe_started
        if started is not None and self._clock() - started > self.timeout_s:
            self._set_down(f"no answer within {self.timeout_s:g} s", since=started)
            return False
        return True

    def outage_s(self) -> float:
        """Seconds since the store stopped answering; 0 while it answers."""
        self.available  # noqa: B018 - a hung probe opens the breaker
        with self._lock:
            return 0.0 if self._down_since is None else max(0.0, self._clock() - self._down_since)

    @property
    def error(self) -> str | None:
        """The last failure, one line, while the store is down; None while it answers."""
        with self._lock:
            return self._error if self._down_since is not None else None

    # -- changes -------------------------------------------------------------------------------------

    def probe(self) -> bool:
        """Ask the store now (blocking up to about the timeout) and record the answer."""
        with self._lock:
            self._probe_started = self._clock()
        try:
            self.store.check()
        except Exception as exc:  # any failure to answer is an outage, whatever its type
            self._set_down(f"{type(exc).__name__}: {exc}")
            ok = False
        else:
            self._set_up()
            ok = True
        with self._lock:
            self._probe_started = None
            self._probed_at = self._clock()
        return ok

    def poll(self) -> None:
        """Probe inline when one is due and no thread probes (see the module docstring)."""
        if self.running:
            return
        with self._lock:
            due = self._clock() - self._probed_at >= self.interval_s
        if due:
            self.probe()

    def record_failure(self, exc: BaseException) -> None:
        """A request of the scheduler's found the store unreachable: open the breaker now."""
        self._set_down(f"{type(exc).__name__}: {exc}")

    def _set_down(self, error: str, since: float | None = None) -> None:
        error = one_line(error, MAX_REASON)
        with self._lock:
            opened = self._down_since is None
            if opened:
                self._down_since = self._clock() if since is None else since
            self._error = error
        if opened:
            log.warning(
                "artifact store %s unreachable (%s): dispatching waits, metrics and results are read "
                "when it answers again",
                self.url,
                error,
            )

    def _set_up(self) -> None:
        with self._lock:
            since, self._down_since, self._error = self._down_since, None, None
        if since is not None:
            log.warning("artifact store %s answers again after %.0f s", self.url, self._clock() - since)
