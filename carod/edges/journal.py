r"""The local journal: what happened to every job, and the replies not yet confirmed.

SQLite in WAL mode at ``<state_dir>/journal.sqlite3``. All access goes
through one worker thread (so SQLite never blocks the event loop and never
sees two threads). One row per job ``message_id``:

    received -> running -> finished -> replied
                       \-> interrupted (carod stopped while it ran) -> running ...

``attempts`` counts runs started (it is the replies' ``JobRunCount``);
``sequence`` is the last reply ``Sequence`` used; ``reply_to`` is the reply
address of the first message with the ``message_id`` (a later message with
the same id and another address is not the same job: docs/protocol.md). The ``outbox`` holds every
reply until the broker confirms it; a final reply's result zip stays on disk
(``body_path``) until then, its headers until the row expires (a client that
sends the id again is answered from them: carod.node.answer). Finished records are kept for
``journal_retention_s`` so that a redelivery is recognised and never re-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from carod.errors import CarodError
from carod.states import JOURNALED, JobState

_T = TypeVar("_T")

# A row's state is one of carod.states.JOURNALED: received, running, finished (final reply
# stored), replied (final reply confirmed), interrupted (was running when carod stopped;
# its leftovers are cleaned up; it runs again when redelivered).

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    message_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    sequence INTEGER NOT NULL DEFAULT 0,
    sandbox TEXT,
    pid INTEGER,
    pid_start TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, updated);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    headers TEXT NOT NULL,
    body_path TEXT,
    final INTEGER NOT NULL,
    confirmed INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (confirmed, id);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox (message_id, id);
"""
#: Columns added since the first schema: (table, column, definition).
_ADDED_COLUMNS = (("jobs", "reply_to", "TEXT"),)
_JOB_COLUMNS = "message_id, state, attempts, sequence, sandbox, pid, pid_start, reply_to, created, updated"
_OUTBOX_COLUMNS = "id, message_id, exchange, routing_key, headers, body_path, final"


class JournalError(CarodError):
    """The journal cannot be read or written (disk full, unwritable state_dir)."""


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


def _record(row: tuple[Any, ...]) -> JobRecord:
    message_id, state, *rest = row
    return JobRecord(message_id, JobState(state), *rest)


@dataclass(frozen=True)
class OutboxEntry:
    id: int
    message_id: str
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    body_path: str | None
    final: bool


def _entry(row: tuple[Any, ...]) -> OutboxEntry:
    return OutboxEntry(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], bool(row[6]))


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carod-journal")
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------ plumbing

    def open_sync(self) -> None:
        """Open (creating) the database. Called once, in the journal thread."""
        try:
            # Private to carod (SQLite gives its -wal and -shm files the same mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.chmod(self.path, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc.strerror}") from exc
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            for table, column, definition in _ADDED_COLUMNS:
                if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc}") from exc
        self._db = db

    async def open(self) -> None:
        await self._call(self.open_sync)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._call(close)
        self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise JournalError("the journal is not open")
        return self._db

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._conn().execute(sql, args)
        except sqlite3.Error as exc:
            raise JournalError(f"journal write failed ({self.path}): {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._run("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._run("ROLLBACK")
            raise
        self._run("COMMIT")

    # ------------------------------------------------------------ jobs

    def _get(self, message_id: str) -> JobRecord | None:
        row = self._run(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE message_id = ?", (message_id,)).fetchone()  # noqa: S608
        return _record(row) if row else None

    async def get(self, message_id: str) -> JobRecord | None:
        return await self._call(self._get, message_id)

    def _receive(self, message_id: str, reply_to: str | None) -> tuple[JobRecord, bool]:
        """The job's record, created as ``received`` (with ``reply_to``) if new. Returns (record, new)."""
        now = time.time()
        cur = self._run(
            "INSERT OR IGNORE INTO jobs (message_id, state, created, updated, reply_to) VALUES (?, ?, ?, ?, ?)",
            (message_id, JobState.RECEIVED, now, now, reply_to),
        )
        record = self._get(message_id)
        if record is None:
            raise JournalError(f"the journal lost the record of {message_id}")
        return record, cur.rowcount == 1

    async def receive(self, message_id: str, reply_to: str | None = None) -> tuple[JobRecord, bool]:
        return await self._call(self._receive, message_id, reply_to)

    def _set(self, message_id: str, **fields: Any) -> None:
        fields["updated"] = time.time()
        names = ", ".join(f"{name} = ?" for name in fields)
        self._run(f"UPDATE jobs SET {names} WHERE message_id = ?", (*fields.values(), message_id))  # noqa: S608

    async def start_attempt(self, message_id: str, sandbox: str) -> int:
        """Count a new run; returns its number (JobRunCount)."""

        def start() -> int:
            self._run(
                "UPDATE jobs SET attempts = attempts + 1, state = ?, sandbox = ?, pid = NULL, pid_start = NULL,"
                " updated = ? WHERE message_id = ?",
                (JobState.RUNNING, sandbox, time.time(), message_id),
            )
            record = self._get(message_id)
            return record.attempts if record else 1

        return await self._call(start)

    async def forget(self, message_id: str) -> None:
        """Drop a job this node handed on without running it."""

        def forget() -> None:
            with self._transaction():
                self._run("DELETE FROM outbox WHERE message_id = ?", (message_id,))
                self._run("DELETE FROM jobs WHERE message_id = ?", (message_id,))

        await self._call(forget)

    async def pending_files(self) -> set[str]:
        """Result zips still needed by unconfirmed final replies."""
        rows = await self._call(
            lambda: self._run("SELECT body_path FROM outbox WHERE confirmed = 0 AND body_path IS NOT NULL").fetchall()
        )
        return {row[0] for row in rows}

    async def count_failure(self, message_id: str) -> int:
        """carod failed while handling the job: count it as an attempt. Returns attempts."""

        def count() -> int:
            self._run(
                "UPDATE jobs SET attempts = attempts + 1, updated = ? WHERE message_id = ?", (time.time(), message_id)
            )
            record = self._get(message_id)
            return record.attempts if record else 0

        return await self._call(count)

    async def set_pid(self, message_id: str, pid: int, pid_start: str | None) -> None:
        await self._call(lambda: self._set(message_id, pid=pid, pid_start=pid_start))

    async def set_state(self, message_id: str, state: JobState) -> None:
        if state not in JOURNALED:
            raise ValueError(f"{state!r} is not a state the journal keeps")
        await self._call(lambda: self._set(message_id, state=state))

    async def interrupted(self) -> list[JobRecord]:
        """Jobs that were running when carod last stopped without finishing them."""

        def find() -> list[JobRecord]:
            rows = self._run(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ?", (JobState.RUNNING,)).fetchall()  # noqa: S608
            return [_record(row) for row in rows]

        return await self._call(find)

    # ------------------------------------------------------------ outbox

    async def add_reply(
        self,
        message_id: str,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any],
        body_path: str | None,
        *,
        final: bool,
    ) -> OutboxEntry:
        """Record a reply before it is published; a final reply finishes the job."""

        def add() -> OutboxEntry:
            with self._transaction():
                cur = self._run(
                    "INSERT INTO outbox (message_id, exchange, routing_key, headers, body_path, final, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (message_id, exchange, routing_key, json.dumps(headers), body_path, int(final), time.time()),
                )
                fields: dict[str, Any] = {"sequence": headers.get("Sequence", 0)}
                if final:
                    fields["state"] = JobState.FINISHED
                self._set(message_id, **fields)
                entry_id = int(cur.lastrowid or 0)
            return OutboxEntry(entry_id, message_id, exchange, routing_key, headers, body_path, final)

        return await self._call(add)

    async def confirmed(self, entry_id: int, message_id: str, *, final: bool) -> None:
        """The broker confirmed this reply; a confirmed final reply means ``replied``."""

        def mark() -> None:
            self._run("UPDATE outbox SET confirmed = 1 WHERE id = ?", (entry_id,))
            if final:
                self._set(message_id, state=JobState.REPLIED)

        await self._call(mark)

    async def pending_final(self, message_id: str) -> OutboxEntry | None:
        """The job's final reply if it was recorded but never confirmed."""

        def find() -> OutboxEntry | None:
            row = self._run(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox"  # noqa: S608
                " WHERE message_id = ? AND final = 1 AND confirmed = 0 ORDER BY id DESC LIMIT 1",
                (message_id,),
            ).fetchone()
            return _entry(row) if row else None

        return await self._call(find)

    async def last_final(self, message_id: str) -> OutboxEntry | None:
        """The job's last final reply, confirmed or not (kept until the row expires; its result file is not)."""

        def find() -> OutboxEntry | None:
            row = self._run(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox"  # noqa: S608
                " WHERE message_id = ? AND final = 1 ORDER BY id DESC LIMIT 1",
                (message_id,),
            ).fetchone()
            return _entry(row) if row else None

        return await self._call(find)

    async def pending_count(self) -> int:
        return await self._call(lambda: int(self._run("SELECT count(*) FROM outbox WHERE confirmed = 0").fetchone()[0]))

    async def expire(self, retention_s: float) -> list[str]:
        """Forget jobs not touched for ``retention_s`` (all but running ones); returns their leftover result files."""

        def expire() -> list[str]:
            cutoff = time.time() - retention_s
            with self._transaction():
                old = [
                    row[0]
                    for row in self._run(
                        "SELECT message_id FROM jobs WHERE state != ? AND updated < ?", (JobState.RUNNING, cutoff)
                    )
                ]
                paths: list[str] = []
                for mid in old:
                    paths += [
                        r[0]
                        for r in self._run(
                            "SELECT body_path FROM outbox WHERE message_id = ? AND body_path IS NOT NULL", (mid,)
                        )
                    ]
                    self._run("DELETE FROM outbox WHERE message_id = ?", (mid,))
                    self._run("DELETE FROM jobs WHERE message_id = ?", (mid,))
            return paths

        return await self._call(expire)
