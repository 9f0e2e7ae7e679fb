"""Polling for the tests that watch real servers change state (jobs, Ray, the store)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(fn: Callable[[], T], *, timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll `fn` until it returns a truthy value; fail naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")
