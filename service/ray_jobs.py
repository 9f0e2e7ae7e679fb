"""The service's only door to Ray: the Job Submission API (HTTP to the dashboard), nothing else.

The control plane never joins the cluster as a driver (that would cost the head a worker and the
service hundreds of MB); it submits, polls, stops and reads logs over the dashboard's REST API, and
reads the cluster's resources from the state API. With Ray's token auth the token (given, or
RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH; see workers/ray_auth.py) goes on every request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from workers.ray_auth import find_ray_token, is_auth_error, missing_token_message

log = logging.getLogger("service.ray")


class RayUnavailable(RuntimeError):
    """Ray's dashboard cannot be reached or refused the request; the message says which and why."""


class RayAuthError(RayUnavailable):
    """The cluster has token auth on and refused our token (or its absence): retrying cannot help."""


@dataclass(frozen=True)
class Capacity:
    gpus: float
    cpus: float
    nodes: int
    gpu_resource: str = "GPU"  # the Ray resource counted as `gpus`
    has_gpu_resource: bool = False  # some live node reports it (with 0 of it free or not)


@dataclass(frozen=True)
class RayJobState:
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str | None
    start_time_ms: int | None
    end_time_ms: int | None
    exit_code: int | None


def job_metadata(*, experiment_id: str, name: str, user: str) -> dict[str, str]:
    """The metadata of an experiment's Ray job. The dashboard's Jobs list shows `job_name` in its Name
    column (Ray's own default is the submission id), so the list reads like our queue."""
    return {
        "job_name": f"{name} ({experiment_id}) by {user}",
        "lbgat_experiment": experiment_id,
        "lbgat_user": user,
    }


class RayJobs:
    def __init__(self, address: str, *, token: str | None = None, gpu_resource: str = "GPU") -> None:
        self.address = address if "://" in address else f"http://{address}"
        #: the Ray resource that counts as a GPU (LBGAT_GPU_RESOURCE)
        self.gpu_resource = gpu_resource
        # Sent on every request: Ray's client adds it by itself only where RAY_AUTH_MODE=token is set.
        self._token = find_ray_token(token)
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RayJobs({self.address!r})"

    def _get(self) -> Any:
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
                try:
                    self._client = JobSubmissionClient(self.address, headers=headers)
                except Exception as exc:
                    raise _unavailable(_explain(self.address, exc), exc) from exc
            return self._client

    def _call(self, what: str, fn: Any) -> Any:
        client = self._get()
        try:
            return fn(client)
        except RayUnavailable:
            raise
        except (ConnectionError, OSError) as exc:
            with self._lock:
                self._client = None  # reconnect next time (the head may have restarted)
            raise RayUnavailable(f"Ray dashboard at {self.address}: {what} failed: {exc}") from exc
        except Exception as exc:
            if _is_connection_error(exc) or is_auth_error(exc):
                with self._lock:
                    self._client = None
                raise _unavailable(f"{what}: {_explain(self.address, exc)}", exc) from exc
            raise

    # -- jobs ----------------------------------------------------------------------------------------

    def submit(
        self,
        *,
        submission_id: str,
        entrypoint: str,
        env_vars: dict[str, str],
        metadata: dict[str, str],
    ) -> str:
        """Submit once under a fixed id: submitting an id Ray already has is not an error (it means an
        earlier attempt of ours got through before the service stopped), so dispatch is idempotent."""

        def go(client: Any) -> str:
            try:
                return client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env={"env_vars": env_vars},
                    metadata=metadata,
                    entrypoint_num_cpus=0,
                )
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    return submission_id
                raise

        return self._call(f"submitting {submission_id}", go)

    def state(self, submission_id: str) -> RayJobState | None:
        """The job's state, or None when Ray has no job with that id."""

        def go(client: Any) -> RayJobState | None:
            try:
                info = client.get_job_info(submission_id)
            except RuntimeError as exc:
                if "does not exist" in str(exc) or "404" in str(exc):
                    return None
                raise
            return RayJobState(
                status=str(getattr(info.status, "value", info.status)),
                message=info.message,
                start_time_ms=info.start_time,
                end_time_ms=info.end_time,
                exit_code=getattr(info, "driver_exit_code", None),
            )

        return self._call(f"reading {submission_id}", go)

    def stop(self, submission_id: str) -> bool:
        def go(client: Any) -> bool:
            try:
                return bool(client.stop_job(submission_id))
            except RuntimeError as exc:
                if "does not exist" in str(exc):
                    return False
                raise

        return self._call(f"stopping {submission_id}", go)

    def logs(self, submission_id: str) -> str:
        def go(client: Any) -> str:
            try:
                return client.get_job_logs(submission_id)
            except RuntimeError as exc:
                if "does not exist" in str(exc):
                    return ""
                raise

        return self._call(f"reading the logs of {submission_id}", go)

    async def tail_logs(self, submission_id: str) -> AsyncIterator[str]:
        client = self._get()
        try:
            async for chunk in client.tail_job_logs(submission_id):
                yield chunk
        except Exception as exc:
            if _is_connection_error(exc):
                raise RayUnavailable(
                    f"Ray dashboard at {self.address}: following logs failed: {exc}"
                ) from exc
            raise

    # -- cluster -------------------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """Every node the cluster knows, alive or dead (the state API's /api/v0/nodes, detailed)."""

        def go(client: Any) -> list[dict[str, Any]]:
            response = client._do_request("GET", "/api/v0/nodes?limit=10000&detail=true")
            if response.status_code in (401, 403):
                raise RayAuthError(missing_token_message(self.address) + " (or the token sent is wrong)")
            if response.status_code != 200:
                raise RayUnavailable(
                    f"Ray dashboard at {self.address}: listing nodes answered {response.status_code}"
                )
            return response.json()["data"]["result"]["result"]

        return self._call("listing nodes", go)

    def capacity(self) -> Capacity:
        """GPUs and CPUs of the cluster's live nodes. The GPUs are the resource named `gpu_resource`
        (LBGAT_GPU_RESOURCE: "GPU", or a custom resource that stands for one)."""
        alive = [n for n in self.nodes() if n.get("state") == "ALIVE"]
        totals = [n.get("resources_total") or {} for n in alive]
        return Capacity(
            gpus=sum(float(t.get(self.gpu_resource, 0)) for t in totals),
            cpus=sum(float(t.get("CPU", 0)) for t in totals),
            nodes=len(alive),
            gpu_resource=self.gpu_resource,
            has_gpu_resource=any(self.gpu_resource in t for t in totals),
        )

    def check(self) -> None:
        self.capacity()


def _unavailable(message: str, exc: BaseException) -> RayUnavailable:
    return RayAuthError(message) if is_auth_error(exc) else RayUnavailable(message)


def _explain(address: str, exc: BaseException) -> str:
    if is_auth_error(exc):
        return missing_token_message(address) + " (or the token sent is not this cluster's)"
    return f"Ray dashboard at {address} is not reachable: {exc}"


def _is_connection_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(
        names
        & {
            "ConnectionError",
            "ConnectTimeout",
            "ReadTimeout",
            "ClientConnectorError",
            "MaxRetryError",
            "NewConnectionError",
            "ConnectionRefusedError",
        }
    )


def _chain(exc: BaseException) -> list[BaseException]:
    out = []
    seen: BaseException | None = exc
    while seen is not None and len(out) < 10:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out
