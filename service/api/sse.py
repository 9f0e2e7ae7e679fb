"""Server-sent events of one experiment: its `state` and `metric` events as the events table records them.

Each event's `id:` is the Event row id, so a client that reconnects with `Last-Event-ID` (browsers do it
by themselves) or `?after=` continues where it stopped. The database is polled (every `poll_s`) in a
worker thread, never on the event loop; comment lines keep idle connections open through proxies; an
`end` event closes the stream once the job is terminal and every event up to that point has been sent.
Starlette cancels the generator when the client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api_schemas.jobs import JobState
from service.db.models import Event, Experiment

POLL_S = 0.5
HEARTBEAT_S = 15.0
BATCH = 500  # events per poll; a longer backlog is sent over several polls without pausing
RETRY_MS = 2000  # how long a browser waits before reconnecting


def format_event(event: str, data: Any, event_id: int | None = None) -> str:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {event}")
    # json.dumps never emits a raw newline, so the payload is one `data:` line.
    lines.append(f"data: {json.dumps(data, separators=(',', ':'), default=str)}")
    return "\n".join(lines) + "\n\n"


def _poll(
    sessions: sessionmaker[Session], experiment_id: str, after: int
) -> tuple[str | None, list[tuple[int, str, str | None, dict[str, Any], str]]]:
    """(state, events after `after`). The state is read first: when it is terminal, every event up to
    the terminal transition committed with it (or before), so the events read next include them all."""
    with sessions() as session:
        state = session.scalar(select(Experiment.state).where(Experiment.id == experiment_id))
        rows = session.execute(
            select(Event.id, Event.kind, Event.trial, Event.data, Event.at)
            .where(Event.experiment_id == experiment_id, Event.id > after)
            .order_by(Event.id)
            .limit(BATCH)
        ).all()
    return state, [(r.id, r.kind, r.trial, r.data, r.at.isoformat()) for r in rows]


def _payload(kind: str, trial: str | None, data: dict[str, Any], at: str) -> dict[str, Any]:
    if kind == "metric":
        return {"trial": trial, **data, "at": at}
    return {**data, "at": at}


async def experiment_events(
    sessions: sessionmaker[Session],
    experiment_id: str,
    *,
    after: int = 0,
    poll_s: float = POLL_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    last_write = time.monotonic()
    while True:
        state, events = await run_in_threadpool(_poll, sessions, experiment_id, after)
        for event_id, kind, trial, data, at in events:
            yield format_event(kind, _payload(kind, trial, data, at), event_id)
            after = event_id
        if events:
            last_write = time.monotonic()
        if len(events) == BATCH:
            continue  # more backlog: no pause
        if state is None:
            yield format_event("end", {"state": None, "reason": "experiment deleted"}, after or None)
            return
        if JobState(state).terminal:
            yield format_event("end", {"state": state}, after or None)
            return
        if time.monotonic() - last_write >= heartbeat_s:
            yield ": keep-alive\n\n"
            last_write = time.monotonic()
        await asyncio.sleep(poll_s)
