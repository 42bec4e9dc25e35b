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

A job's ``received`` row is given to the caller before it is committed
(:meth:`Journal.receive`): nothing relies on it being on disk, and the commit
that starts the job (:meth:`Journal.start_attempt`) or answers it
(:meth:`Journal.add_reply` of a final reply) makes it again if it was lost.

**Group commit.** Every call is queued, in order, for the journal thread,
which runs all the calls queued while it was busy in one transaction (each
in a savepoint of its own, so one failing call does not undo the others)
and commits once. A call's result is given after that commit, so what a
caller waits for is on disk. Some writes are not waited for
(:meth:`Journal.set_pid`, :meth:`Journal.confirmed`, an update's
:meth:`Journal.add_reply` with ``wait=False``): they are in the next commit,
before any later call's result (calls run in order) and before
:meth:`Journal.close` returns. ``commits`` and ``waited_writes`` count what
the journal did (bench.steps prints them per job).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from carod.edges.records import JobRecord, OutboxEntry, entry, record
from carod.errors import CarodError
from carod.states import JOURNALED, JobState

_T = TypeVar("_T")

log = logging.getLogger("carod.journal")

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
CREATE TABLE IF NOT EXISTS held (
    message_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    record TEXT NOT NULL,
    created REAL NOT NULL
);
"""
#: Columns added since the first schema: (table, column, definition).
_ADDED_COLUMNS = (("jobs", "reply_to", "TEXT"), ("jobs", "chirped", "TEXT"))
_JOB_COLUMNS = "message_id, state, attempts, sequence, sandbox, pid, pid_start, reply_to, created, updated, chirped"
_OUTBOX_COLUMNS = "id, message_id, exchange, routing_key, headers, body_path, final"


class JournalError(CarodError):
    """The journal cannot be read or written (disk full, unwritable state_dir)."""


@dataclass
class _Call:
    """One queued call: run in the journal thread; its result goes to ``future`` (None: nobody waits)."""

    fn: Callable[[], Any]
    writes: bool
    future: asyncio.Future[Any] | None
    #: run in the journal thread after the commit that made this call's writes durable
    after_commit: Callable[[Any], None] | None = None
    #: run outside any transaction, in a batch of its own (opening and closing the database)
    alone: bool = False
    #: its result is given as soon as it has run, before the batch commits (its writes may be lost
    #: with a failed commit: only for a write that nothing relies on until a later one repeats it)
    early: bool = False


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="carod-journal")
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._queued: list[_Call] = []
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the next outbox id (given on the loop, so that a reply not waited for has its id at once)
        self._next_outbox_id = 1
        #: transactions committed
        self.commits = 0
        #: writes whose caller waited for their commit (each one a commit on the caller's path)
        self.waited_writes = 0

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
            # AUTOINCREMENT never gives an id twice, even after the row is deleted: neither does this.
            used = db.execute(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
                " coalesce((SELECT max(id) FROM outbox), 0))"
            ).fetchone()[0]
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc}") from exc
        self._next_outbox_id = int(used) + 1
        self._db = db

    async def open(self) -> None:
        await self._call(self.open_sync, alone=True)

    async def close(self) -> None:
        """Close after every call queued before (writes not waited for included) is committed."""

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._call(close, alone=True)
        self._executor.shutdown(wait=True)

    async def flush(self) -> None:
        """Until every write queued before is committed."""
        await self._call(lambda: None)

    def _submit(
        self,
        fn: Callable[[], _T],
        *,
        writes: bool,
        wait: bool,
        after_commit: Callable[[_T], None] | None = None,
        alone: bool = False,
        early: bool = False,
    ) -> asyncio.Future[_T] | None:
        """Queue ``fn`` for the journal thread (in order); its future, or None when nobody waits for it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] | None = loop.create_future() if wait else None
        if wait and writes and not early:
            self.waited_writes += 1
        with self._lock:
            self._loop = loop
            self._queued.append(_Call(fn, writes, future, after_commit, alone, early))
            if self._draining:
                return future
            self._draining = True
        self._executor.submit(self._drain)
        return future

    async def _call(self, fn: Callable[..., _T], *args: Any, writes: bool = True, alone: bool = False) -> _T:
        future = self._submit(functools.partial(fn, *args), writes=writes and not alone, wait=True, alone=alone)
        if future is None:  # pragma: no cover - wait=True always gives one
            raise JournalError("the journal lost a call")
        return await future

    def _later(self, fn: Callable[..., _T], *args: Any, after_commit: Callable[[_T], None] | None = None) -> None:
        """A write nobody waits for: in the next commit (a failure is logged)."""
        self._submit(functools.partial(fn, *args), writes=True, wait=False, after_commit=after_commit)

    def _drain(self) -> None:
        """In the journal thread: run what is queued, a batch per transaction, until nothing is."""
        while True:
            with self._lock:
                if not self._queued:
                    self._draining = False
                    return
                # Up to the first call that must run alone (or just that one).
                cut = next((i for i, call in enumerate(self._queued) if call.alone), len(self._queued))
                cut = max(cut, 1)
                calls, self._queued = self._queued[:cut], self._queued[cut:]
                loop = self._loop
            try:
                results = self._batch(calls)
            except Exception as exc:  # never leave the callers waiting
                results = [(call, None, exc) for call in calls]
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                    loop.call_soon_threadsafe(_deliver, results)

    def _batch(self, calls: list[_Call]) -> list[tuple[_Call, Any, BaseException | None]]:
        """Run ``calls`` in one transaction, each in a savepoint; commit once."""
        writes = self._db is not None and any(call.writes and not call.alone for call in calls)
        results: list[tuple[_Call, Any, BaseException | None]] = []
        try:
            if writes:
                self._run("BEGIN IMMEDIATE")
        except JournalError as exc:
            return [(call, None, exc) for call in calls]
        for call in calls:
            try:
                with self._transaction() if writes else contextlib.nullcontext():
                    results.append((call, call.fn(), None))
            except Exception as exc:  # handed to its caller, as run_in_executor would
                results.append((call, None, exc))
            if call.early and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                    self._loop.call_soon_threadsafe(_deliver, [results.pop()])
        if writes:
            try:
                self._run("COMMIT")
            except JournalError as exc:
                with contextlib.suppress(sqlite3.Error, JournalError):
                    self._conn().execute("ROLLBACK")
                return [(call, None, exc) for call, _value, _error in results]
            self.commits += 1
        for call, value, error in results:
            if error is None and call.after_commit is not None:
                try:
                    call.after_commit(value)
                except OSError as exc:
                    log.warning("journal: after a commit: %s", exc)
        return results

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
        """All or nothing (a savepoint: inside the batch's transaction, or a transaction of its own)."""
        self._run("SAVEPOINT call")
        try:
            yield
        except BaseException:
            self._run("ROLLBACK TO call")
            self._run("RELEASE call")
            raise
        self._run("RELEASE call")

    async def call(self, fn: Callable[[], _T], *, writes: bool = True) -> _T:
        """Run ``fn`` in the journal thread, in a transaction (a savepoint) of its own; its result after the commit.

        For the journal's other users (carod.node.holding): ``fn`` reads and writes with :meth:`execute`.
        """

        def run() -> _T:
            with self._transaction():
                return fn()

        return await self._call(run, writes=writes)

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement, from a function given to :meth:`call` (in the journal thread); its rows."""
        return self._run(sql, args).fetchall()

    # ------------------------------------------------------------ jobs

    def _get(self, message_id: str) -> JobRecord | None:
        row = self._run(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE message_id = ?", (message_id,)).fetchone()  # noqa: S608
        return record(row) if row else None

    async def get(self, message_id: str) -> JobRecord | None:
        return await self._call(self._get, message_id, writes=False)

    def _insert(self, message_id: str, reply_to: str | None) -> bool:
        """The job's row, made as ``received`` (with ``reply_to``) unless it exists. True when made."""
        now = time.time()
        cur = self._run(
            "INSERT OR IGNORE INTO jobs (message_id, state, created, updated, reply_to) VALUES (?, ?, ?, ?, ?)",
            (message_id, JobState.RECEIVED, now, now, reply_to),
        )
        return cur.rowcount == 1

    def _receive(self, message_id: str, reply_to: str | None) -> tuple[JobRecord, bool]:
        """The job's record, created as ``received`` (with ``reply_to``) if new. Returns (record, new)."""
        new = self._insert(message_id, reply_to)
        record = self._get(message_id)
        if record is None:
            raise JournalError(f"the journal lost the record of {message_id}")
        return record, new

    async def receive(self, message_id: str, reply_to: str | None = None) -> tuple[JobRecord, bool]:
        """The job's record, made as ``received`` if new; given before its commit (not waited for).

        Nothing relies on a ``received`` row being on disk: the commit that starts the job
        (start_attempt) or answers it (add_reply of a final reply) makes the row if it was lost.
        """
        future = self._submit(
            functools.partial(self._receive, message_id, reply_to), writes=True, wait=True, early=True
        )
        if future is None:  # pragma: no cover - wait=True always gives one
            raise JournalError("the journal lost a call")
        return await future

    def _set(self, message_id: str, **fields: Any) -> None:
        fields["updated"] = time.time()
        names = ", ".join(f"{name} = ?" for name in fields)
        self._run(f"UPDATE jobs SET {names} WHERE message_id = ?", (*fields.values(), message_id))  # noqa: S608

    async def start_attempt(
        self, message_id: str, sandbox: str, *, reply_to: str | None = None, sequence: int = 0
    ) -> int:
        """Count a new run; returns its number (JobRunCount). One commit, the row made if new.

        ``sequence``: the Sequence of the reply the run sends first, kept now so that a reply
        published before its own row is committed is never numbered again after a crash.
        """

        def start() -> int:
            with self._transaction():
                if reply_to is not None:
                    self._insert(message_id, reply_to)
                self._run(
                    "UPDATE jobs SET attempts = attempts + 1, state = ?, sandbox = ?, pid = NULL, pid_start = NULL,"
                    " sequence = max(sequence, ?), updated = ? WHERE message_id = ?",
                    (JobState.RUNNING, sandbox, sequence, time.time(), message_id),
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
            lambda: self._run("SELECT body_path FROM outbox WHERE confirmed = 0 AND body_path IS NOT NULL").fetchall(),
            writes=False,
        )
        return {row[0] for row in rows}

    async def count_failure(self, message_id: str, *, reply_to: str | None = None) -> int:
        """carod failed while handling the job: count it as an attempt (the row made if new). Returns attempts."""

        def count() -> int:
            with self._transaction():
                if reply_to is not None:
                    self._insert(message_id, reply_to)
                self._run(
                    "UPDATE jobs SET attempts = attempts + 1, updated = ? WHERE message_id = ?",
                    (time.time(), message_id),
                )
                record = self._get(message_id)
            return record.attempts if record else 0

        return await self._call(count)

    async def set_pid(self, message_id: str, pid: int, pid_start: str | None) -> None:
        """Record the run's pid, in the next commit; not waited for.

        Recovery finds a crashed run's processes by its cgroup (named after the
        sandbox, written by start_attempt) and kills every earlier carod's
        leftovers at start; the pid is what it has besides.
        """
        self._later(lambda: self._set(message_id, pid=pid, pid_start=pid_start))

    async def set_chirped(self, message_id: str, chirped: dict[str, str], *, sequence: int) -> None:
        """The job's chirped attributes, and the Sequence of the update that carries them (waited for)."""
        text = json.dumps(chirped)

        def store() -> None:
            self._run(
                "UPDATE jobs SET chirped = ?, sequence = max(sequence, ?), updated = ? WHERE message_id = ?",
                (text, sequence, time.time(), message_id),
            )

        await self._call(store)

    async def set_state(self, message_id: str, state: JobState) -> None:
        if state not in JOURNALED:
            raise ValueError(f"{state!r} is not a state the journal keeps")
        await self._call(lambda: self._set(message_id, state=state))

    async def interrupted(self) -> list[JobRecord]:
        """Jobs that were running when carod last stopped without finishing them."""

        def find() -> list[JobRecord]:
            rows = self._run(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ?", (JobState.RUNNING,)).fetchall()  # noqa: S608
            return [record(row) for row in rows]

        return await self._call(find, writes=False)

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
        reply_to: str | None = None,
        wait: bool = True,
    ) -> OutboxEntry:
        """Record a reply before it is published; a final reply finishes the job (its row made if new,
        with ``reply_to``).

        ``wait=False``: not waited for, in the next commit (the caller has made its Sequence durable
        already, e.g. with start_attempt); the entry's id is given at once either way.
        """
        entry_id = self._next_outbox_id
        self._next_outbox_id += 1
        entry = OutboxEntry(entry_id, message_id, exchange, routing_key, headers, body_path, final)

        def add() -> OutboxEntry:
            with self._transaction():
                if final and reply_to is not None:
                    self._insert(message_id, reply_to)
                self._run(
                    "INSERT INTO outbox (id, message_id, exchange, routing_key, headers, body_path, final, created)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        entry_id,
                        message_id,
                        exchange,
                        routing_key,
                        json.dumps(headers),
                        body_path,
                        int(final),
                        time.time(),
                    ),
                )
                fields: dict[str, Any] = {"sequence": headers.get("Sequence", 0)}
                if final:
                    fields["state"] = JobState.FINISHED
                self._set(message_id, **fields)
            return entry

        if not wait:
            self._later(add)
            return entry
        return await self._call(add)

    async def confirmed(self, entry_id: int, message_id: str, *, final: bool) -> None:
        """The broker has this reply (or it was given up): in the next commit, not waited for.

        A confirmed final reply means ``replied``; its result file is deleted once that is committed
        (before, a redelivery would be answered from it).
        """

        def mark() -> str | None:
            with self._transaction():
                row = self._run("SELECT body_path FROM outbox WHERE id = ?", (entry_id,)).fetchone()
                self._run("UPDATE outbox SET confirmed = 1 WHERE id = ?", (entry_id,))
                if final:
                    self._set(message_id, state=JobState.REPLIED)
            return row[0] if row and final else None

        def remove(body_path: str | None) -> None:
            if body_path:
                Path(body_path).unlink(missing_ok=True)

        self._later(mark, after_commit=remove)

    async def pending_final(self, message_id: str) -> OutboxEntry | None:
        """The job's final reply if it was recorded but never confirmed."""

        def find() -> OutboxEntry | None:
            row = self._run(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox"  # noqa: S608
                " WHERE message_id = ? AND final = 1 AND confirmed = 0 ORDER BY id DESC LIMIT 1",
                (message_id,),
            ).fetchone()
            return entry(row) if row else None

        return await self._call(find, writes=False)

    async def last_final(self, message_id: str) -> OutboxEntry | None:
        """The job's last final reply, confirmed or not (kept until the row expires; its result file is not)."""

        def find() -> OutboxEntry | None:
            row = self._run(
                f"SELECT {_OUTBOX_COLUMNS} FROM outbox"  # noqa: S608
                " WHERE message_id = ? AND final = 1 ORDER BY id DESC LIMIT 1",
                (message_id,),
            ).fetchone()
            return entry(row) if row else None

        return await self._call(find, writes=False)

    async def pending_count(self) -> int:
        return await self._call(
            lambda: int(self._run("SELECT count(*) FROM outbox WHERE confirmed = 0").fetchone()[0]), writes=False
        )

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


def _deliver(results: list[tuple[_Call, Any, BaseException | None]]) -> None:
    """On the loop: each waiting caller gets its result; a failed write nobody waited for is logged."""
    for call, value, error in results:
        if call.future is None:
            if error is not None:
                log.error("journal: a write that nobody waited for failed: %s", error)
        elif call.future.cancelled():
            continue
        elif error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result(value)
