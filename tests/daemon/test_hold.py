"""carod hold / release / rm of held jobs (issue 17): what the submitter sees, what the broker keeps.

A held job's message waits in its own durable queue ``<queue>.held.<hash>``
(carod.node.holding): these tests look at that queue on the broker, at the
replies, at the node's advert (what carod q shows) and at the job's process.
Ownership and admins: tests/daemon/test_ownership.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from carod.client.library import control_jobs, pool_status
from carod.edges.broker import held_queue_name
from carod.wire import control
from carod.wire.adverts import JobInfo
from tests.helpers import BROKER_URL, CAROD, Reply, RunningNode, Submitter, q, queue_depth, start_node

#: A job that leaves a mark when its KillSig (SIGTERM) reaches it, and counts its runs in its output.
TRAPPED = {
    "Cmd": q("/bin/sh"),
    "Arguments": q("-c 'trap \"echo trapped; exit 3\" TERM; echo started; sleep 300 & wait'"),
}


@pytest.fixture
async def pooled(queue: str, base: Path, exchange: str) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base, pool={"exchange": exchange})
    yield running
    await running.stop()


async def act(
    exchange: str, action: str, *ids: str, constraint: str | None = None, reason: str = "", by: str = ""
) -> dict[str, list[control.Answer]]:
    """What the nodes answered (for a constraint, everything within 3 s: how many will answer is not known)."""
    wait_s = 10 if constraint is None else 3
    return await control_jobs(
        BROKER_URL, action, ids, constraint=constraint, reason=reason, by=by, exchange=exchange, wait_s=wait_s
    )


async def held_queue_exists(queue: str, mid: str) -> bool:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(held_queue_name(queue, mid), passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True


async def advertised(exchange: str, queue: str, mid: str) -> JobInfo | None:
    status = await pool_status(BROKER_URL, exchange=exchange, queue=queue, wait_s=2)
    return next((job for advert in status.adverts.values() for job in advert.jobs if job.message_id == mid), None)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"
    except FileNotFoundError:
        return False


async def hold_running(submitter: Submitter, exchange: str, queue: str, headers: dict[str, str]) -> tuple[str, Reply]:
    """Submit a job, hold it once it runs; its Held reply."""
    mid = await submitter.send(headers, user_id="guest")
    assert mid is not None
    await submitter.wait_running(mid)
    pid = int(submitter.replies[mid][0].headers["JobPid"])
    found = await act(exchange, control.HOLD, mid, reason="maintenance window", by="alice@host")
    assert [(a.state, a.ok, a.action) for a in found[mid]] == [("running", True, "hold")]
    held = (await submitter.wait_final(mid, timeout_s=20))[-1]
    assert not alive(pid)
    return mid, held


async def test_hold_of_a_running_job_kills_it_answers_held_and_the_broker_keeps_it_until_released(
    pooled: RunningNode, submitter: Submitter, queue: str, exchange: str
) -> None:
    mid, held = await hold_running(submitter, exchange, queue, TRAPPED)
    assert held.status == 5 and held.headers["HoldReasonCode"] == 1, held.headers
    reason = held.headers["HoldReason"]
    assert "held by alice@host (broker user guest) via carod hold: maintenance window" in reason
    assert held.headers["ExitCode"] == 3, "its KillSig (SIGTERM) ran its trap"
    assert held.headers["JobRunCount"] == 1
    # Kept by the broker, not in the job queue, not run again; advertised held.
    assert await queue_depth(held_queue_name(queue, mid)) == 1
    assert await queue_depth(queue) == 0
    info = await advertised(exchange, queue, mid)
    assert info is not None and info.status == 5 and info.owner == "guest"
    assert info.attrs["HoldReasonCode"] == "1" and "maintenance window" in info.attrs["HoldReason"]
    count = len(submitter.replies[mid])

    found = await act(exchange, control.RELEASE, mid, reason="window over")
    assert [(a.state, a.ok) for a in found[mid]] == [("released", True)]
    idle = await submitter.wait_reply(mid, 1, after=count)
    assert "released" in idle.headers["LastVacateReason"] and "window over" in idle.headers["LastVacateReason"]
    running = await submitter.wait_reply(mid, 2, after=count)
    assert running.headers["JobRunCount"] == 2
    assert [r.status for r in submitter.replies[mid][count:]][:2] == [1, 2], "Idle first, then Running"
    assert (
        idle.headers["Sequence"] > held.headers["Sequence"] and running.headers["Sequence"] > idle.headers["Sequence"]
    )
    assert not await held_queue_exists(queue, mid)
    info = await advertised(exchange, queue, mid)
    assert info is not None and info.status == 2

    found = await act(exchange, control.RM, mid)
    assert [a.state for a in found[mid]] == ["running"]
    final = await submitter.wait_reply(mid, 3, after=count)
    assert final.headers["JobRunCount"] == 2
    assert await queue_depth(queue) == 0


async def test_released_job_runs_to_its_end_with_its_run_count(
    pooled: RunningNode, submitter: Submitter, queue: str, exchange: str
) -> None:
    job = {"Cmd": q("/bin/sh"), "Arguments": q("-c 'sleep 3; echo done'"), "Out": q("out")}
    mid, held = await hold_running(submitter, exchange, queue, job)
    assert held.status == 5
    count = len(submitter.replies[mid])
    assert (await act(exchange, control.RELEASE, mid))[mid][0].ok
    got = await submitter.wait_final(mid, timeout_s=30)
    statuses = [r.status for r in got[count:]]
    assert statuses == [1, 2, 4], statuses
    assert got[-1].headers["JobRunCount"] == 2 and got[-1].zip_read("out") == b"done\n"
    assert await queue_depth(queue) == 0


async def test_a_job_held_before_it_arrives_is_held_on_arrival_and_rm_deletes_it(
    pooled: RunningNode, submitter: Submitter, queue: str, exchange: str
) -> None:
    mid = "hold-early-" + os.urandom(4).hex()
    assert await act(exchange, control.HOLD, mid, reason="not yet") == {mid: []}  # nobody has it yet
    await submitter.send({"Cmd": q("/bin/echo"), "Arguments": q("never")}, message_id=mid, user_id="guest")
    got = await submitter.wait_final(mid)
    assert [r.status for r in got] == [5], "held on arrival: never Running"
    assert got[-1].headers["HoldReasonCode"] == 1 and "not yet" in got[-1].headers["HoldReason"]
    assert await queue_depth(held_queue_name(queue, mid)) == 1
    info = await advertised(exchange, queue, mid)
    assert info is not None and info.status == 5 and info.cmd == "/bin/echo"

    found = await act(exchange, control.RM, mid, reason="not needed")
    assert [(a.state, a.ok) for a in found[mid]] == [("held", True)]
    removed = await submitter.wait_reply(mid, 3)
    assert "not needed" in removed.headers["RemoveReason"]
    assert not await held_queue_exists(queue, mid), "the held message is gone from the broker"
    assert await advertised(exchange, queue, mid) is None
    await submitter.sync()
    assert [r.status for r in submitter.replies[mid]] == [5, 3]


async def test_hold_and_release_across_a_node_restart(
    queue: str, base: Path, exchange: str, submitter: Submitter
) -> None:
    first = await start_node(queue, base, pool={"exchange": exchange})
    try:
        job = {"Cmd": q("/bin/sh"), "Arguments": q("-c 'sleep 2; echo again'"), "Out": q("out")}
        mid, held = await hold_running(submitter, exchange, queue, job)
        assert held.status == 5
    finally:
        await first.stop()
    assert await queue_depth(held_queue_name(queue, mid)) == 1, "kept by the broker while its node is away"
    assert await queue_depth(queue) == 0
    second = await start_node(queue, base, pool={"exchange": exchange})
    try:
        info = await advertised(exchange, queue, mid)
        assert info is not None and info.status == 5, "the restarted node still advertises it held"
        count = len(submitter.replies[mid])
        assert (await act(exchange, control.RELEASE, mid))[mid][0].ok
        got = await submitter.wait_final(mid, timeout_s=30)
        assert [r.status for r in got[count:]] == [1, 2, 4]
        assert got[-1].headers["JobRunCount"] == 2 and got[-1].zip_read("out") == b"again\n"
    finally:
        await second.stop()
    assert not await held_queue_exists(queue, mid)


async def test_hold_release_and_rm_with_a_constraint_and_all(
    pooled: RunningNode, submitter: Submitter, queue: str, exchange: str
) -> None:
    ids = []
    for _ in range(2):
        mid = await submitter.send(TRAPPED, user_id="guest")
        assert mid is not None
        ids.append(mid)
    for mid in ids:
        await submitter.wait_running(mid)
    found = await act(exchange, control.HOLD, constraint=f'MessageId == "{ids[1]}" && JobStatus == 2', reason="one")
    assert list(found) == [ids[1]] and found[ids[1]][0].ok
    assert (await submitter.wait_final(ids[1]))[-1].status == 5
    assert submitter.finals(ids[0]) == []
    found = await act(exchange, control.RELEASE, constraint=control.ALL)
    assert list(found) == [ids[1]], "release -a acts on the held job only"
    await submitter.wait_reply(ids[1], 2, after=2)
    found = await act(exchange, control.RM, constraint=control.ALL, reason="all of them")
    assert sorted(found) == sorted(ids)
    for mid in ids:
        final = await submitter.wait_reply(mid, 3)
        assert "all of them" in final.headers["RemoveReason"]
    assert await queue_depth(queue) == 0


async def test_bad_constraints_are_refused_by_the_client(exchange: str) -> None:
    with pytest.raises(Exception, match="does not parse"):
        await act(exchange, control.HOLD, constraint="Owner ==")


async def test_hold_of_a_job_waiting_for_a_slot_holds_it_without_running_it(
    queue: str, base: Path, exchange: str, submitter: Submitter
) -> None:
    running = await start_node(queue, base, node={"slots": 1}, pool={"exchange": exchange})
    try:
        first = await submitter.send(TRAPPED, user_id="guest")
        await submitter.wait_running(first)
        second = await submitter.send({"Cmd": q("/bin/echo"), "Arguments": q("hi")}, user_id="guest")
        assert first is not None and second is not None
        # The second waits on the node or in the queue (prefetch follows free slots): either way it is held.
        await act(exchange, control.HOLD, second, reason="later")
        await act(exchange, control.RM, first)
        assert (await submitter.wait_final(first))[-1].status == 3
        got = await submitter.wait_final(second)
        assert [r.status for r in got] == [5], "held, never Running"
        assert await queue_depth(held_queue_name(queue, second)) == 1
        assert (await act(exchange, control.RM, second))[second][0].ok
        await submitter.wait_reply(second, 3)
        assert not await held_queue_exists(queue, second)
    finally:
        await running.stop()
    assert await queue_depth(queue) == 0


async def carod(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CAROD, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CAROD_BROKER_URL": BROKER_URL},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_hold_release_and_rm_all_from_the_command_line(
    pooled: RunningNode, submitter: Submitter, queue: str, exchange: str
) -> None:
    mid = await submitter.send(TRAPPED, user_id="guest")
    assert mid is not None
    await submitter.wait_running(mid)
    pool = ("--pool-exchange", exchange, "--wait", "5")
    code, out, err = await carod("hold", *pool, "--reason", "from the shell", mid)
    assert (code, out) == (0, f"{mid}: held on {pooled.name} (running)\n"), err
    held = (await submitter.wait_final(mid))[-1]
    assert "from the shell" in held.headers["HoldReason"]
    code, out, err = await carod("hold", *pool, mid)
    assert code == 1 and f"{mid}: refused by {pooled.name}: it is already held" in err
    count = len(submitter.replies[mid])
    code, out, err = await carod("release", *pool, mid)
    assert (code, out) == (0, f"{mid}: released on {pooled.name} (released)\n"), err
    await submitter.wait_reply(mid, 2, after=count)
    code, out, err = await carod("rm", *pool, "-a", "--wait", "2")
    assert code == 0 and f"{mid}: removed on {pooled.name} (running)" in out, err
    await submitter.wait_reply(mid, 3, after=count)
    code, out, err = await carod("rm", *pool, "-a", mid)
    assert code == 2 and "not both" in err
    code, out, err = await carod("release", *pool, "-constraint", "Owner ==")
    assert code == 2 and "does not parse" in err
