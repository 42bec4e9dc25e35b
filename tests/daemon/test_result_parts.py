"""Results larger than one message, from a real carod: ordered parts, reassembled and verified by the client."""

from __future__ import annotations

import asyncio
import hashlib
import io
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest

from carod.client import Client
from carod.units import MIB
from carod.wire import parts
from carod.wire.parts import ResultError
from tests.helpers import BROKER_URL, RunningNode, Submitter, needs_ctl, q, rabbit_env, rabbitmqctl, start_node

BIG_JOB = {
    "Cmd": q("/bin/sh"),
    "Arguments": q("-c 'head -c $0 /dev/urandom > big.bin && sha256sum big.bin' 3500000"),
    "Out": q("job.out"),
    "Err": q("job.err"),
}


@pytest.fixture
async def small_parts(queue: str, base: Path) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base, broker={"result_part_mib": 1}, node={"max_result_mib": 5})
    yield running
    await running.stop()


def _file_and_digest(zip_bytes: bytes) -> tuple[bytes, str]:
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as z:
        return z.read("big.bin"), z.read("job.out").decode().split()[0]


async def test_a_result_larger_than_a_part_arrives_in_ordered_parts(
    small_parts: RunningNode, submitter: Submitter
) -> None:
    replies = await submitter.run(BIG_JOB)
    status = [r.status for r in replies]
    assert status[0] == 2 and status[-1] == 4
    got = replies[1:-1]
    final = replies[-1]
    assert all(r.status == 0 for r in got)
    # 3.5 MB of data (+ zip headers) in parts of 1 MiB
    assert [r.headers[parts.PART] for r in got] == [0, 1, 2, 3]
    assert {r.headers[parts.PARTS] for r in got} == {4}
    assert {r.headers[parts.RESULT_ID] for r in got} == {final.headers[parts.RESULT_ID]}
    assert [len(r.body) for r in got[:-1]] == [MIB] * 3
    assert final.body == b""
    whole = b"".join(r.body for r in got)
    assert len(whole) == final.headers[parts.RESULT_BYTES]
    assert hashlib.sha256(whole).hexdigest() == final.headers[parts.RESULT_SHA256]
    data, digest = _file_and_digest(whole)
    assert len(data) == 3_500_000
    assert hashlib.sha256(data).hexdigest() == digest


async def test_the_client_reassembles_and_verifies(small_parts: RunningNode, queue: str) -> None:
    async with Client(BROKER_URL, queue=queue) as client:
        job = await client.submit("/bin/sh", [], attributes={k: v for k, v in BIG_JOB.items() if k != "Cmd"})
        final = await job.result(timeout_s=60)
        assert final.status == 4
        data, digest = _file_and_digest(final.body)
        assert hashlib.sha256(data).hexdigest() == digest
        # No part shows up as a reply of its own.
        assert [r.status for r in job.history] == [2, 4]

    async with Client(BROKER_URL, queue=queue, max_result_mib=2) as client:
        job = await client.submit("/bin/sh", [], attributes={k: v for k, v in BIG_JOB.items() if k != "Cmd"})
        with pytest.raises(ResultError, match=r"more than this client's cap of 2097152"):
            await job.result(timeout_s=60)


async def test_a_result_over_the_node_cap_is_held(small_parts: RunningNode, submitter: Submitter) -> None:
    job = dict(BIG_JOB, Arguments=q("-c 'head -c $0 /dev/urandom > big.bin' 6000000"))
    replies = await submitter.run(job)
    held = replies[-1]
    assert held.status == 5
    assert held.headers["HoldReasonCode"] == 33
    assert "larger than this node's result limit of 5 MiB" in held.headers["HoldReason"]
    assert all(parts.PART not in r.headers for r in replies)
    # and the next job still runs
    assert (await submitter.run(dict(BIG_JOB, Arguments=q("-c 'echo ok'"))))[-1].status == 4


@pytest.fixture
def broker_max_message_2_mib() -> Iterator[int]:
    """The broker refuses messages over 2 MiB (for channels opened from now on); restored after."""
    got = rabbit_env("max_message_size")
    old = got.strip("{}").split(",")[-1] if got.startswith("{ok,") else "134217728"
    rabbitmqctl("eval", "application:set_env(rabbit, max_message_size, 2097152).")
    try:
        yield 2 * MIB
    finally:
        rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {int(old)}).")


@needs_ctl
async def test_a_result_larger_than_the_brokers_max_message_size_arrives(
    broker_max_message_2_mib: int, queue: str, base: Path
) -> None:
    running = await start_node(queue, base, broker={"result_part_mib": 1}, node={"max_result_mib": 5})
    try:
        async with Client(BROKER_URL, queue=queue) as client:
            job = await client.submit("/bin/sh", [], attributes={k: v for k, v in BIG_JOB.items() if k != "Cmd"})
            final = await job.result(timeout_s=60)
            assert final.status == 4
            assert len(final.body) > broker_max_message_2_mib
            data, digest = _file_and_digest(final.body)
            assert hashlib.sha256(data).hexdigest() == digest
        # The limit was real: one message of that size is refused.
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            with pytest.raises((aiormq.exceptions.AMQPError, asyncio.CancelledError)):
                await channel.default_exchange.publish(aio_pika.Message(b"x" * (3 * MIB)), routing_key=queue)
                await channel.declare_queue(queue, passive=True)  # the refusal arrives by now
    finally:
        await running.stop()
