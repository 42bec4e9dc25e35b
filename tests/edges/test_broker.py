"""carod.edges.broker on the real broker: a reply the client library cannot encode is refused, not retried."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from yarl import URL

from carod import config as configuration
from carod.config import broker_address
from carod.edges import cluster
from carod.edges.amqp import ReplyRefused
from carod.edges.broker import Broker
from carod.edges.cluster import Rotation
from carod.edges.delivery import Delivery, Settle
from carod.errors import BrokerError
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


# ---------------------------------------------------------------- several brokers (issue 19)


class Reversing(random.Random):
    """A shuffle that reverses: the order a test wants, made by the rotation's own code."""

    def shuffle(self, x: Any) -> None:
        x.reverse()


def test_a_rotation_tries_every_broker_once_per_round_in_shuffled_orders() -> None:
    urls = [f"amqp://b{i}/" for i in range(5)]
    rotation = Rotation(urls, random.Random(7))  # noqa: S311
    rounds = [[rotation.next() for _ in urls] for _ in range(20)]
    assert all(sorted(r) == urls for r in rounds)
    assert len({tuple(r) for r in rounds}) > 5  # shuffled anew each round
    assert all(rounds[i][0] != rounds[i - 1][-1] for i in range(1, 20))  # the last tried is not tried again at once


def test_a_lost_broker_is_tried_last_in_a_new_round() -> None:
    urls = ["amqp://a/", "amqp://b/", "amqp://c/"]
    for seed in range(30):
        rotation = Rotation(urls, random.Random(seed))  # noqa: S311
        on = rotation.next()
        rotation.lost(on)
        after = [rotation.next() for _ in urls]
        assert sorted(after) == urls and after[0] != on, (seed, on, after)


def test_one_broker_is_always_that_one() -> None:
    rotation = Rotation(["amqp://only/"])
    rotation.lost("amqp://only/")
    assert [rotation.next() for _ in range(3)] == ["amqp://only/"] * 3


class Proxy:
    """A TCP relay on a port of its own to the test broker: a broker node the test can stop (close)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.pipes |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def stop(self) -> None:
        """The node goes down: no new connection, and every open one cut."""
        if self.server is not None:
            self.server.close()
        for pipe in self.pipes:
            pipe.transport.abort()
        self.pipes.clear()


@pytest.fixture
async def proxies(broker: None) -> AsyncIterator[tuple[list[Proxy], list[str]]]:
    target = URL(BROKER_URL)
    relays = [Proxy((target.host or "127.0.0.1", target.port or 5672)) for _ in range(2)]
    urls = [await p.start() for p in relays]
    yield relays, urls
    for p in relays:
        await p.stop()


async def test_start_skips_a_broker_that_does_not_answer(broker: None) -> None:
    closed = "amqp://guest:guest@127.0.0.1:1/"
    connection = await cluster.connect([BROKER_URL, closed], timeout_s=5, rng=Reversing())  # closed first
    try:
        assert connection.address == broker_address(BROKER_URL)
    finally:
        await connection.close()


async def test_start_fails_when_no_broker_answers_naming_each() -> None:
    urls = ["amqp://guest:secret@127.0.0.1:1/", "amqp://guest:secret@127.0.0.1:2/"]
    with pytest.raises(BrokerError) as caught:
        await cluster.connect(urls, timeout_s=5)
    message = str(caught.value)
    assert "any of the 2 brokers" in message and "127.0.0.1:1/" in message and "127.0.0.1:2/" in message
    assert "secret" not in message


async def test_a_node_whose_broker_goes_down_goes_on_on_another(
    proxies: tuple[list[Proxy], list[str]], queue: str
) -> None:
    """Two brokers (relays to the test broker): the one the node is on goes down; it consumes on the other."""
    relays, urls = proxies
    config = configuration.parse(
        f"[broker]\nurl = {', '.join(urls)}\nqueue = {queue}\nexchange =\nreconnect_interval_s = 0.2\n",
        source="test",
        environ={},
    )
    edge = Broker(config.broker, node_name="test", prefetch=1)
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def consumer(delivery: Delivery) -> None:
        await got.put(delivery.body)
        await delivery.settle(Settle.ACK, label="test")

    reconnected = asyncio.Event()
    edge.on_reconnect = reconnected.set
    await edge.connect()
    try:
        await edge.declare()
        await edge.consume(consumer)
        first = edge.address
        assert first in {broker_address(u) for u in urls}
        down = relays[[broker_address(u) for u in urls].index(first)]
        await down.stop()
        await asyncio.wait_for(reconnected.wait(), 10)
        assert edge.connected and edge.address != first and edge.address in {broker_address(u) for u in urls}
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(aio_pika.Message(b"after the failover"), queue)
        assert await asyncio.wait_for(got.get(), 10) == b"after the failover"
    finally:
        await edge.close()


async def test_while_no_broker_answers_the_edge_is_not_up(proxies: tuple[list[Proxy], list[str]]) -> None:
    """carod_broker_connected and STATUS= read ``up``: 0 while the connection tries the brokers again."""
    relays, urls = proxies
    config = configuration.parse(f"[broker]\nurl = {', '.join(urls)}\nreconnect_interval_s = 0.2\n", environ={})
    edge = Broker(config.broker, node_name="test", prefetch=1)
    await edge.connect()
    try:
        assert edge.up
        for relay in relays:
            await relay.stop()
        async with asyncio.timeout(10):
            while edge.up:
                await asyncio.sleep(0.02)
        assert edge.connected  # not closed for good: still trying
        assert edge.address in {broker_address(u) for u in urls}
    finally:
        await edge.close()
