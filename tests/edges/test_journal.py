"""carod.edges.journal on its own: states, outbox, expiry, persistence across reopen, group commit."""

from __future__ import annotations

import asyncio
import threading
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


async def test_the_writes_queued_while_the_thread_is_busy_share_one_commit(tmp_path: Path) -> None:
    journal = await opened(tmp_path)
    busy = threading.Event()
    blocked = asyncio.ensure_future(journal._call(busy.wait, writes=False))  # the journal thread is busy
    before = journal.commits
    starts = [asyncio.ensure_future(journal.start_attempt(f"m{i}", "/box", reply_to="q")) for i in range(20)]
    await asyncio.sleep(0)  # every start is queued behind the busy call
    busy.set()
    assert await asyncio.gather(*starts) == [1] * 20
    await blocked
    assert journal.commits - before == 1, "20 jobs' starts in one commit"
    records = [await journal.get(f"m{i}") for i in range(20)]
    assert all(r is not None and r.state == JobState.RUNNING and r.reply_to == "q" for r in records)
    await journal.close()


async def test_a_write_that_fails_in_a_shared_commit_undoes_only_itself(tmp_path: Path) -> None:
    journal = await opened(tmp_path)
    busy = threading.Event()
    blocked = asyncio.ensure_future(journal._call(busy.wait, writes=False))
    good = asyncio.ensure_future(journal.start_attempt("good", "/box", reply_to="q"))
    bad = asyncio.ensure_future(journal.add_reply("bad", "", "q", {"x": object()}, None, final=True, reply_to="q"))
    await asyncio.sleep(0)
    busy.set()
    await blocked
    assert await good == 1
    with pytest.raises(TypeError):
        await bad
    assert await journal.get("bad") is None, "its row, made in the same call, is undone with it"
    await journal.close()


async def test_writes_not_waited_for_are_in_the_next_commit_and_on_disk_after_close(tmp_path: Path) -> None:
    journal = await opened(tmp_path)
    assert await journal.start_attempt("m1", "/box", reply_to="q", sequence=1) == 1
    await journal.set_pid("m1", 1234, "99")
    update = await journal.add_reply("m1", "", "q", {"JobStatus": 2, "Sequence": 1}, None, final=False, wait=False)
    await journal.confirmed(update.id, "m1", final=False)
    result = tmp_path / "r.zip"
    result.write_bytes(b"zip")
    final = await journal.add_reply("m1", "", "q", {"JobStatus": 4, "Sequence": 2}, str(result), final=True)
    assert final.id == update.id + 1
    await journal.confirmed(final.id, "m1", final=True)
    await journal.close()  # no flush: closing commits what is queued
    assert not result.exists(), "the result file goes once the confirmed reply is committed"
    journal = await opened(tmp_path)
    record = await journal.get("m1")
    assert record is not None and (record.state, record.pid, record.sequence) == (JobState.REPLIED, 1234, 2)
    assert await journal.pending_count() == 0
    again = await journal.add_reply("m2", "", "q", {"Sequence": 1}, None, final=True, reply_to="q")
    assert again.id > final.id, "an outbox id is never given twice"
    await journal.close()


async def test_a_job_answered_before_it_ran_gets_its_row_with_its_final_reply(tmp_path: Path) -> None:
    journal = await opened(tmp_path)
    await journal.add_reply("held", "", "q", {"JobStatus": 5, "Sequence": 1}, None, final=True, reply_to="q")
    record = await journal.get("held")
    assert record is not None and (record.state, record.reply_to, record.attempts) == (JobState.FINISHED, "q", 0)
    assert await journal.count_failure("failed", reply_to="q") == 1, "a failure before the start is counted"
    await journal.close()


async def test_chirped_attributes_and_their_sequence_survive_a_reopen(tmp_path: Path) -> None:
    journal = await opened(tmp_path)
    await journal.start_attempt("m1", "/box", reply_to="q", sequence=1)
    record = await journal.get("m1")
    assert record is not None and record.chirped is None
    await journal.set_chirped("m1", {"ServiceEndpoint": '"h:1"', "B": "2"}, sequence=7)
    await journal.close()
    journal = await opened(tmp_path)
    record = await journal.get("m1")
    assert record is not None and record.sequence == 7
    assert record.chirped is not None and list(record.chirped.items()) == [("ServiceEndpoint", '"h:1"'), ("B", "2")]
    await journal.set_chirped("m1", {}, sequence=3)  # a Sequence never goes back
    record = await journal.get("m1")
    assert record is not None and record.sequence == 7 and record.chirped is None
    await journal.close()
