"""The journal's rows as values: a job's record and a reply waiting in the outbox (pure; no I/O).

:mod:`carod.edges.journal` reads them from SQLite with :func:`record` and :func:`entry`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from carod.states import JobState


@dataclass(frozen=True)
class JobRecord:
    message_id: str
    state: JobState
    attempts: int
    sequence: int
    sandbox: str | None
    pid: int | None
    pid_start: str | None
    #: the reply address of the first message with this id (None: recorded before carod kept it)
    reply_to: str | None = None
    #: when the row was made (the first message with this id arrived), seconds since the epoch
    created: float | None = None
    #: when the row last changed (for ``replied``: when the final reply was confirmed)
    updated: float | None = None
    #: the attributes the job chirped (name -> ClassAd text), kept across its runs (carod.node.chirp)
    chirped: dict[str, str] | None = None


def record(row: tuple[Any, ...]) -> JobRecord:
    message_id, state, attempts, sequence, sandbox, pid, pid_start, reply_to, created, updated, chirped = row
    return JobRecord(
        message_id,
        JobState(state),
        attempts,
        sequence,
        sandbox,
        pid,
        pid_start,
        reply_to,
        created,
        updated,
        chirped_attrs(chirped),
    )


def chirped_attrs(text: str | None) -> dict[str, str] | None:
    """The stored chirped attributes; None when there are none or they are not a map of text (never fails)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return None
    return value or None


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    message_id: str
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    body_path: str | None
    final: bool


def entry(row: tuple[Any, ...]) -> OutboxEntry:
    return OutboxEntry(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], bool(row[6]))
