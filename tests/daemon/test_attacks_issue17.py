"""Attacks on issue 17's ownership and held jobs, by another broker user (eve) against alice's jobs.

The node logs in as guest (the nodes' own broker user) and lists no admins; alice
and eve are broker users of the test's own (created and deleted with rabbitmqctl),
each allowed everything on the vhost, as a pool that does not restrict queue
names would. What each attack tries and what a user sees: docs/security.md,
"Attacks tried".
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from carod.client.library import Client, Submission, control_jobs, pool_status
from carod.edges.broker import held_queue_name
from carod.wire import control
from carod.wire.adverts import JobInfo
from carod.wire.message import OWNER_HEADER, RUNS_HEADER, SEQUENCE_HEADER
from tests.helpers import (
    BROKER_URL,
    RunningNode,
    Submitter,
    Users,
    needs_ctl,
    q,
    queue_depth,
    raw_zip,
    start_node,
    url_of,
)

pytestmark = needs_ctl

SLEEP = {"Cmd": q("/bin/sleep"), "Arguments": q("300")}


@pytest.fixture
async def node(queue: str, base: Path, exchange: str) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base, pool={"exchange": exchange})
    yield running
    await running.stop()


@dataclass
class Eve:
    """A broker user publishing raw messages as herself, with a reply queue of her own."""

    user: str
    connection: AbstractConnection
    channel: AbstractChannel
    inbox: AbstractQueue
    replies: list[AbstractIncomingMessage] = field(default_factory=list)

    async def publish(
        self, routing_key: str, headers: dict[str, Any], *, message_id: str, reply_to: str | None = None
    ) -> None:
        message = aio_pika.Message(
            b"",
            headers=headers,
            message_id=message_id,
            reply_to=reply_to or self.inbox.name,
            user_id=self.user,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self.channel.default_exchange.publish(message, routing_key)

    async def reply(self, status: int, timeout_s: float = 20) -> AbstractIncomingMessage:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.inbox.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                self.replies.append(message)
                if (message.headers or {}).get("JobStatus") == status:
                    return message


@pytest.fixture
async def eve(users: Users) -> AsyncIterator[Eve]:
    connection = await aio_pika.connect(url_of(users.eve))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        inbox = await channel.declare_queue("", exclusive=True)
        yield Eve(users.eve, connection, channel, inbox)


async def ask(url: str, exchange: str, action: str, *ids: str) -> dict[str, list[control.Answer]]:
    return await control_jobs(url, action, ids, exchange=exchange, wait_s=10)


async def next_status(job: Submission, status: int, timeout_s: float = 20) -> dict[str, object]:
    """The job's next reply with this JobStatus (replies consumed on the way)."""
    async with asyncio.timeout(timeout_s):
        while True:
            reply = await job._queue.get()
            job.history.append(reply)
            if reply.status == status:
                return dict(reply.headers)


async def advertised(exchange: str, queue: str, mid: str) -> JobInfo | None:
    status = await pool_status(BROKER_URL, exchange=exchange, queue=queue, wait_s=2)
    return next((job for advert in status.adverts.values() for job in advert.jobs if job.message_id == mid), None)


def descendants_argv(pid: int) -> set[tuple[bytes, ...]]:
    """The argv of every process under ``pid``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found = set()
    for child in parents:
        up = child
        while up in parents and up != pid:
            up = parents[up]
        if up == pid and child != pid:
            try:
                found.add(tuple((Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")[:-1]))
            except OSError:
                continue
    return found


async def test_forged_node_headers_from_another_user_give_neither_ownership_nor_runs(
    node: RunningNode, users: Users, eve: Eve, queue: str, exchange: str
) -> None:
    """eve sends a job saying a node republished it for alice, with 7 runs and Sequence 50: none of it counts."""
    mid = str(uuid.uuid4())
    forged = {**SLEEP, OWNER_HEADER: users.alice, RUNS_HEADER: 7, SEQUENCE_HEADER: 50, "Owner": q(users.alice)}
    await eve.publish(queue, forged, message_id=mid)
    running = (await eve.reply(2)).headers or {}
    assert running["JobRunCount"] == 1 and running["Sequence"] == 1, running
    info = await advertised(exchange, queue, mid)
    assert info is not None and info.owner == users.eve and info.attrs["OwnerVerified"] == "true"
    [answer] = (await ask(url_of(users.alice), exchange, control.RM, mid))[mid]
    assert not answer.ok and f"belongs to {users.eve}" in answer.reason
    assert (await ask(url_of(users.eve), exchange, control.RM, mid))[mid][0].ok
    assert ((await eve.reply(3)).headers or {})["JobRunCount"] == 1


async def test_a_message_put_into_a_held_queue_by_another_user_is_not_released_as_the_owners(
    node: RunningNode, users: Users, eve: Eve, queue: str, exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    """eve takes alice's held copy out of its queue and puts her own job there, saying it is alice's.

    Before the fix the release republished eve's message with alice as its verified owner. Now only
    a copy whose user_id (validated by the broker) is the node's is released; eve's is dropped, logged.
    """
    alice = url_of(users.alice)
    async with Client(alice, queue=queue) as client:
        job = await client.submit("/bin/sleep", ["300"])
        mid = job.message_id
        await next_status(job, 2)
        assert (await ask(alice, exchange, control.HOLD, mid))[mid][0].ok
        await next_status(job, 5)
        held = held_queue_name(queue, mid)
        assert await queue_depth(held) == 1

        stolen = await (await eve.channel.get_queue(held, ensure=False)).get(fail=True)
        assert stolen is not None
        await stolen.ack()
        forged = {**SLEEP, OWNER_HEADER: users.alice, RUNS_HEADER: 1}
        await eve.publish(held, forged, message_id=mid)
        assert await queue_depth(held) == 1

        with caplog.at_level(logging.WARNING, logger="carod.broker"):
            [answer] = (await ask(alice, exchange, control.RELEASE, mid))[mid]
        assert answer.ok, answer
        assert "had a message not kept by a node" in caplog.text and users.eve in caplog.text
        assert await queue_depth(queue) == 0, "eve's message was not put in the job queue"
        assert await advertised(exchange, queue, mid) is None, "nothing runs as alice's job"
    assert eve.replies == [] and await eve.inbox.get(fail=False) is None


async def test_a_reused_id_from_another_user_is_not_kept_as_the_held_jobs_copy(
    node: RunningNode, users: Users, eve: Eve, queue: str, exchange: str
) -> None:
    """eve sends a job with the id of alice's held job (from her own reply queue, then from alice's).

    Neither copy goes into alice's held queue; alice's release runs alice's job, still hers.
    """
    alice = url_of(users.alice)
    async with Client(alice, queue=queue) as client:
        job = await client.submit("/bin/sleep", ["300"])
        mid = job.message_id
        await next_status(job, 2)
        assert (await ask(alice, exchange, control.HOLD, mid))[mid][0].ok
        await next_status(job, 5)
        held = held_queue_name(queue, mid)

        await eve.publish(queue, {**SLEEP, "Arguments": q("301")}, message_id=mid)
        refused = (await eve.reply(5)).headers or {}
        assert "already used by another job" in str(refused["HoldReason"]) and refused["JobRunCount"] == 0

        assert client._reply_queue is not None
        await eve.publish(queue, {**SLEEP, "Arguments": q("302")}, message_id=mid, reply_to=client._reply_queue.name)
        spoof = await next_status(job, 5)
        assert "already used by another job" in str(spoof["HoldReason"]) and spoof["JobRunCount"] == 0
        assert spoof["Sequence"] == 1, "a reply of its own, below alice's job's Sequence"
        assert await queue_depth(held) == 1, "only alice's copy is kept"

        assert (await ask(alice, exchange, control.RELEASE, mid))[mid][0].ok
        await next_status(job, 1)
        running = await next_status(job, 2)
        assert running["JobRunCount"] == 2
        assert descendants_argv(int(str(running["JobPid"]))) >= {(b"/bin/sleep", b"300")}, "alice's own job runs"
        info = await advertised(exchange, queue, mid)
        assert info is not None and info.owner == users.alice and info.cmd == "/bin/sleep"
        assert (await ask(alice, exchange, control.RM, mid))[mid][0].ok
        await next_status(job, 3)
    assert await queue_depth(queue) == 0


#: A job that connects to its chirp socket as fast as it can from 16 threads for 4 s, sending nothing.
FLOOD = b"""import socket, threading, time, collections
counts = collections.Counter()
end = time.monotonic() + 4
def hammer():
    while time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect("/usr/libexec/condor/carod-chirp.sock")
            s.settimeout(0.2)
            counts[s.recv(40)[:8]] += 1
        except OSError as exc:
            counts[exc.errno] += 1
        finally:
            s.close()
threads = [threading.Thread(target=hammer) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
print(dict(counts), sum(counts.values()), flush=True)
"""


async def test_a_flood_of_chirp_connections_does_not_stall_the_node(node: RunningNode, submitter: Submitter) -> None:
    """16 threads connecting to the job's chirp socket for 4 s: carod's event loop (the test's) keeps ticking."""
    headers = {
        "Cmd": q("/bin/bash"),
        "Arguments": q("-c '/usr/bin/python3 -I -S flood.py; condor_chirp set_job_attr After 1; echo rc=$?'"),
        "Out": q("out"),
        "Err": q("err"),
        "WantIOProxy": "TRUE",
    }
    lags: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - t0 - 0.01)

    ticker = asyncio.create_task(tick())
    try:
        final = (await submitter.run(headers, body=raw_zip(("flood.py", FLOOD, 0o100644)), timeout_s=60))[-1]
    finally:
        done.set()
        await ticker
    out = final.zip_read("out").decode()
    # 11,285 connections in 4 s here, each answered EBUSY at once (the first ones hold every slot for 5 s):
    # the job only hurts its own chirp; the loop's worst tick was 0.14 s late.
    assert "b'error 16'" in out and "rc=0" in out, out
    assert final.headers["After"] == "1", "the job's chirp works once its own flood ends"
    assert max(lags) < 1.0, f"carod's loop stalled {max(lags):.2f} s"


@pytest.mark.skipif(os.geteuid() != 0, reason="slirp4netns runs as root")
async def test_outbound_does_not_reach_the_nodes_loopback_by_any_other_address(
    queue: str, base: Path, submitter: Submitter
) -> None:
    """An outbound job tries the broker (127.0.0.1:5672 on the node) at every address that might lead there."""
    from tests.daemon.test_network import IP, PROBE, no_slirp_left, policy_node

    shown = subprocess.run([IP, "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    node_addresses = sorted({line.split()[3].split("/")[0] for line in shown.splitlines()} - {"127.0.0.1"})
    assert node_addresses, shown
    targets = {
        "own-loopback": "127.0.0.1:5672",
        "gateway": "10.0.2.2:5672",
        "gateway-epmd": "10.0.2.2:4369",
        "dns-alias": "10.0.2.3:5672",
        "loopback-2": "127.0.0.2:5672",
        **{f"node-{address}": f"{address}:5672" for address in node_addresses},
    }
    # The control: a service of the node's on 0.0.0.0 is reached at the node's address (docs/security.md says so).
    public = socket.create_server(("0.0.0.0", 0))  # noqa: S104 - the point of the control
    public_port = public.getsockname()[1]
    node = await policy_node(queue, base, "outbound")
    try:
        args = f"public={node_addresses[0]}:{public_port} " + " ".join(
            f"{name}={where}" for name, where in targets.items()
        )
        headers = {"Cmd": q("/usr/bin/python3"), "Arguments": q(f"probe.py {args}"), "Out": q("out")}
        final = (await submitter.run(headers, body=raw_zip(("probe.py", PROBE, 0o100644)), timeout_s=60))[-1]
    finally:
        await node.stop()
        public.close()
    no_slirp_left()
    assert final.status == 4, final.headers
    seen = dict(line.split(maxsplit=1) for line in final.zip_read("out").decode().splitlines())
    assert seen.pop("public").startswith("ok"), seen
    assert set(seen) == set(targets), seen
    for name, said in seen.items():
        assert said.startswith("failed:") and ("refused" in said or "unreachable" in said), (name, said)


async def test_another_users_requests_neither_undo_nor_replace_a_hold_waiting_for_the_job(
    node: RunningNode, users: Users, queue: str, exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    """alice holds her job before it reaches the node; eve releases it, then asks to rm it, before it comes.

    Before the fix eve's release forgot alice's hold (no owner is known before the job comes) and the
    job ran; her rm replaced alice's hold, and was then refused. Now each requester's is kept and undone
    only by them (or an admin).
    """
    alice, eve = url_of(users.alice), url_of(users.eve)
    mid = "early-" + uuid.uuid4().hex
    assert await control_jobs(alice, control.HOLD, [mid], reason="alice's hold", exchange=exchange, wait_s=2) == {
        mid: []
    }
    for action in (control.RELEASE, control.RM):
        assert await control_jobs(eve, action, [mid], exchange=exchange, wait_s=2) == {mid: []}
    async with Client(alice, queue=queue) as client:
        with caplog.at_level(logging.WARNING, logger="carod.job"):
            job = await client.submit("/bin/echo", ["never"], message_id=mid)
            held = await next_status(job, 5)
        assert [reply.status for reply in job.history] == [5], "held on arrival: never Running"
        assert "alice's hold" in str(held["HoldReason"])
        assert f"carod rm before it came here refused: the job belongs to {users.alice}" in caplog.text
        assert await queue_depth(held_queue_name(queue, mid)) == 1
        assert (await ask(alice, exchange, control.RM, mid))[mid][0].ok
        await next_status(job, 3)


async def test_a_held_queue_declared_ahead_by_another_user_does_not_make_the_hold_loop(
    node: RunningNode, users: Users, eve: Eve, queue: str, exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    """eve declares the held queue alice's running job's id names, with other arguments (x-max-length 0).

    Before the fix every hold failed (PRECONDITION_FAILED), the job went back to the queue and came
    straight back to be held again: every ~3 ms, an ERROR each time, alice never answered. Now the
    copy goes into a queue of a random name, journaled; release and rm find it there.
    """
    alice = url_of(users.alice)
    async with Client(alice, queue=queue) as client:
        job = await client.submit("/bin/sleep", ["300"])
        mid = job.message_id
        await next_status(job, 2)
        taken = held_queue_name(queue, mid)
        await eve.channel.declare_queue(taken, durable=True, arguments={"x-max-length": 0})
        try:
            with caplog.at_level(logging.INFO, logger="carod.job"):
                assert (await ask(alice, exchange, control.HOLD, mid))[mid][0].ok
                held = await next_status(job, 5)
            assert "held by" in str(held["HoldReason"]) and held["HoldReasonCode"] == 1
            assert "kept in a queue of a random name instead" in caplog.text
            assert caplog.text.count("could not be held") == 0
            assert await queue_depth(taken) == 0
            info = await advertised(exchange, queue, mid)
            assert info is not None and info.status == 5
            assert (await ask(alice, exchange, control.RELEASE, mid))[mid][0].ok
            await next_status(job, 1)
            assert (await next_status(job, 2))["JobRunCount"] == 2
            assert (await ask(alice, exchange, control.RM, mid))[mid][0].ok
            await next_status(job, 3)
        finally:
            await eve.channel.queue_delete(taken)
    assert await queue_depth(queue) == 0
