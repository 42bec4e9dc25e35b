"""carod.edges.delivery: one job message settled, answered, parked and adopted.

On the real broker, each test with queues of its own (the messages are taken
with basic.get and wrapped in a Delivery as the broker edge wraps what it
consumes); and with fake channels, where a redelivery is adopted at the
awaits where the node's other tasks run (a delivery tag names a message on
one channel only: an ack must go to the channel of the message it came from).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from carod import config as configuration
from carod.edges.amqp import ReplyRefused, ReplyUndeliverable
from carod.edges.broker import Broker
from carod.edges.delivery import Delivery, Parking, Settle
from carod.edges.journal import Journal
from carod.edges.metrics import Metrics
from carod.errors import BrokerError, JobHeld
from carod.node.admission import Admission
from carod.node.answer import Answerer
from carod.node.job import Job
from carod.node.outcome import Held
from carod.node.resources import Resources, Totals
from carod.wire.classads import Scalar
from carod.wire.jobad import Request
from carod.wire.message import FIRST_OFFER_HEADER, OFFERS_HEADER, ReplyAddress, parse_envelope
from tests.helpers import BROKER_URL, delete_queues, unique
from tests.node.test_answer import FakeBroker, FakeJournal


@dataclass
class Queues:
    channel: AbstractChannel
    #: deliveries are taken on a channel without publisher confirms, as carod's: they are settled in transactions
    consumer: AbstractChannel
    jobs: str
    replies: str
    delay: str
    dead: str


@pytest.fixture
async def queues(broker: None) -> AsyncIterator[Queues]:
    names = [unique("delivery-jobs"), unique("delivery-replies"), unique("delivery-delay"), unique("delivery-dead")]
    connection = await aio_pika.connect(BROKER_URL)
    try:
        channel = await connection.channel()
        consumer = await connection.channel(publisher_confirms=False)
        jobs, replies, delay, dead = names
        await channel.declare_queue(jobs, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead})
        for name in (replies, delay, dead):
            await channel.declare_queue(name)
        yield Queues(channel, consumer, jobs, replies, delay, dead)
    finally:
        await connection.close()
        await delete_queues(*names)


async def no_check(address: ReplyAddress, headers: Mapping[str, Scalar]) -> None:
    """The reply address's dry run: everything passes."""


async def publish_job(q: Queues, message_id: str = "job-1", **headers: object) -> None:
    message = aio_pika.Message(
        b"input", message_id=message_id, reply_to=q.replies, headers={"Cmd": '"/bin/true"', **headers}
    )
    await q.channel.default_exchange.publish(message, q.jobs)


async def take(q: Queues, name: str | None = None, timeout_s: float = 5) -> AbstractIncomingMessage:
    queue = await q.consumer.get_queue(name or q.jobs)
    async with asyncio.timeout(timeout_s):
        while True:
            message = await queue.get(no_ack=False, fail=False)
            if message is not None:
                return message
            await asyncio.sleep(0.02)  # basic.get polls: a message published a moment ago may not be routed yet


async def depth(q: Queues, name: str) -> int:
    declared = await q.channel.declare_queue(name, passive=True)
    count = declared.declaration_result.message_count
    return int(count or 0)


async def test_ack_takes_the_message_off_the_queue(queues: Queues) -> None:
    await publish_job(queues)
    delivery = Delivery(await take(queues), no_check)
    assert delivery.message_id == "job-1" and delivery.reply_to == queues.replies and delivery.body == b"input"
    assert delivery.live() and not delivery.acked
    assert await delivery.settle(Settle.ACK, label="job-1")
    assert delivery.acked
    assert await depth(queues, queues.jobs) == 0


async def test_requeue_gives_the_message_back_marked_redelivered(queues: Queues) -> None:
    await publish_job(queues)
    delivery = Delivery(await take(queues), no_check)
    assert await delivery.settle(Settle.REQUEUE, label="job-1")
    assert not delivery.acked
    again = Delivery(await take(queues), no_check)
    assert again.message_id == "job-1" and again.redelivered


async def test_reject_drops_the_message_to_the_queues_dead_letter(queues: Queues) -> None:
    await publish_job(queues)
    delivery = Delivery(await take(queues), no_check)
    assert await delivery.settle(Settle.REJECT, label="job-1")
    dead = await take(queues, queues.dead)
    assert dead.message_id == "job-1"
    assert await depth(queues, queues.jobs) == 0


async def test_park_moves_a_copy_with_its_offers_counted_and_acks_the_original(queues: Queues) -> None:
    await publish_job(queues, **{OFFERS_HEADER: 1, "x-forged": "dropped"})
    delivery = Delivery(await take(queues), no_check)
    parking = Parking(queues.delay, offers=2, first_offer=1_700_000_000, timeout_s=5)
    assert await delivery.settle(Settle.PARK, label="job-1", parking=parking)
    assert delivery.acked
    parked = await take(queues, queues.delay)
    headers = parked.headers or {}
    assert parked.message_id == "job-1" and parked.reply_to == queues.replies and parked.body == b"input"
    assert headers[OFFERS_HEADER] == 2 and headers[FIRST_OFFER_HEADER] == 1_700_000_000
    assert headers["Cmd"] == '"/bin/true"' and "x-forged" not in headers
    assert await depth(queues, queues.jobs) == 0


async def test_park_without_a_parking_is_a_programming_error(queues: Queues) -> None:
    await publish_job(queues)
    delivery = Delivery(await take(queues), no_check)
    with pytest.raises(ValueError, match="Parking"):
        await delivery.settle(Settle.PARK, label="job-1")
    assert delivery.live() and not delivery.acked


async def test_the_final_reply_and_the_ack_commit_together(queues: Queues) -> None:
    await publish_job(queues)
    delivery = Delivery(await take(queues), no_check)
    await delivery.reply_and_ack(
        ReplyAddress("", queues.replies),
        correlation_id="job-1",
        headers={"JobStatus": 4},
        body=b"zip",
        timeout_s=5,
    )
    assert delivery.acked
    reply = await take(queues, queues.replies)
    assert reply.correlation_id == "job-1" and reply.body == b"zip" and (reply.headers or {})["JobStatus"] == 4
    assert await depth(queues, queues.jobs) == 0


async def test_an_address_refused_in_the_dry_run_leaves_the_delivery_intact(queues: Queues) -> None:
    async def refuse(address: ReplyAddress, headers: Mapping[str, Scalar]) -> None:
        raise ReplyUndeliverable("there is no exchange 'gone'")

    await publish_job(queues)
    delivery = Delivery(await take(queues), refuse)
    with pytest.raises(ReplyUndeliverable):
        await delivery.reply_and_ack(
            ReplyAddress("gone", "k"), correlation_id="job-1", headers={"JobStatus": 4}, body=b"", timeout_s=5
        )
    assert delivery.live() and not delivery.acked
    assert await delivery.settle(Settle.ACK, label="job-1"), "the delivery can still be settled"


@pytest.mark.parametrize(
    ("correlation_id", "headers"),
    [("job-1", {"JobStatus": 4, "Bad": b"bytes"}), ("j" * 300, {"JobStatus": 4})],
    ids=["a header type", "a 300-byte correlation_id"],
)
async def test_a_final_reply_that_cannot_be_encoded_is_refused_and_the_delivery_stays_intact(
    queues: Queues, correlation_id: str, headers: dict[str, Scalar]
) -> None:
    """Found inside the transaction, before anything of it was sent: its channel (and every delivery on it) lives."""
    await publish_job(queues, "job-1")
    await publish_job(queues, "job-2")
    first, second = Delivery(await take(queues), no_check), Delivery(await take(queues), no_check)
    address = ReplyAddress("", queues.replies)
    with pytest.raises(ReplyRefused, match="cannot be encoded"):
        await first.reply_and_ack(address, correlation_id=correlation_id, headers=headers, body=b"zip", timeout_s=5)
    assert first.live() and second.live() and not first.acked
    await first.reply_and_ack(address, correlation_id="job-1", headers={"JobStatus": 5}, body=b"", timeout_s=5)
    await second.reply_and_ack(address, correlation_id="job-2", headers={"JobStatus": 4}, body=b"", timeout_s=5)
    replies = [await take(queues, queues.replies), await take(queues, queues.replies)]
    assert [(r.correlation_id, (r.headers or {})["JobStatus"]) for r in replies] == [("job-1", 5), ("job-2", 4)]
    assert await depth(queues, queues.jobs) == 0
    assert await depth(queues, queues.replies) == 0, "nothing of the refused reply was committed"


async def test_a_dead_channel_makes_the_delivery_wait_for_an_adopted_redelivery(queues: Queues) -> None:
    await publish_job(queues)
    connection = await aio_pika.connect(BROKER_URL)
    try:
        other = await connection.channel(publisher_confirms=False)
        queue = await other.get_queue(queues.jobs)
        first = await queue.get(no_ack=False)
        delivery = Delivery(first, no_check)
        await other.close()  # the broker requeues what that channel held
        assert not delivery.live()
        assert not await delivery.settle(Settle.ACK, label="job-1"), "nothing reaches the broker"
        stopping = asyncio.Event()
        with pytest.raises(TimeoutError):
            await delivery.wait_live(0.05, stopping)
        waiter = asyncio.create_task(delivery.wait_live(5, stopping))
        await asyncio.sleep(0)
        assert delivery.waiting
        redelivered = Delivery(await take(queues), no_check)
        assert redelivered.redelivered
        delivery.adopt(redelivered)
        await asyncio.wait_for(waiter, 5)
        assert delivery.live() and not delivery.waiting and not delivery.acked
        assert await delivery.settle(Settle.ACK, label="job-1")
        assert await depth(queues, queues.jobs) == 0
    finally:
        await connection.close()


async def test_waiting_for_a_live_delivery_ends_at_once_when_the_node_stops(queues: Queues) -> None:
    await publish_job(queues)
    connection = await aio_pika.connect(BROKER_URL)
    try:
        other = await connection.channel(publisher_confirms=False)
        first = await (await other.get_queue(queues.jobs)).get(no_ack=False)
        delivery = Delivery(first, no_check)
        await other.close()
        stopping = asyncio.Event()
        waiter = asyncio.create_task(delivery.wait_live(60, stopping))
        await asyncio.sleep(0)
        stopping.set()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(waiter, 5)
    finally:
        await connection.close()


# ---------------------------------------------------------------- with fake channels


class FakeChannel:
    """An aiormq channel as Delivery uses it: records what is published and acked in committed transactions."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self.pending: list[tuple[str, object]] = []
        self.committed: list[tuple[str, object]] = []

    async def tx_select(self) -> None:
        pass

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str, properties: Any) -> None:
        self.pending.append(("publish", routing_key))

    async def basic_ack(self, tag: int) -> None:
        self.pending.append(("ack", tag))

    async def tx_commit(self) -> None:
        self.committed += self.pending
        self.pending = []

    async def close(self) -> None:
        self.closed = True


class FakeMessage:
    """An incoming message: its tag is only meaningful on its own channel."""

    def __init__(self, channel: FakeChannel, tag: int) -> None:
        self._channel = channel
        self.delivery_tag = tag
        self.message_id = "job-1"
        self.reply_to = "replies"
        self.headers: dict[str, object] = {}
        self.body = b""
        self.redelivered = False
        self.consumer_tag = "c1"

    @property
    def channel(self) -> FakeChannel:
        if self._channel.closed:
            raise aiormq.exceptions.ChannelInvalidStateError("closed")
        return self._channel


def fake_delivery(channel: FakeChannel, tag: int, check: Any = no_check) -> Delivery:
    return Delivery(cast(AbstractIncomingMessage, FakeMessage(channel, tag)), check)


def acks(*channels: FakeChannel) -> list[tuple[str, object]]:
    return [(ch.name, tag) for ch in channels for what, tag in ch.committed if what == "ack"]


async def test_a_redelivery_adopted_during_the_address_check_is_acked_with_its_own_tag() -> None:
    """The job's channel dies while its final reply's address is checked (on another channel), and
    the broker delivers the job again: tag 1 on a new channel, where tag 7 may be another job's
    message. The reply's ack must name the message it answers, on that message's channel."""
    old_channel, new_channel = FakeChannel("old"), FakeChannel("new")
    job: Delivery | None = None

    async def check_address(address: ReplyAddress, headers: Mapping[str, Scalar]) -> None:
        # Meanwhile (another task): the old channel closes and the redelivery is adopted.
        old_channel.closed = True
        assert job is not None
        job.adopt(fake_delivery(new_channel, 1, check_address))

    job = fake_delivery(old_channel, 7, check_address)
    with contextlib.suppress(BrokerError):  # failing, to be retried on the adopted delivery, is right too
        await job.reply_and_ack(
            ReplyAddress("x", "replies"), correlation_id="job-1", headers={"JobStatus": 4}, body=b"", timeout_s=5
        )
    assert ("new", 7) not in acks(old_channel, new_channel), "the old channel's tag 7 acked on the new channel"
    assert acks(old_channel, new_channel) in ([], [("new", 1)])


async def test_a_redelivery_adopted_after_the_final_reply_committed_is_acked_too() -> None:
    """The reply and the first delivery's ack commit together; the channel then dies and the job
    comes back before the node forgets it: the adopted delivery is acked alone (answered), once."""
    old_channel, new_channel = FakeChannel("old"), FakeChannel("new")
    first = fake_delivery(old_channel, 7)

    class AdoptingJournal(FakeJournal):
        async def confirmed(self, entry_id: int, message_id: str, *, final: bool) -> None:
            await super().confirmed(entry_id, message_id, final=final)
            old_channel.closed = True
            first.adopt(fake_delivery(new_channel, 1))

    config = configuration.parse("[node]\nname = n1\n", source="test", environ={})
    running: dict[str, Job] = {}
    journal, broker = AdoptingJournal(), FakeBroker()
    answer = Answerer(config, cast(Broker, broker), cast(Journal, journal), running, asyncio.Event(), Metrics())
    admission = Admission(Resources(Totals(1, 100, 100, 1)), Request(), max_prefetch=1)
    job = Job(parse_envelope("job-1", "replies", {}), first, admission.arrive(first))
    running["job-1"] = job
    await asyncio.wait_for(answer.conclude(job, Held(JobHeld("no"))), 10)
    assert old_channel.committed == [("publish", "replies"), ("ack", 7)], "the reply and its ack, together"
    assert new_channel.committed == [("ack", 1)], "the adopted redelivery: acked alone, as answered"


async def test_the_answer_goes_out_on_the_delivery_adopted_during_the_address_check() -> None:
    """As above, through the answer path: the final reply and the ack are retried on the adopted
    delivery's channel with its own tag, once; nothing is acked on the dead one."""
    old_channel, new_channel = FakeChannel("old"), FakeChannel("new")
    checks = 0
    first: Delivery | None = None

    async def check_address(address: ReplyAddress, headers: Mapping[str, Scalar]) -> None:
        nonlocal checks
        checks += 1
        if checks == 1:
            old_channel.closed = True
            assert first is not None
            first.adopt(fake_delivery(new_channel, 1, check_address))

    first = fake_delivery(old_channel, 7, check_address)
    config = configuration.parse("[node]\nname = n1\n", source="test", environ={})
    running: dict[str, Job] = {}
    answer = Answerer(
        config, cast(Broker, FakeBroker()), cast(Journal, FakeJournal()), running, asyncio.Event(), Metrics()
    )
    admission = Admission(Resources(Totals(1, 100, 100, 1)), Request(), max_prefetch=1)
    job = Job(parse_envelope("job-1", "exchange/replies", {}), first, admission.arrive(first))
    running["job-1"] = job
    await asyncio.wait_for(answer.conclude(job, Held(JobHeld("no"))), 10)
    assert old_channel.committed == []
    assert new_channel.committed == [("publish", "replies"), ("ack", 1)], "one reply, with the adopted tag"
    assert first.acked
