"""Issue 14: what an unauthenticated control message (carod rm) can cost a node.

The report: 20 removals with 5 MiB message ids grew carod by 110 MiB for
24 h. Bodies over control.MAX_REQUEST_BYTES are dropped before they are
decoded, ids over 255 bytes are refused, and at most [node] max_removals
removals of jobs not on the node are remembered (oldest forgotten first).
The pure parts: tests/wire/test_control.py and tests/node/test_removals.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from carod.wire import control
from tests.helpers import BROKER_URL, RunningNode, Submitter, q, start_node, unique

SEED = {"Cmd": q("/bin/echo"), "Arguments": q("Hello Grid!"), "Out": q("job.out"), "Requirements": "TRUE"}


def rm(message_id: str, reason: str = "test") -> bytes:
    return control.encode_request(control.Request("rm", message_id, reason, "mallory"))


@pytest.fixture
async def ctlnode(queue: str, base: Path, exchange: str) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base, node={"max_removals": 5}, pool={"exchange": exchange})
    yield running
    await running.stop()


async def publish_control(exchange: str, *bodies: bytes) -> None:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        for body in bodies:
            # As carod's client sends them: with the (validated) user_id of whoever asks.
            await ex.publish(aio_pika.Message(body, user_id="guest"), routing_key=control.CONTROL_KEY)


async def until(condition: Any, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_huge_control_messages_are_dropped_unread(
    ctlnode: RunningNode, exchange: str, submitter: Submitter
) -> None:
    advertiser, node = ctlnode.server.advertiser, ctlnode.server.node
    assert advertiser is not None and node is not None
    big_id = "x" * (5 * 1024 * 1024)
    long_id = "y" * 256  # just over AMQP's limit: cannot name a job
    await publish_control(exchange, *([rm(big_id)] * 20), rm(long_id), rm("marker"))
    await until(lambda: node.removals.get("marker", time.monotonic()) is not None)
    assert advertiser.dropped.dropped == 21
    assert len(node.removals) == 1  # only the marker: nothing of the 5 MiB ids is kept
    done = (await submitter.run(SEED))[-1]
    assert done.status == 4 and done.headers["ExitCode"] == 0, done.headers


async def test_remembered_removals_are_capped_oldest_first(
    ctlnode: RunningNode, exchange: str, submitter: Submitter
) -> None:
    node = ctlnode.server.node
    assert node is not None
    ids = [f"{unique('rm')}-{i}" for i in range(8)]
    await publish_control(exchange, *(rm(mid, "no longer wanted") for mid in ids))
    await until(lambda: node.removals.get(ids[-1], time.monotonic()) is not None)
    assert len(node.removals) == 5
    assert node.removals.dropped == 3
    # The oldest removal was forgotten: that job runs. A remembered one is answered Removed on arrival.
    first = await submitter.send(SEED, message_id=ids[0], user_id="guest")
    last = await submitter.send(SEED, message_id=ids[-1], user_id="guest")
    assert (await submitter.wait_final(first))[-1].status == 4
    removed = (await submitter.wait_final(last))[-1]
    assert removed.status == 3, removed.headers
    assert "no longer wanted" in str(removed.headers["RemoveReason"])
