"""Telling a running job to save and stop: the driver's SIGTERM handler, the flag the workers poll.

The scheduler preempts a job by stopping its Ray job (`JobSubmissionClient.stop_job`): Ray's job
supervisor sends SIGTERM to the entrypoint (`python -m workers.run --job-id ID`) and every process
under it, waits `RAY_JOB_STOP_WAIT_TIME_S` seconds (read by the supervisor from the job's runtime_env
env_vars; an integer; Ray's default 3), then sends SIGKILL; the job ends STOPPED either way.

On SIGTERM the driver puts a key for its experiment into Ray's cluster-wide key-value store (GCS
internal KV, namespace `lbgat_preempt`), which every Ray Train worker of the experiment reads, rank 0
at most every `POLL_S` seconds, its decision shared with the other ranks at every step. The workers
stop before their next step, report a just-in-time checkpoint through `ray.train.report` (what Ray
Train restores when the job runs again under the same experiment id and trial), rank 0 writes
experiments/<id>/<trial>/preempted.json and the workers return; the driver exits with
`EXIT_PREEMPTED`. The key is removed when the experiment's job starts again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

log = logging.getLogger("workers.preemption")

NAMESPACE = "lbgat_preempt"
#: how often rank 0 reads the flag and asks Ray Train for node-preemption news, seconds
POLL_S = 0.5
#: what the supervisor waits between SIGTERM and SIGKILL (Ray's default when unset)
STOP_WAIT_ENV, DEFAULT_STOP_WAIT_S = "RAY_JOB_STOP_WAIT_TIME_S", 3
PREEMPTED_FILE = "preempted.json"


class Preempted(RuntimeError):
    """The run stopped for a preemption after saving a just-in-time checkpoint (or, for an
    evaluation, with its finished shards stored); running the job again resumes it."""


def _key(experiment_id: str) -> bytes:
    return experiment_id.encode()


def request_stop(experiment_id: str, reason: str) -> None:
    """Ask every worker of `experiment_id` to checkpoint and stop (needs a connected Ray)."""
    from ray.experimental import internal_kv

    value = json.dumps({"reason": reason, "at": time.time()}).encode()
    internal_kv._internal_kv_put(_key(experiment_id), value, overwrite=True, namespace=NAMESPACE)


def stop_requested(experiment_id: str) -> dict[str, Any] | None:
    """The pending request ({"reason", "at"}) for `experiment_id`, or None."""
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(_key(experiment_id), namespace=NAMESPACE)
    return None if value is None else json.loads(value)


def clear_stop(experiment_id: str) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(_key(experiment_id), namespace=NAMESPACE)


def stop_wait_s() -> float:
    """The grace the job supervisor gives this job between SIGTERM and SIGKILL (the job's env)."""
    try:
        return float(os.environ.get(STOP_WAIT_ENV, DEFAULT_STOP_WAIT_S))
    except ValueError:
        return float(DEFAULT_STOP_WAIT_S)


class StopSignal:
    """The driver's SIGTERM handler for one experiment. The handler only sets an event (a signal
    handler must not call into Ray: the main thread may be inside it); a thread puts the request
    into the KV store. `event` tells the driver's own loops (evaluation dispatch) to stop."""

    def __init__(self, experiment_id: str) -> None:
        self.experiment_id = experiment_id
        self.event = threading.Event()
        self.received_at: float | None = None
        self._thread = threading.Thread(target=self._forward, name="lbgat-sigterm", daemon=True)

    def install(self) -> StopSignal:
        """Replace the SIGTERM handler (after ray.init, which installs one that exits at once)."""
        clear_stop(self.experiment_id)  # a request left by an earlier, preempted run
        if threading.current_thread() is not threading.main_thread():
            log.warning("not the main thread: SIGTERM is not handled (no just-in-time checkpoint)")
            return self
        self._thread.start()
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received_at is None:
            self.received_at = time.time()
        self.event.set()

    def _forward(self) -> None:
        self.event.wait()
        log.warning(
            "SIGTERM: asking %s's workers for a just-in-time checkpoint (grace %.0f s before SIGKILL)",
            self.experiment_id,
            stop_wait_s(),
        )
        try:
            request_stop(self.experiment_id, "SIGTERM (job stopped)")
        except Exception:  # Ray gone: nothing can be saved; the job ends anyway
            log.exception("could not forward the stop request")
