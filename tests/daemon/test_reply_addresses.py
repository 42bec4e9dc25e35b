"""Issue 18: RabbitMQ's AMQP 1.0 address forms in a job's reply_to, for real against a real carod.

Each accepted form reaches the queue it names (Running, then Exited with the
zip); any other address that starts with ``/`` is refused: the job is logged,
acknowledged, never run, and nothing is published for it anywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from tests.helpers import SEED, RunningNode, Submitter, queue_depth, seed_runs, start_node, unique


def counter(node: RunningNode, name: str) -> float:
    return node.server.metrics.registry.get_sample_value(f"{name}_total") or 0.0


@pytest.fixture
async def fanout(submitter: Submitter) -> AsyncIterator[str]:
    """A fanout exchange of the test's own, bound to the submitter's reply queue; deleted after it."""
    name = unique("fanout")
    exchange = await submitter.channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, auto_delete=False)
    await submitter.reply_queue.bind(exchange)
    yield name
    await submitter.channel.exchange_delete(name)


@pytest.mark.parametrize("form", ["/exchange/amq.direct/KEY", "/exchange/X", "/queue/Q", "/amq/queue/Q", "/topic/KEY"])
async def test_each_rabbitmq_address_form_gets_running_then_exited(
    form: str, node: RunningNode, submitter: Submitter, fanout: str
) -> None:
    key = unique("results")
    reply_queue = submitter.reply_queue
    if form == "/exchange/amq.direct/KEY":
        await reply_queue.bind("amq.direct", routing_key=key)
    if form == "/topic/KEY":
        await reply_queue.bind("amq.topic", routing_key=key)
    # the bindings go with the reply queue (exclusive, deleted when the submitter closes)
    reply_to = form.replace("KEY", key).replace("/X", f"/{fanout}").replace("/Q", f"/{reply_queue.name}")
    mid = await submitter.send(SEED, reply_to=reply_to)
    replies = await submitter.wait_final(mid)
    assert [r.status for r in replies] == [2, 4], reply_to
    running, done = replies
    assert running.headers["JobState"] == '"Running"'
    assert done.headers["JobState"] == '"Exited"'
    assert done.headers["ExitCode"] == 0
    assert done.correlation_id == mid
    assert done.zip_read("job.out") == b"Hello Grid!\n"


async def test_an_unusable_reply_to_is_logged_acknowledged_and_never_run(
    queue: str, base: Path, submitter: Submitter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="carod")
    lost = unique("nonsense")
    # Read as the Qpid form, "/<lost>/x" would go to the default exchange with routing key "<lost>/x":
    # a queue of that name shows that nothing is published there any more.
    trap = f"{lost}/x"
    await submitter.channel.declare_queue(trap, auto_delete=False)
    node = await start_node(queue, base, node={"slots": 1})
    try:
        first = await submitter.send(SEED, reply_to=f"/{trap}")
        second = await submitter.send(SEED, reply_to="/nonsense/x")
        await seed_runs(submitter)  # the next job still runs
        expected = {
            mid: f"job={mid} has an unusable reply_to '{address}' (it starts with '/' but is none of RabbitMQ's "
            "address forms /exchange/X/KEY, /exchange/X, /queue/Q, /amq/queue/Q, /topic/KEY): "
            "nobody can be told about it; dropped"
            for mid, address in ((first, f"/{trap}"), (second, "/nonsense/x"))
        }
        async with asyncio.timeout(20):
            while not all(any(r.getMessage() == line for r in caplog.records) for line in expected.values()):
                await asyncio.sleep(0.05)
        assert counter(node, "carod_jobs_unanswered") == 2
        assert counter(node, "carod_jobs_started") == 1  # the seed job only
        await submitter.sync()
        assert submitter.replies.get(first) is None and submitter.replies.get(second) is None
        assert await queue_depth(trap) == 0
    finally:
        await node.stop()
        await submitter.channel.queue_delete(trap)
    assert await queue_depth(queue) == 0  # both were acknowledged: nothing came back when the node stopped
