"""The journal's work on a job's path (issue 16): at most two commits a job waits for, and a crash
between the final reply's journaling and its commit with the ack still gives one final reply."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from carod.edges import delivery as delivery_edge
from carod.states import JobState
from tests.helpers import SEED, RunningNode, Submitter, start_node


async def test_a_job_waits_for_at_most_two_journal_commits(node: RunningNode, submitter: Submitter) -> None:
    journal = node.server.journal
    assert journal is not None
    await submitter.run(SEED)  # warm
    before = journal.waited_writes
    jobs = 5
    for _ in range(jobs):
        got = await submitter.run(SEED)
        assert [r.status for r in got] == [2, 4]
    assert (journal.waited_writes - before) / jobs <= 2


async def test_killed_after_journaling_the_final_reply_the_redelivery_is_answered_once_not_run_again(
    queue: str, base: Path, submitter: Submitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    never = asyncio.Event()

    async def hang(self: delivery_edge.Delivery, *args: Any, **kwargs: Any) -> None:
        await never.wait()  # carod dies before the reply and the ack commit

    monkeypatch.setattr(delivery_edge.Delivery, "reply_and_ack", hang)
    first = await start_node(queue, base)
    mid = await submitter.send(SEED)
    assert mid is not None
    await submitter.wait_running(mid)
    journal = first.server.journal
    assert journal is not None

    async def finished() -> None:
        while (record := await journal.get(mid)) is None or record.state != JobState.FINISHED:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(finished(), 20)
    first.server.handle_exit(signal.SIGINT)
    first.server.handle_exit(signal.SIGINT)  # at once: the message goes back to the queue
    await first.task
    monkeypatch.undo()
    second = await start_node(queue, base)
    try:
        got = await submitter.wait_final(mid, timeout_s=30)
        await submitter.sync()
    finally:
        await second.stop()
    statuses = [r.status for r in submitter.replies[mid]]
    assert statuses == [2, 4], "one Running reply (never run again), one final reply, from the journal"
    assert got[-1].headers["ExitCode"] == 0 and got[-1].zip_read("job.out") == b"Hello Grid!\n"
