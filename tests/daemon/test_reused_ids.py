"""Issue 18: a new job that reuses a message_id gets an answer, never silence (a real carod, a real broker).

* from another reply queue: one Held reply naming the reuse, at its own
  address; the first job's queue gets nothing more;
* from the same reply queue (a client sending it again, not a redelivery):
  the final reply again while the node has it whole, else a Held reply
  saying the id was already answered;
* the next job still runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import classad2
import pytest

from tests.helpers import RunningNode, Submitter, q, queue_depth, seed_runs

ECHO = {"Cmd": q("/bin/echo"), "Arguments": q("first job"), "Out": q("job.out")}
#: Held at once (no Cmd): a final reply with no result.
NO_CMD = {"Arguments": q("x")}


@pytest.fixture
async def other(queue: str) -> AsyncIterator[Submitter]:
    """A second submitter: its own reply queue."""
    sub = await Submitter.open(queue)
    yield sub
    await sub.close()


def literal(text: object) -> str:
    """What a header's ClassAd string literal says."""
    assert isinstance(text, str)
    value = classad2.ExprTree(text).eval()
    assert isinstance(value, str)
    return value


def counter(node: RunningNode, name: str) -> float:
    return node.server.metrics.registry.get_sample_value(f"{name}_total") or 0.0


async def finals(sub: Submitter, message_id: str, count: int, timeout_s: float = 20.0) -> list[dict[str, object]]:
    """The headers of the job's final replies, once there are ``count`` of them."""
    async with asyncio.timeout(timeout_s):
        while len(sub.finals(message_id)) < count:
            sub.arrived.clear()
            await sub.arrived.wait()
    return [reply.headers for reply in sub.finals(message_id)]


async def test_a_reused_id_from_another_reply_queue_gets_one_held_reply_naming_the_reuse(
    node: RunningNode, submitter: Submitter, other: Submitter, queue: str
) -> None:
    mid = await submitter.send(ECHO)
    assert mid is not None
    first = (await submitter.wait_final(mid))[-1]
    assert first.status == 4 and first.zip_read("job.out") == b"first job\n"
    await other.send({"Cmd": q("/bin/echo"), "Arguments": q("second job")}, message_id=mid)
    [held] = await finals(other, mid, 1)
    assert held["JobStatus"] == 5 and held["HoldReasonCode"] == 0
    reason = literal(held["HoldReason"])
    assert "already used by another job" in reason and "answered at " in reason and " UTC" in reason
    assert "journal_retention_s = 86400 s" in reason and "new message_id" in reason
    await seed_runs(submitter)
    await node.stop()  # everything it would send is confirmed before it exits
    await other.sync()
    assert [r.status for r in other.replies[mid]] == [5], "one Held reply; nothing of the first job's"
    assert other.replies[mid][0].body == b""
    await submitter.sync()
    assert len(submitter.finals(mid)) == 1, "the first job's queue gets nothing more"
    assert counter(node, "carod_jobs_reused_id") == 1
    assert counter(node, "carod_jobs_started") == 2  # the first job and the seed job; the second never ran
    assert await queue_depth(queue) == 0


async def test_sent_again_from_the_same_queue_a_job_with_a_result_is_told_it_was_answered(
    node: RunningNode, submitter: Submitter, queue: str
) -> None:
    mid = await submitter.send(ECHO)
    assert mid is not None
    await submitter.wait_final(mid)
    await submitter.send(ECHO, message_id=mid)  # a client numbering its jobs again: not a redelivery
    first, again = await finals(submitter, mid, 2)
    assert first["JobStatus"] == 4
    assert again["JobStatus"] == 5 and again["HoldReasonCode"] == 0
    assert isinstance(first["Sequence"], int) and isinstance(again["Sequence"], int)
    assert again["Sequence"] > first["Sequence"]
    reason = literal(again["HoldReason"])
    assert "already answered at " in reason and "result is no longer kept" in reason and "new message_id" in reason
    await seed_runs(submitter)
    await node.stop()
    await submitter.sync()
    assert len(submitter.finals(mid)) == 2
    assert counter(node, "carod_jobs_started") == 2  # it did not run again
    assert counter(node, "carod_jobs_reused_id") == 0
    assert await queue_depth(queue) == 0


async def test_sent_again_from_the_same_queue_a_job_without_a_result_gets_its_final_reply_again(
    node: RunningNode, submitter: Submitter, queue: str
) -> None:
    mid = await submitter.send(NO_CMD)
    assert mid is not None
    first = (await submitter.wait_final(mid))[-1]
    assert first.status == 5
    await submitter.send(NO_CMD, message_id=mid)
    _first, again = await finals(submitter, mid, 2)
    assert again == first.headers, "the stored final reply, whole"
    await seed_runs(submitter)
    await node.stop()
    await submitter.sync()
    assert len(submitter.finals(mid)) == 2
    assert counter(node, "carod_jobs_started") == 1  # only the seed job
    assert await queue_depth(queue) == 0
