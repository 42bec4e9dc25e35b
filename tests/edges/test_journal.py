"""carod.edges.journal on its own: states, outbox, expiry, persistence across reopen."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from carod.edges.journal import Journal, JournalError
from carod.states import JobState


async def opened(path: Path) -> Journal:
    journal = Journal(path / "journal.sqlite3")
    await journal.open()
    return journal


async def test_job_lifecycle_and_outbox(tmp_path: Path) -> None:
    journal = await opened(tmp_path)
    record, new = await journal.receive("m1")
    assert new and record.state == JobState.RECEIVED and record.attempts == 0
    _, again = await journal.receive("m1")
    assert not again
    assert await journal.start_attempt("m1", "/box") == 1
    await journal.set_pid("m1", 1234, "99")
    running = await journal.interrupted()
    assert [(r.message_id, r.state, r.pid, r.pid_start, r.sandbox) for r in running] == [
        ("m1", JobState.RUNNING, 1234, "99", "/box")
    ]
    first = (await journal.add_reply("m1", "", "q", {"JobStatus": 2, "Sequence": 1}, None, final=False)).id
    await journal.confirmed(first, "m1", final=False)
    final = (await journal.add_reply("m1", "ex", "key", {"JobStatus": 4, "Sequence": 2}, "/r.zip", final=True)).id
    record = await journal.get("m1")
    assert record is not None and record.state == JobState.FINISHED and record.sequence == 2
    pending = await journal.pending_final("m1")
    assert pending is not None and pending.id == final and pending.headers["JobStatus"] == 4
    assert (pending.exchange, pending.routing_key, pending.body_path) == ("ex", "key", "/r.zip")
    assert await journal.pending_files() == {"/r.zip"}
    await journal.confirmed(final, "m1", final=True)
    record = await journal.get("m1")
    assert record is not None and record.state == JobState.REPLIED
    assert await journal.pending_final("m1") is None
    assert await journal.pending_count() == 0
    await journal.close()


async def test_the_last_final_reply_and_the_rows_times_outlive_its_confirm(tmp_path: Path) -> None:
    journal = await opened(tmp_path)
    before = time.time()
    await journal.receive("m1", "q")
    assert await journal.last_final("m1") is None
    await journal.add_reply("m1", "", "q", {"JobStatus": 2, "Sequence": 1}, None, final=False)
    first = await journal.add_reply("m1", "", "q", {"JobStatus": 4, "Sequence": 2}, "/r.zip", final=True)
    await journal.confirmed(first.id, "m1", final=True)
    last = await journal.last_final("m1")
    assert last == first, "still there once confirmed (pending_final is not)"
    assert await journal.pending_final("m1") is None
    record = await journal.get("m1")
    assert record is not None and record.reply_to == "q"
    assert record.created is not None and record.updated is not None
    assert before <= record.created <= record.updated <= time.time()
    await journal.close()


async def test_survives_reopen_and_expires(tmp_path: Path) -> None:
    journal = await opened(tmp_path)
    await journal.receive("old")
    await journal.add_reply("old", "", "q", {"Sequence": 1}, "/old.zip", final=True)
    await journal.receive("live")
    await journal.start_attempt("live", "/box")
    await journal.receive("stale")
    await journal.set_state("stale", JobState.INTERRUPTED)
    await journal.close()
    journal = await opened(tmp_path)
    old = await journal.get("old")
    assert old is not None and old.state == JobState.FINISHED
    time.sleep(0.01)
    assert await journal.expire(0.001) == ["/old.zip"]
    assert await journal.get("old") is None
    assert await journal.get("stale") is None  # an interrupted run answered elsewhere is forgotten too
    assert await journal.get("live") is not None  # running: kept
    await journal.close()


async def test_forget_and_count_failure(tmp_path: Path) -> None:
    journal = await opened(tmp_path)
    await journal.receive("m")
    assert await journal.count_failure("m") == 1
    assert await journal.count_failure("m") == 2
    await journal.forget("m")
    assert await journal.get("m") is None
    await journal.close()


async def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "no" / "such" / "dir" / "journal.sqlite3")
    with pytest.raises(JournalError, match="cannot open the journal"):
        await journal.open()
    await journal.close()
