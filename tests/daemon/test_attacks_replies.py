"""Issue 14, replies: attacks on what carod sends back, performed for real against a real carod.

* job-controlled text reflected into reply headers (a 200 KB HoldReason, thousands
  of oddly named skipped files) must not make the broker close carod's connection;
* a reply address that refuses publishing (``amq.rabbitmq.trace``) must not
  wedge a slot or be retried forever;
* a daemon that hit both still stops within its documented time on SIGTERM,
  and starts again;
* a message that reuses a victim's message_id with another reply_to never gets
  anything of the victim's (only a Held reply naming the reuse), and the
  victim still gets its own answer.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aio_pika
import classad2
import pytest

from carod import config as configuration
from carod.node.server import stop_bound_s
from carod.wire.replies import MAX_HEADERS_BYTES, MAX_TEXT_HEADER_BYTES, headers_size
from tests.helpers import (
    BROKER_URL,
    RABBITMQCTL,
    RunningNode,
    Submitter,
    needs_ctl,
    processes_with,
    q,
    queue_depth,
    rabbit_env,
    rabbitmqctl,
    seed_runs,
    start_daemon,
    start_node,
    write_config,
)

SEED = {"Cmd": q("/bin/echo"), "Arguments": q("Hello Grid!"), "Out": q("job.out"), "Err": q("job.err")}
#: A header whose text the Held reply reflects: ~200 KB once repr'd and ClassAd-quoted.
REFLECTED = {"Cmd": q("/bin/true"), "X": "\x01" * 20_000}
#: An exchange that exists and refuses every publish (ACCESS_REFUSED, internal).
REFUSING = "amq.rabbitmq.trace/x"


def literal(text: object) -> str:
    """What a header's ClassAd string literal says."""
    assert isinstance(text, str)
    value = classad2.ExprTree(text).eval()
    assert isinstance(value, str)
    return value


def counter(node: RunningNode, name: str, **labels: str) -> float:
    value = node.server.metrics.registry.get_sample_value(f"{name}_total", labels or None)
    return value or 0.0


def carod_connections(node_name: str) -> list[str]:
    """The broker's connections named ``carod@<node_name>`` (their pids)."""
    assert RABBITMQCTL is not None
    out = subprocess.run(
        [RABBITMQCTL, "list_connections", "pid", "client_properties", "-q"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [line.split("\t", 1)[0] for line in out.splitlines() if f"carod@{node_name}" in line]


async def connections(node_name: str) -> list[str]:
    return await asyncio.to_thread(carod_connections, node_name)


# ---------------------------------------------------------------- headers larger than frame_max


@needs_ctl
async def test_a_200_kb_hold_reason_is_bounded_and_the_connection_survives(
    node: RunningNode, submitter: Submitter
) -> None:
    before = await connections(node.name)
    assert len(before) == 1
    for _ in range(2):  # two of them used to stop the node taking jobs
        replies = await submitter.run(REFLECTED)
        held = replies[-1]
        assert [r.status for r in replies] == [5]
        reason = held.headers["HoldReason"]
        assert len(reason.encode()) <= MAX_TEXT_HEADER_BYTES
        assert "the job attribute X" in literal(reason)
        assert headers_size(held.headers) <= MAX_HEADERS_BYTES
    await seed_runs(submitter)
    assert counter(node, "carod_broker_reconnects") == 0
    assert await connections(node.name) == before  # the same connection: never closed by the broker


@needs_ctl
async def test_thousands_of_oddly_named_skipped_files_are_listed_within_bounds(
    node: RunningNode, submitter: Submitter
) -> None:
    before = await connections(node.name)
    # 3000 dangling symlinks (never in the result zip) named with 245 control characters and a number
    script = 's=$(head -c 245 /dev/zero | tr "\\0" "\\001"); seq 3000 | sed "s/^/$s/" | xargs ln -s -t .'
    replies = await submitter.run({"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'")}, timeout_s=60)
    final = replies[-1]
    assert final.status == 4 and final.headers["ExitCode"] == 0
    assert final.headers["SkippedOutputCount"] == 3000
    listed = final.headers["SkippedOutput"]
    assert len(listed.encode()) <= MAX_TEXT_HEADER_BYTES
    names, _, more = literal(listed).rpartition(" ... and ")
    shown = names.split(", ")
    assert more == f"{3000 - len(shown)} more"
    assert all(name.startswith("\x01" * 245) for name in shown)
    assert headers_size(final.headers) <= MAX_HEADERS_BYTES
    await seed_runs(submitter)
    assert counter(node, "carod_broker_reconnects") == 0
    assert await connections(node.name) == before


@pytest.fixture
def broker_max_message_2_mib() -> Iterator[int]:
    """The broker refuses messages over 2 MiB (on channels opened from now on); restored after."""
    got = rabbit_env("max_message_size")
    old = got.strip("{}").split(",")[-1] if got.startswith("{ok,") else "134217728"
    rabbitmqctl("eval", "application:set_env(rabbit, max_message_size, 2097152).")
    try:
        yield 2 * 1024 * 1024
    finally:
        rabbitmqctl("eval", f"application:set_env(rabbit, max_message_size, {int(old)}).")


@needs_ctl
async def test_a_final_reply_the_broker_refuses_for_its_size_is_replaced_by_a_small_held_one(
    broker_max_message_2_mib: int, queue: str, base: Path, submitter: Submitter
) -> None:
    # result_part_mib above the broker's limit (a misconfiguration): a 3 MB result travels whole and is refused
    node = await start_node(queue, base, broker={"result_part_mib": 4})
    try:
        job = {"Cmd": q("/bin/sh"), "Arguments": q("-c 'head -c 3000000 /dev/urandom > big.bin; exit 3'")}
        replies = await submitter.run(job, timeout_s=60)
        held = replies[-1]
        assert [r.status for r in replies] == [2, 5]  # one final reply, never the refused one again
        assert held.headers["HoldReasonCode"] == 12
        reason = literal(held.headers["HoldReason"])
        assert "the broker refused this job's Exited reply" in reason and "max_message_size" in reason
        assert held.headers["ExitCode"] == 3  # what the job did is still told
        assert held.body == b""
        assert counter(node, "carod_replies_refused", reason="size") == 1
        await seed_runs(submitter)
    finally:
        await node.stop()
    assert await queue_depth(queue) == 0


# ---------------------------------------------------------------- a reply address that refuses publishing


@needs_ctl
async def test_a_reply_address_that_refuses_publishing_is_settled_and_the_slot_freed(
    queue: str, base: Path, submitter: Submitter
) -> None:
    marker = f"carod-refused-{uuid.uuid4().hex}"
    node = await start_node(queue, base, node={"slots": 1})
    try:
        before = await connections(node.name)
        # a job that would hold the node's only slot for ten minutes, and one Held at once
        await submitter.send({"Cmd": q("/bin/sh"), "Arguments": q(f"-c 'exec sleep 600 {marker}'")}, reply_to=REFUSING)
        await submitter.send(REFLECTED, reply_to=REFUSING)
        await seed_runs(submitter, timeout_s=60)  # the slot was freed: the first was stopped, not waited for
        async with asyncio.timeout(30):
            while counter(node, "carod_jobs_unanswered") < 2:
                await asyncio.sleep(0.05)
        assert counter(node, "carod_replies_refused", reason="address") == 2
        assert processes_with(marker) == []
        assert counter(node, "carod_broker_reconnects") == 0
        assert await connections(node.name) == before
    finally:
        await node.stop()
    assert await queue_depth(queue) == 0  # both were acked: nothing came back when the connection closed
    node = await start_node(queue, base, node={"slots": 1})  # restarts cleanly; nothing is run again
    try:
        await seed_runs(submitter)
        assert counter(node, "carod_jobs_started") == 1
    finally:
        await node.stop()


# ---------------------------------------------------------------- told to stop, it stops


@needs_ctl
async def test_a_daemon_that_hit_both_stops_on_sigterm_within_its_bound_and_restarts(
    base: Path, queue: str, submitter: Submitter
) -> None:
    marker = f"carod-refused-{uuid.uuid4().hex}"
    settings = {"node": {"slots": 2, "drain_timeout_s": 2, "kill_grace_s": 2}, "broker": {"confirm_timeout_s": 5}}
    path = write_config(base, queue, **settings)  # type: ignore[arg-type]
    bound_s = stop_bound_s(configuration.load(path, environ={}))
    daemon = await start_daemon(path)
    try:
        held = (await submitter.run(REFLECTED))[-1]
        assert held.status == 5 and len(held.headers["HoldReason"]) <= MAX_TEXT_HEADER_BYTES
        await submitter.send({"Cmd": q("/bin/sh"), "Arguments": q(f"-c 'exec sleep 600 {marker}'")}, reply_to=REFUSING)
        await daemon.wait_for_line("state=unanswered", timeout_s=30)
        long = await submitter.send({"Cmd": q("/bin/sleep"), "Arguments": q("600")})
        await submitter.wait_running(long)
        started = time.monotonic()
        assert await daemon.stop(signal.SIGTERM, timeout_s=bound_s + 10) == 0
        elapsed = time.monotonic() - started
    finally:
        if daemon.proc.returncode is None:
            daemon.proc.kill()
            await daemon.proc.wait()
    assert elapsed < bound_s, f"stopped after {elapsed:.1f}s; the documented bound is {bound_s:.0f}s"
    log = "".join(daemon.log)
    assert "reconnected to the broker" not in log
    assert "FRAME_ERROR" not in log
    assert processes_with(marker) == []
    await submitter.sync()
    assert submitter.replies[long][-1].status == 1  # drained, then stopped (Idle) and requeued
    daemon = await start_daemon(path)
    try:
        await seed_runs(submitter)
        await submitter.wait_running(long)  # the requeued job runs again here
    finally:
        assert await daemon.stop(signal.SIGTERM, timeout_s=bound_s + 10) == 0


async def close_connections_of(node_name: str, stop: asyncio.Event) -> int:
    """Close carod's broker connection whenever it has one, until ``stop``; how many were closed."""
    closed = 0
    while not stop.is_set():
        for pid in await connections(node_name):
            await asyncio.to_thread(rabbitmqctl, "close_connection", pid, "carod stop test")
            closed += 1
        await asyncio.sleep(0.2)
    return closed


@needs_ctl
async def test_sigterm_stops_within_the_bound_while_the_broker_keeps_closing_the_connection(
    base: Path, queue: str
) -> None:
    name = f"node-{uuid.uuid4().hex[:8]}"
    settings = {"node": {"name": name, "drain_timeout_s": 3, "kill_grace_s": 2}, "broker": {"confirm_timeout_s": 5}}
    path = write_config(base, queue, **settings)  # type: ignore[arg-type]
    bound_s = stop_bound_s(configuration.load(path, environ={}))
    sub = await Submitter.open(queue, durable=True)  # survives the connection closes
    daemon = await start_daemon(path)
    stop = asyncio.Event()
    closing: asyncio.Task[int] | None = None
    try:
        long = await sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("600")})
        short = await sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("2")})  # ends during the drain
        await sub.wait_running(long)
        await sub.wait_running(short)
        closing = asyncio.create_task(close_connections_of(name, stop))
        await daemon.wait_for_line("reconnected to the broker", timeout_s=30)
        started = time.monotonic()
        assert await daemon.stop(signal.SIGTERM, timeout_s=bound_s + 10) == 0
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        closed = await closing if closing is not None else 0
        if daemon.proc.returncode is None:
            daemon.proc.kill()
            await daemon.proc.wait()
        await sub.close()
    assert closed >= 1
    assert elapsed < bound_s, f"stopped after {elapsed:.1f}s; the documented bound is {bound_s:.0f}s"
    daemon = await start_daemon(path)  # and it starts again; nothing was lost
    sub = await Submitter.open(queue)
    try:
        await seed_runs(sub)
    finally:
        assert await daemon.stop(signal.SIGTERM, timeout_s=bound_s + 10) == 0
        await sub.close()


# ---------------------------------------------------------------- a reused message_id


@pytest.fixture
async def attacker(queue: str) -> AsyncIterator[Submitter]:
    sub = await Submitter.open(queue)
    yield sub
    await sub.close()


def victim_job(seconds: float, secret: str) -> dict[str, str]:
    return {
        "Cmd": q("/bin/sh"),
        "Arguments": q(f"-c 'sleep {seconds}; echo {secret}'"),
        "Out": q("job.out"),
    }


async def assert_only_reuse_held(sub: Submitter, message_id: str, count: int, secret: str) -> None:
    """``sub`` got ``count`` replies for ``message_id``, each a Held one naming the reuse, nothing of the victim's."""
    await sub.sync()
    got = sub.replies.get(message_id, [])
    assert [r.status for r in got] == [5] * count
    for reply in got:
        assert reply.body == b"" and reply.headers["HoldReasonCode"] == 0
        assert "already used by another job" in literal(reply.headers["HoldReason"])
        assert all(secret not in str(value) for value in reply.headers.values())
        assert "ExitCode" not in reply.headers and "JobRunCount" in reply.headers
        assert reply.headers["JobRunCount"] == 0


async def test_a_reused_id_while_and_after_the_victim_runs_gets_only_held_replies(
    node: RunningNode, submitter: Submitter, attacker: Submitter, queue: str
) -> None:
    secret = f"victim-secret-{uuid.uuid4().hex}"
    mid = await submitter.send(victim_job(2, secret))
    assert mid is not None
    await submitter.wait_running(mid)
    await attacker.send({"Cmd": q("/bin/echo"), "Arguments": q("forged")}, message_id=mid)  # while it runs
    replies = await submitter.wait_final(mid, 30)
    assert replies[-1].status == 4 and replies[-1].zip_read("job.out") == f"{secret}\n".encode()
    await attacker.send({"Cmd": q("/bin/echo"), "Arguments": q("forged")}, message_id=mid)  # after its answer
    async with asyncio.timeout(20):
        while counter(node, "carod_jobs_reused_id") < 2:
            await asyncio.sleep(0.05)
    await seed_runs(submitter)
    await node.stop()  # everything delivered before is handled by now
    await assert_only_reuse_held(attacker, mid, 2, secret)
    await submitter.sync()
    assert len(submitter.finals(mid)) == 1
    assert counter(node, "carod_jobs_started") == 2  # the victim's job and the seed job; nothing forged ran
    assert await queue_depth(queue) == 0


@needs_ctl
async def test_a_reused_id_never_gets_the_victims_stored_answer(
    queue: str, base: Path, submitter: Submitter, attacker: Submitter
) -> None:
    """The victim's job finished while its delivery was elsewhere; its answer waits in the journal.

    A message with the victim's id and the attacker's reply_to then arrives
    first: it is answered Held (the id was used), never with the stored
    answer. The victim's own delivery, when it comes back, gets the stored answer.
    """
    node = await start_node(queue, base, node={"redelivery_wait_s": 1})
    thief = await aio_pika.connect(BROKER_URL)
    try:
        secret = f"victim-secret-{uuid.uuid4().hex}"
        # rabbitmqctl takes seconds on a busy machine: find carod's connection before the job starts,
        # and give the job long enough that closing the connection comes while it runs.
        (pid,) = await connections(node.name)
        mid = await submitter.send(victim_job(8, secret))
        assert mid is not None
        await submitter.wait_running(mid)
        # Another consumer takes the victim's message when carod's connection drops.
        channel = await thief.channel()
        await channel.set_qos(prefetch_count=1)
        taken: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not taken.done():
                taken.set_result(message)

        job_queue = await channel.declare_queue(queue, passive=True)
        tag = await job_queue.consume(take)
        await asyncio.to_thread(rabbitmqctl, "close_connection", pid, "carod reused-id test")
        victim_delivery = await asyncio.wait_for(taken, 30)
        assert victim_delivery.message_id == mid
        await job_queue.cancel(tag)  # it keeps the victim's delivery, unacked
        assert node.server.node is not None and node.server.journal is not None
        journal = node.server.journal
        async with asyncio.timeout(30):  # the job ends; no delivery comes back; the answer waits in the journal
            while mid in node.server.node.running or getattr(await journal.get(mid), "state", None) != "finished":
                await asyncio.sleep(0.05)
        await attacker.send({"Cmd": q("/bin/echo"), "Arguments": q("forged")}, message_id=mid)
        async with asyncio.timeout(20):
            while counter(node, "carod_jobs_reused_id") < 1:
                await asyncio.sleep(0.05)
        await assert_only_reuse_held(attacker, mid, 1, secret)
        await victim_delivery.nack(requeue=True)  # the victim's own message comes back to carod
        final = (await submitter.wait_final(mid, 30))[-1]
        assert final.status == 4 and final.zip_read("job.out") == f"{secret}\n".encode()
        await assert_only_reuse_held(attacker, mid, 1, secret)
        await seed_runs(submitter)
    finally:
        await thief.close()
        await node.stop()
    assert counter(node, "carod_jobs_started") == 2  # the victim's job (once) and the seed job
    assert await queue_depth(queue) == 0


async def test_a_journal_from_before_reply_addresses_were_kept_still_opens_and_answers(
    base: Path, queue: str, submitter: Submitter
) -> None:
    """The journal gains its reply_to column at start; an old record (no address) is not a reused id.

    Sent again (not a redelivery), its id is answered: a Held reply saying it
    was already answered (the old journal kept no reply to send again).
    """
    state = base / "state"
    state.mkdir()
    with sqlite3.connect(state / "journal.sqlite3") as db:
        db.execute(
            "CREATE TABLE jobs (message_id TEXT PRIMARY KEY, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " sequence INTEGER NOT NULL DEFAULT 0, sandbox TEXT, pid INTEGER, pid_start TEXT, created REAL NOT NULL,"
            " updated REAL NOT NULL)"
        )
        db.execute("INSERT INTO jobs VALUES ('old-job', 'replied', 1, 2, NULL, NULL, NULL, ?, ?)", (time.time(),) * 2)
    node = await start_node(queue, base)
    try:
        await submitter.send(SEED, message_id="old-job")  # answered before: not run again
        await seed_runs(submitter)
    finally:
        await node.stop()  # after the drain, every count is final
    await submitter.sync()
    [held] = submitter.replies.get("old-job", [])
    assert held.status == 5 and held.headers["HoldReasonCode"] == 0
    assert "already answered at " in literal(held.headers["HoldReason"])
    assert counter(node, "carod_jobs_received") == 2
    assert counter(node, "carod_jobs_started") == 1  # only the seed job ran
    assert counter(node, "carod_jobs_reused_id") == 0
    assert await queue_depth(queue) == 0


async def test_a_reply_queue_that_is_full_for_a_while_is_backpressure_not_a_refusal(
    queue: str, base: Path, submitter: Submitter, caplog: pytest.LogCaptureFixture
) -> None:
    """A nack (a full reply queue with x-overflow = reject-publish) is retried, not taken for a refused address."""
    caplog.set_level("WARNING", logger="carod")
    node = await start_node(queue, base)
    connection = await aio_pika.connect(BROKER_URL)
    try:
        channel = await connection.channel()
        name = f"test-full-{uuid.uuid4().hex[:10]}"
        replies_queue = await channel.declare_queue(
            name, exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await channel.default_exchange.publish(aio_pika.Message(b"blocker"), name)  # the queue is full now
        job = {"Cmd": q("/bin/sh"), "Arguments": q("-c 'sleep 4; echo done'"), "Out": q("out")}
        mid = await submitter.send(job, reply_to=name)
        async with asyncio.timeout(30):  # until carod's Running reply has been nacked at least once
            while not any("(nack)" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.05)
        blocker = await replies_queue.get(timeout=5)
        assert blocker.body == b"blocker"
        await blocker.ack()  # room again: the retried Running reply and then the final one get through
        statuses: list[int] = []
        async with asyncio.timeout(30):
            while not statuses or statuses[-1] not in (3, 4, 5):
                message = await replies_queue.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                await message.ack()
                if message.correlation_id == mid:
                    statuses.append(int((message.headers or {}).get("JobStatus", 0)))
        assert statuses == [2, 4], statuses  # Running, then Exited: not stopped and dropped as unanswerable
    finally:
        await connection.close()
        await node.stop()
