"""Results larger than one message: ordered parts, reassembled and verified."""

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
from carod.wire import parts
from carod.wire.parts import Assembler, ResultError
from tests.helpers import (
    BROKER_URL,
    RunningNode,
    Submitter,
    needs_ctl,
    q,
    rabbit_env,
    rabbitmqctl,
    start_node,
)

MIB = 1024 * 1024


def _split(data: bytes, size: int, result_id: str = "r1") -> tuple[list[tuple[dict[str, object], bytes]], dict]:
    count = parts.count(len(data), size)
    chunks = [
        (dict(parts.part_headers(result_id, i, count, len(data))), data[i * size : (i + 1) * size])
        for i in range(count)
    ]
    final = dict(parts.final_headers(result_id, count, len(data), hashlib.sha256(data).hexdigest()))
    return chunks, final


# ------------------------------------------------------------------ pure


@pytest.mark.parametrize(("size", "part", "expected"), [(0, 4, 1), (1, 4, 1), (4, 4, 1), (5, 4, 2), (12, 4, 3)])
def test_count(size: int, part: int, expected: int) -> None:
    assert parts.count(size, part) == expected


def test_parts_reassemble_in_order() -> None:
    data = bytes(range(256)) * 40
    chunks, final = _split(data, 1000)
    a = Assembler(max_bytes=MIB)
    for headers, body in chunks:
        assert parts.is_part(headers) and not parts.in_parts(headers)
        a.add(headers, body)
    assert parts.in_parts(final)
    assert a.finish(final) == data
    assert len(a) == 0


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda c: c[:-1], "10 of 11 parts arrived"),
        (lambda c: [c[1], c[0], *c[2:]], "part 1 arrived where part 0 was expected"),
        (lambda c: [*c, c[-1]], "part 10 arrived where part 11 was expected"),
        (lambda c: [(h, b"X" + b[1:]) if h[parts.PART] == 3 else (h, b) for h, b in c], "does not match its SHA-256"),
        (lambda c: [(h, b + b"!") if h[parts.PART] == 10 else (h, b) for h, b in c], "more than the declared"),
        (lambda c: [], "none of the result's 11 parts arrived"),
    ],
)
def test_incomplete_or_corrupt_results_are_refused(mangle, message: str) -> None:  # type: ignore[no-untyped-def]
    data = bytes(range(256)) * 40
    chunks, final = _split(data, 1000)
    a = Assembler(max_bytes=MIB)
    for headers, body in mangle(chunks):
        a.add(headers, body)
    with pytest.raises(ResultError, match=message):
        a.finish(final)


def test_two_sendings_of_one_result_do_not_mix() -> None:
    """A resend after a crash (new result id) interleaved with a cut-off first sending."""
    data = b"0123456789" * 300
    first, _ = _split(data, 1000, "first")
    second, final = _split(data, 1000, "second")
    a = Assembler(max_bytes=MIB)
    a.add(*first[0])
    a.add(*second[0])
    a.add(*first[1])
    for headers, body in second[1:]:
        a.add(headers, body)
    assert a.finish(final) == data
    assert len(a) == 1  # the cut-off sending
    a.clear()
    assert len(a) == 0


def test_a_result_over_the_cap_is_refused_from_its_first_part() -> None:
    data = b"x" * 5000
    chunks, final = _split(data, 1000)
    a = Assembler(max_bytes=4096)
    for headers, body in chunks:
        a.add(headers, body)
    with pytest.raises(ResultError, match="5000 bytes, more than this client's cap of 4096"):
        a.finish(final)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({parts.PART: 0, parts.PARTS: 1, parts.RESULT_BYTES: 1}, "x-carod-result-id"),
        ({parts.RESULT_ID: "r", parts.PART: "0", parts.PARTS: 1, parts.RESULT_BYTES: 1}, "x-carod-part "),
        ({parts.RESULT_ID: "r", parts.PART: 0, parts.PARTS: -1, parts.RESULT_BYTES: 1}, "x-carod-parts"),
    ],
)
def test_malformed_part_headers_are_named(headers: dict[str, object], message: str) -> None:
    with pytest.raises(ResultError, match=message):
        Assembler(MIB).add(headers, b"x")


# ------------------------------------------------------------ on the broker

# The job writes a file of random bytes and prints its SHA-256.
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
