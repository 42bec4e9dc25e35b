"""Who may act on a job (issue 17): its owner (the validated user_id it was published with) or an admin.

Two broker users of the test's own (created and deleted with rabbitmqctl,
unique names): alice owns a job, eve does not; the node lists guest in
``[node] admins``. Refusals are answered with the reason, logged, and change nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from carod.client.library import Client, Submission, control_jobs, pool_status
from carod.edges.broker import held_queue_name
from carod.wire import control
from carod.wire.adverts import JobInfo
from tests.helpers import (
    BROKER_URL,
    RunningNode,
    Submitter,
    Users,
    needs_ctl,
    q,
    queue_depth,
    start_node,
    url_of,
)

pytestmark = needs_ctl

SLEEP = {"Cmd": '"/bin/sleep"', "Arguments": '"300"'}


@pytest.fixture
async def guarded(queue: str, base: Path, exchange: str) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base, node={"admins": "guest"}, pool={"exchange": exchange})
    yield running
    await running.stop()


async def ask(
    url: str, exchange: str, action: str, *ids: str, constraint: str | None = None
) -> dict[str, list[control.Answer]]:
    wait_s = 10 if constraint is None else 3
    return await control_jobs(url, action, ids, constraint=constraint, exchange=exchange, wait_s=wait_s)


async def next_status(job: Submission, status: int, timeout_s: float = 20) -> None:
    """Until the job's next reply with this JobStatus (replies consumed on the way)."""
    async with asyncio.timeout(timeout_s):
        while True:
            reply = await job._queue.get()
            job.history.append(reply)
            if reply.status == status:
                return


async def advertised(exchange: str, queue: str, mid: str) -> JobInfo | None:
    status = await pool_status(BROKER_URL, exchange=exchange, queue=queue, wait_s=2)
    return next((job for advert in status.adverts.values() for job in advert.jobs if job.message_id == mid), None)


async def test_the_broker_refuses_a_user_id_that_is_not_the_publishers(users: Users, queue: str) -> None:
    """What the rule rests on: eve cannot publish a message that says it is alice's."""
    connection = await aio_pika.connect(url_of(users.eve))
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="user_id property"):
            await channel.default_exchange.publish(aio_pika.Message(b"", user_id=users.alice), routing_key=queue)


async def test_hold_release_and_rm_are_refused_for_a_non_owner_and_done_for_the_owner_and_an_admin(
    guarded: RunningNode, users: Users, queue: str, exchange: str, caplog: pytest.LogCaptureFixture
) -> None:
    alice, eve = url_of(users.alice), url_of(users.eve)
    async with Client(alice, queue=queue) as client:
        job = await client.submit("/bin/sleep", ["300"])
        mid = job.message_id
        await next_status(job, 2)
        info = await advertised(exchange, queue, mid)
        assert info is not None and info.owner == users.alice and info.attrs["OwnerVerified"] == "true"

        # eve: refused, with the reason; the job runs on.
        for action in (control.HOLD, control.RM):
            with caplog.at_level(logging.WARNING, logger="carod.pool"):
                found = await ask(eve, exchange, action, mid)
            [answer] = found[mid]
            assert not answer.ok and answer.action == action and answer.state == "running"
            assert f"belongs to {users.alice}; {users.eve} is neither its owner nor an admin" in answer.reason
            assert f"carod {action} by {users.eve}" in caplog.text
        assert await ask(eve, exchange, control.RM, constraint=control.ALL) == {}, "-a: none of eve's"
        assert job.final is None and job._queue.empty()

        # alice holds her job; eve cannot release or remove it; guest, an admin, releases it.
        assert (await ask(alice, exchange, control.HOLD, mid))[mid][0].ok
        await next_status(job, 5)
        assert users.alice in str(job.history[-1].get("HoldReason"))
        for action in (control.RELEASE, control.RM):
            [answer] = (await ask(eve, exchange, action, mid))[mid]
            assert not answer.ok and answer.state == "held" and "neither its owner nor an admin" in answer.reason
        assert await queue_depth(held_queue_name(queue, mid)) == 1
        assert (await ask(BROKER_URL, exchange, control.RELEASE, mid))[mid][0].ok
        await next_status(job, 1)
        await next_status(job, 2)
        assert job.history[-1].get("JobRunCount") == 2
        info = await advertised(exchange, queue, mid)
        assert info is not None and info.owner == users.alice, "still alice's after the node republished it"

        # An admin's rm -a takes it.
        found = await ask(BROKER_URL, exchange, control.RM, constraint=control.ALL)
        assert [a.ok for a in found[mid]] == [True]
        await next_status(job, 3)
    assert await queue_depth(queue) == 0


async def test_a_job_without_user_id_is_owned_by_nobody_and_only_an_admin_may_act_on_it(
    guarded: RunningNode, users: Users, submitter: Submitter, queue: str, exchange: str
) -> None:
    mid = await submitter.send({**SLEEP, "Owner": q(users.alice)})  # says it is alice's: not verified
    assert mid is not None
    await submitter.wait_running(mid)
    info = await advertised(exchange, queue, mid)
    assert info is not None and info.owner == users.alice and info.attrs["OwnerVerified"] == "false"
    [answer] = (await ask(url_of(users.alice), exchange, control.RM, mid))[mid]
    assert not answer.ok and "no verified owner" in answer.reason
    assert submitter.finals(mid) == []
    assert (await ask(BROKER_URL, exchange, control.RM, mid))[mid][0].ok
    assert (await submitter.wait_final(mid))[-1].status == 3


async def test_a_request_without_user_id_is_refused(guarded: RunningNode, submitter: Submitter, exchange: str) -> None:
    mid = await submitter.send(SLEEP, user_id="guest")
    assert mid is not None
    await submitter.wait_running(mid)
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        inbox = await channel.declare_queue("", exclusive=True)
        body = control.encode_request(control.Request(control.RM, mid, "no name", "mallory"))
        await ex.publish(aio_pika.Message(body, reply_to=inbox.name), routing_key=control.CONTROL_KEY)
        async with asyncio.timeout(10):
            while (message := await inbox.get(fail=False)) is None:
                await asyncio.sleep(0.05)
        answer = control.decode_answer(message.body)
    assert not answer.ok and "no user_id" in answer.reason
    assert submitter.finals(mid) == []
    assert (await ask(BROKER_URL, exchange, control.RM, mid))[mid][0].ok
    assert (await submitter.wait_final(mid))[-1].status == 3
