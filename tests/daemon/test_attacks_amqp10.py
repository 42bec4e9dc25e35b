"""Issue 18 review: forged AMQP 1.0 sections from a plain 0-9-1 client, against a real carod.

Any 0-9-1 client can send RabbitMQ 3.x's ``x-amqp-1.0-*`` headers and a body of
1.0 sections. Whatever they hold, carod must answer (Held, with a reason a
person reads) or log, never stall its event loop, and go on with the next job.
The node runs in the test's own event loop (tests.helpers.start_node), so a
stall shows as a gap in a ticker running beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from proton import Data, ulong

from tests.helpers import (
    FINAL_STATUSES,
    RunningNode,
    Submitter,
    amqp10_app_properties,
    q,
    queue_depth,
    seed_runs,
    unique,
)

SEED = {"Cmd": q("/bin/echo"), "Arguments": q("Hello Grid!"), "Out": q("job.out")}
#: What a stall of the event loop may be here at most (carod's budget is 20 ms p99; this is generous).
MAX_GAP_S = 0.5


def properties(message_id: str | None = None, reply_to: str | None = None) -> bytearray:
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(0x73)
    data.put_list()
    data.enter()
    data.put_object(message_id)
    for _ in range(3):
        data.put_null()
    data.put_object(reply_to)
    data.exit()
    data.exit()
    return bytearray(data.encode())


@contextlib.asynccontextmanager
async def gaps() -> AsyncIterator[list[float]]:
    """The longest the event loop went without running this ticker, while the block runs: got[0]."""
    got = [0.0]

    async def tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            got[0] = max(got[0], now - last)
            last = now

    task = asyncio.create_task(tick())
    try:
        yield got
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_body_of_many_tiny_1_0_sections_does_not_stall_the_event_loop(
    node: RunningNode, submitter: Submitter, queue: str
) -> None:
    """1 MiB of empty amqp-value sections (4 bytes each): decode_body copies the rest of the body for each one."""
    body = b"\x00\x53\x77\x40" * (1024 * 1024 // 4)
    async with gaps() as gap:
        mid = await submitter.send({"x-amqp-1.0-app-properties": amqp10_app_properties(SEED)}, body=body)
        replies = await submitter.wait_final(mid, timeout_s=60)
    assert replies[-1].status in FINAL_STATUSES
    assert gap[0] < MAX_GAP_S, f"carod's event loop stalled for {gap[0]:.1f} s decoding one message's body"
    await seed_runs(submitter)
    assert await queue_depth(queue) == 0


class Present(str):
    """An empty 0-9-1 message_id that aiormq sends as it is (it fills in a falsy one with a uuid)."""

    def __bool__(self) -> bool:
        return True


async def first_word_on(caplog: pytest.LogCaptureFixture, needle: str, timeout_s: float = 30) -> logging.LogRecord:
    """The first WARNING-or-worse record carod logs about the job whose label contains ``needle``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.levelno >= logging.WARNING and needle in record.getMessage():
                return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"carod said nothing about {needle!r} in {timeout_s} s")


async def test_a_1_0_message_id_longer_than_a_short_string_is_answered_once(
    node: RunningNode, submitter: Submitter, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1.0 message-id may be longer than 255 bytes (which the plugin then leaves out of the 0-9-1 message_id).

    carod takes it from x-amqp-1.0-properties as the job's id and its replies' correlation_id, which
    AMQP 0-9-1 cannot carry: today every reply fails to encode (TypeError), the job is run again and
    again, and the message loops through "internal error" and requeues hundreds of times a second.
    """
    caplog.set_level(logging.INFO)
    long_id = "m" * 300
    message = aio_pika.Message(
        b"",
        headers={
            "x-amqp-1.0-app-properties": amqp10_app_properties(SEED),
            "x-amqp-1.0-properties": properties(long_id),
        },
        reply_to=submitter.reply_queue.name,
    )
    message.message_id = Present("")  # set after: aio_pika.Message would make it a plain (falsy) str
    await submitter.channel.default_exchange.publish(message, queue)
    await seed_runs(submitter)
    errors = [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:3]
    runs = [r for r in caplog.records if long_id[:40] in r.getMessage() and "state=running" in r.getMessage()]
    assert len(runs) <= 1


async def test_a_1_0_reply_to_longer_than_a_short_string_is_refused_not_looped(
    node: RunningNode, submitter: Submitter, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A 1.0 reply-to naming a queue of 300 characters: no 0-9-1 routing key holds it. Refused, logged, acked.

    Today the publish raises ValueError ("Routing key too long"), which is an internal error: requeued, run
    again, forever.
    """
    caplog.set_level(logging.WARNING)
    label = unique("long-reply-to")
    headers = {
        "x-amqp-1.0-app-properties": amqp10_app_properties(SEED),
        "x-amqp-1.0-properties": properties(None, "/queue/" + "r" * 300),
    }
    await submitter.send(headers, message_id=label, reply_to=None)
    record = await first_word_on(caplog, label)
    assert "internal error" not in record.getMessage(), record.getMessage()
    await seed_runs(submitter)
    errors = [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert await queue_depth(queue) == 0


async def test_a_1_0_ulong_attribute_beyond_a_classad_integer_is_held_at_once(
    node: RunningNode, submitter: Submitter, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An AMQP 1.0 ulong above 2**63-1 (which no 0-9-1 header holds): classad2 raises SystemError on it.

    That is not a JobHeld, so today it is an internal error: requeued and retried before it is held.
    """
    caplog.set_level(logging.WARNING)
    headers = {"x-amqp-1.0-app-properties": amqp10_app_properties({**SEED, "Big": ulong(2**64 - 1)})}
    replies = await submitter.run(headers, timeout_s=60)
    assert [r.status for r in replies] == [5]
    assert "Big" in str(replies[-1].headers["HoldReason"]), replies[-1].headers["HoldReason"]
    errors = [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:3]
    await seed_runs(submitter)
    assert await queue_depth(queue) == 0
