"""AMQP 1.0 submitters: a Qpid Proton client against a real carod through RabbitMQ 3.x's AMQP 1.0 plugin.

The client is written as a Proton user would write it: the job ad in the
message's application-properties, its reply-to one of RabbitMQ's address
forms, the replies read as application-properties with the zip as the body.
The plugin is enabled for these tests when it is off, and disabled again after.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest
from proton import Message
from proton.utils import BlockingConnection

from tests.helpers import BROKER_URL, RunningNode, delete_queues, q, queue_depth, seed_runs, start_node, unique
from tests.helpers import Submitter as Submitter091

PLUGIN = "rabbitmq_amqp1_0"
PROTON_URL = BROKER_URL.rstrip("/")
SEED = {"Cmd": q("/bin/echo"), "Arguments": q("Hello Grid!"), "Out": q("job.out")}


@pytest.fixture(scope="module")
def amqp10_plugin() -> Iterator[None]:
    """RabbitMQ's AMQP 1.0 plugin on for these tests; left as it was found."""
    listed = subprocess.run(
        ["rabbitmq-plugins", "list", "-e", "-m", PLUGIN], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    was_on = PLUGIN in listed
    if not was_on:
        subprocess.run(["rabbitmq-plugins", "enable", PLUGIN], capture_output=True, check=True, timeout=120)
    try:
        yield
    finally:
        if not was_on:
            subprocess.run(["rabbitmq-plugins", "disable", PLUGIN], capture_output=True, check=True, timeout=120)


@dataclass
class Reply:
    properties: dict[str, object]
    body: bytes
    correlation_id: object


def send_job(queue: str, message_id: str, reply_to: str, properties: dict[str, object], body: bytes = b"") -> None:
    connection = BlockingConnection(PROTON_URL, allowed_mechs="PLAIN", timeout=30)
    try:
        sender = connection.create_sender(f"/amq/queue/{queue}")
        sender.send(Message(id=message_id, reply_to=reply_to, properties=properties, body=body, inferred=True))
    finally:
        connection.close()


def receive(queue: str, count: int, timeout_s: float = 30) -> list[Reply]:
    connection = BlockingConnection(PROTON_URL, allowed_mechs="PLAIN", timeout=timeout_s)
    try:
        receiver = connection.create_receiver(f"/amq/queue/{queue}")
        got = []
        for _ in range(count):
            message = receiver.receive(timeout=timeout_s)
            receiver.accept()
            body = message.body
            got.append(
                Reply(dict(message.properties or {}), bytes(body) if body is not None else b"", message.correlation_id)
            )
        return got
    finally:
        connection.close()


@dataclass
class Destination:
    """Where a reply_to form sends replies, and the queue a test reads them from."""

    reply_to: str
    queue: str


@pytest.fixture
async def destinations() -> AsyncIterator[list[Destination]]:
    """A queue for each of RabbitMQ's reply-to forms, bound as that form routes."""
    names = [unique(f"r10-{i}") for i in range(5)]
    fanout = unique("r10-fanout")
    key, topic = unique("k"), unique("t").replace("-", ".")
    connection = await aio_pika.connect(BROKER_URL)
    try:
        channel = await connection.channel()
        queues = [await channel.declare_queue(name) for name in names]
        await queues[0].bind("amq.direct", key)
        exchange = await channel.declare_exchange(fanout, aio_pika.ExchangeType.FANOUT, auto_delete=True)
        await queues[1].bind(exchange)
        await queues[4].bind("amq.topic", topic)
        yield [
            Destination(f"/exchange/amq.direct/{key}", names[0]),
            Destination(f"/exchange/{fanout}", names[1]),
            Destination(f"/queue/{names[2]}", names[2]),
            Destination(f"/amq/queue/{names[3]}", names[3]),
            Destination(f"/topic/{topic}", names[4]),
        ]
    finally:
        await connection.close()
        await delete_queues(*names)


@pytest.fixture
async def node10(amqp10_plugin: None, queue: str, base: Path) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base)
    yield running
    await running.stop()


async def test_a_proton_client_gets_running_then_exited_at_every_reply_to_form(
    node10: RunningNode, queue: str, destinations: list[Destination]
) -> None:
    for n, destination in enumerate(destinations):
        message_id = unique(f"proton-{n}")
        await asyncio.to_thread(send_job, queue, message_id, destination.reply_to, SEED)
        running, final = await asyncio.to_thread(receive, destination.queue, 2)
        assert running.properties["JobStatus"] == 2, destination
        assert running.properties["JobState"] == '"Running"'
        assert final.properties["JobStatus"] == 4, destination
        assert final.properties["JobState"] == '"Exited"'
        assert final.properties["ExitCode"] == 0
        assert final.correlation_id == message_id
        with zipfile.ZipFile(io.BytesIO(final.body)) as archive:
            assert archive.read("job.out") == b"Hello Grid!\n"


async def test_a_proton_job_with_a_bad_attribute_is_held_with_a_reason_a_person_reads(
    node10: RunningNode, queue: str, destinations: list[Destination]
) -> None:
    where = destinations[2]
    await asyncio.to_thread(send_job, queue, unique("proton-bad"), where.reply_to, {**SEED, "Arguments": "[oops"})
    (held,) = await asyncio.to_thread(receive, where.queue, 1)
    assert held.properties["JobStatus"] == 5
    assert "Arguments" in str(held.properties["HoldReason"])


async def test_a_proton_job_with_a_uuid_attribute_is_held_naming_the_amqp_type(
    node10: RunningNode, queue: str, destinations: list[Destination]
) -> None:
    import uuid

    where = destinations[2]
    await asyncio.to_thread(send_job, queue, unique("proton-uuid"), where.reply_to, {**SEED, "Tag": uuid.uuid4()})
    (held,) = await asyncio.to_thread(receive, where.queue, 1)
    assert held.properties["JobStatus"] == 5
    assert "AMQP 1.0 uuid" in str(held.properties["HoldReason"])


async def test_an_input_zip_sent_as_a_binary_value_reaches_the_job(
    node10: RunningNode, queue: str, destinations: list[Destination]
) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("in.txt", "from proton\n")
    where = destinations[2]
    job = {"Cmd": q("/bin/cat"), "Arguments": q("in.txt"), "Out": q("job.out")}

    def send() -> None:
        connection = BlockingConnection(PROTON_URL, allowed_mechs="PLAIN", timeout=30)
        try:
            sender = connection.create_sender(f"/amq/queue/{queue}")
            # not inferred: the body goes as an amqp-value of type binary, which the plugin passes on encoded
            sender.send(
                Message(id=unique("proton-zip"), reply_to=where.reply_to, properties=job, body=buffer.getvalue())
            )
        finally:
            connection.close()

    await asyncio.to_thread(send)
    _running, final = await asyncio.to_thread(receive, where.queue, 2)
    assert final.properties["JobStatus"] == 4
    with zipfile.ZipFile(io.BytesIO(final.body)) as archive:
        assert archive.read("job.out") == b"from proton\n"


async def test_a_0_9_1_client_still_gets_plain_headers_only(node10: RunningNode, queue: str) -> None:
    submitter = await Submitter091.open(queue)
    try:
        replies = await submitter.run(SEED)
        assert [r.status for r in replies] == [2, 4]
        assert all(not any(k.startswith("x-amqp-1.0") for k in r.headers) for r in replies)
        await seed_runs(submitter)
    finally:
        await submitter.close()
    assert await queue_depth(queue) == 0


async def test_a_forged_1_0_header_that_does_not_decode_is_held_and_the_node_goes_on(
    node: RunningNode, submitter: Submitter091
) -> None:
    """Any 0-9-1 client can send the plugin's headers: garbage, deep nesting, the wrong section. Held, saying so."""
    nested = b"\xa1\x03Tag"
    inner = b"\x40"
    for _ in range(6000):
        inner = b"\xd0" + (len(inner) + 4).to_bytes(4, "big") + (1).to_bytes(4, "big") + inner
    deep = b"\x00\x53\x74\xd1" + (len(nested + inner) + 4).to_bytes(4, "big") + (2).to_bytes(4, "big") + nested + inner
    for blob, reason in (
        (bytearray(b"\x00St\xd1\x00\x00\x00\xff"), "cannot be decoded as AMQP 1.0"),
        (bytearray(b"\x00Ss\xc0\x01\x00"), "does not hold an AMQP 1.0 application-properties section"),
        (bytearray(deep), "AMQP 1.0 list"),
    ):
        replies = await submitter.run({**SEED, "x-amqp-1.0-app-properties": blob})
        assert [r.status for r in replies] == [5], reason
        hold = str(replies[-1].headers["HoldReason"])
        assert reason in hold, hold
    await seed_runs(submitter)
