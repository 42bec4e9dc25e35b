"""carod.edges.broker on the real broker: a reply the client library cannot encode is refused, not retried."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest

from carod import config as configuration
from carod.edges.amqp import ReplyRefused
from carod.edges.broker import Broker
from carod.wire.message import ReplyAddress
from tests.helpers import BROKER_URL, delete_queues, unique


@pytest.fixture
async def connected(broker: None) -> AsyncIterator[tuple[Broker, str]]:
    replies = unique("broker-replies")
    config = configuration.parse(f"[broker]\nurl = {BROKER_URL}\n", source="test", environ={})
    edge = Broker(config.broker, node_name="test", prefetch=1)
    await edge.connect()
    connection = await aio_pika.connect(BROKER_URL)
    try:
        await (await connection.channel()).declare_queue(replies)
        yield edge, replies
    finally:
        await connection.close()
        await edge.close()
        await delete_queues(replies)


async def test_a_reply_that_cannot_be_encoded_is_refused_and_the_channel_goes_on(connected: tuple[Broker, str]) -> None:
    edge, replies = connected
    address = ReplyAddress("", replies)
    with pytest.raises(ReplyRefused, match="cannot be encoded"):
        await edge.publish_reply(address, correlation_id="j", headers={"Bad": b"bytes"}, body=b"")  # type: ignore[dict-item]
    with pytest.raises(ReplyRefused, match="cannot be encoded"):
        await edge.publish_reply(address, correlation_id="j" * 300, headers={"JobStatus": 2}, body=b"")
    await edge.publish_reply(address, correlation_id="j", headers={"JobStatus": 2}, body=b"")  # confirmed
