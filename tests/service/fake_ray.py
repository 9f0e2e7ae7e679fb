"""A fake of service.ray_jobs.RayJobs for scheduler tests that script Ray's answers."""

from __future__ import annotations

from service.ray_jobs import Capacity, RayJobState, RayUnavailable


class FakeRay:
    """The Job API as the scheduler uses it: submitted jobs run until the test ends or stops them."""

    def __init__(self, capacity: Capacity) -> None:
        self._capacity = capacity
        self.status: dict[str, str] = {}
        self.env: dict[str, dict[str, str]] = {}
        self.stopped: list[str] = []
        self.exit_codes: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []  # ("submit" | "stop", submission id), in call order
        self.refuse: set[str] = set()  # submission ids whose next submission fails (Ray unreachable)
        self.address = "fake"

    def submit(self, *, submission_id, entrypoint, env_vars, metadata) -> str:
        if submission_id in self.refuse:
            self.refuse.discard(submission_id)
            raise RayUnavailable(f"Ray dashboard at fake: submitting {submission_id} failed")
        self.calls.append(("submit", submission_id))
        self.status[submission_id] = "RUNNING"
        self.env[submission_id] = env_vars
        return submission_id

    def state(self, submission_id: str) -> RayJobState | None:
        status = self.status.get(submission_id)
        if status is None:
            return None
        return RayJobState(status, None, None, None, self.exit_codes.get(submission_id))

    def stop(self, submission_id: str) -> bool:
        self.calls.append(("stop", submission_id))
        self.stopped.append(submission_id)
        return True

    def logs(self, submission_id: str) -> str:
        return ""

    def capacity(self) -> Capacity:
        return self._capacity
