"""Stop signals for processes that own a local Ray head (`lbgat serve`, the quickstart).

Python's defaults let SIGTERM and SIGHUP kill the process on the spot, so a `finally` that stops the
local Ray never runs; systemd, Docker and Kubernetes stop services with SIGTERM, and closing a
terminal sends SIGHUP. Inside `StopSignals`, the first SIGINT, SIGTERM or SIGHUP raises `Stopped` in
the main thread, so every `finally` runs; once stopping has begun (by a signal or by `begin()`),
further signals are logged and ignored, so a second Ctrl-C or an impatient `kill` does not cut the
cleanup short and leave the head's processes behind.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger("service.shutdown")

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM) + (
    (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()
)


class Stopped(BaseException):
    """A stop signal arrived; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopSignals:
    """Context manager: install the handlers on entry (main thread only), restore them on exit."""

    def __init__(self) -> None:
        self.stopping = False
        self._originals: dict[int, Any] = {}

    def begin(self) -> None:
        """Cleanup has started: from now on stop signals are ignored until the context ends."""
        self.stopping = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            print(
                f"{signal.Signals(signum).name} received while stopping; finishing the cleanup first",
                file=sys.stderr,
                flush=True,
            )
            return
        self.stopping = True
        raise Stopped(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._originals = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._originals.items():
            signal.signal(sig, handler)
        self._originals = {}
