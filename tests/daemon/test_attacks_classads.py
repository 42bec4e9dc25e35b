"""Issue 14: ClassAds that cost without bound to evaluate, in job ads and in forged pool adverts.

Each test performs the attack against a real carod and a real broker and
asserts what a user sees: the job is Held with a reason naming the bound and
the attribute (HoldReasonCode 21), the node's memory stays small, and the
node goes on running the seed job. The pure bound (carod.wire.adcost), the
evaluator and the advert checks are tested without a broker in tests/wire and tests/node.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import classad2
import pytest

from carod.holdcodes import HoldCode
from carod.wire import adcost
from tests.helpers import (
    BROKER_URL,
    RunningNode,
    Submitter,
    forged,
    machine_text,
    q,
    seed_runs,
    start_daemon,
    start_node,
    strcat_doublings,
    sum_doublings,
    write_config,
)

SEED = {"Cmd": q("/bin/echo"), "Arguments": q("Hello Grid!"), "Out": q("job.out"), "Requirements": "TRUE"}


HELD = 5


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def assert_held_for_evaluation(replies: list[Any], *needles: str) -> str:
    final = replies[-1]
    assert final.status == HELD, final.headers
    assert final.headers["HoldReasonCode"] == int(HoldCode.JOB_POLICY_UNDEFINED)
    reason = str(final.headers["HoldReason"])
    for needle in needles:
        assert needle in reason, reason
    return reason


# ---------------------------------------------------------------- job ads


async def test_strcat_doublings_are_held_and_carod_stays_small(queue: str, base: Path, submitter: Submitter) -> None:
    config = write_config(base, queue, node={"eval_timeout_s": 2, "eval_memory_mib": 256})
    daemon = await start_daemon(config)
    try:
        before_kib = vm_kib(daemon.proc.pid, "VmRSS")
        replies = await submitter.run(strcat_doublings(12), timeout_s=60)
        reason = assert_held_for_evaluation(replies, "the job's ClassAd took more than", "to evaluate", "attribute A")
        assert "256 MiB" in reason or "2 s" in reason, reason
        # carod itself never built the strings: its peak RSS is what it was, give or take (the attack took +618 MiB).
        peak_kib = vm_kib(daemon.proc.pid, "VmHWM")
        assert peak_kib < before_kib + 64 * 1024, (before_kib, peak_kib)
        await seed_runs(submitter)
        assert await daemon.stop() == 0
        # ...and it starts again cleanly and serves.
        daemon = await start_daemon(config)
        await seed_runs(submitter)
    finally:
        assert await daemon.stop() == 0, "".join(daemon.log[-20:])


@pytest.fixture
async def evalnode(queue: str, base: Path) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base, node={"eval_timeout_s": 1, "eval_memory_mib": 256})
    yield running
    await running.stop()


async def test_exponential_time_without_functions_is_held(evalnode: RunningNode, submitter: Submitter) -> None:
    evaluator = evalnode.server.node.evaluator  # type: ignore[union-attr]
    child = evaluator.pid
    replies = await submitter.run(sum_doublings(30), timeout_s=30)
    assert_held_for_evaluation(replies, "took more than 1 s to evaluate", "attribute A")
    # The hung child was killed and replaced; the next costly-looking ad is evaluated by the new one.
    assert evaluator.pid != child
    fine = await submitter.run({**SEED, "Cmd": 'replaceAll("x", "/bin/xcho", "e")'})  # /bin/echo, via the child
    assert fine[-1].status == 4 and fine[-1].zip_read("job.out") == b"Hello Grid!\n", fine[-1].headers
    await seed_runs(submitter)


async def test_replace_all_quadratic_is_held_for_memory(queue: str, base: Path, submitter: Submitter) -> None:
    # A time bound the quadratic blow-up cannot reach first, even on a busy host: the memory bound stops it.
    running = await start_node(queue, base, node={"eval_timeout_s": 30, "eval_memory_mib": 64})
    try:
        job = {"Cmd": q("/bin/echo"), "S": q("x" * 20_000), "Junk": 'replaceAll(".", S, S)'}
        replies = await submitter.run(job, timeout_s=60)
        assert_held_for_evaluation(replies, "took more than 64 MiB to evaluate", "attribute Junk")
        await seed_runs(submitter)
    finally:
        await running.stop()


async def test_sprintf_width(evalnode: RunningNode, submitter: Submitter) -> None:
    evaluator = evalnode.server.node.evaluator  # type: ignore[union-attr]
    # Evaluated once, in the child: the ClassAd library answers ERROR (it does for any sprintf), so the job runs.
    before = evaluator.preflights
    replies = await submitter.run({**SEED, "Junk": 'sprintf("%999999999d", 1)'})
    assert replies[-1].status == 4, replies[-1].headers
    assert evaluator.preflights == before + 1
    # About the machine, it would be evaluated at every match: refused, with the reason.
    about_machine = {**SEED, "Requirements": 'sprintf("%999999999d", TARGET.Memory) != ""'}
    assert_held_for_evaluation(
        await submitter.run(about_machine), "the job's Requirements depends on the machine", "sprintf()"
    )
    await seed_runs(submitter)


async def test_plain_ads_take_the_fast_path(evalnode: RunningNode, submitter: Submitter) -> None:
    evaluator = evalnode.server.node.evaluator  # type: ignore[union-attr]
    before = evaluator.preflights
    job = {**SEED, "RequestMemory": 64, "Requirements": "TARGET.Memory >= MY.RequestMemory && TARGET.Cpus >= 1"}
    assert (await submitter.run(job))[-1].status == 4
    assert evaluator.preflights == before


# ---------------------------------------------------------------- forged adverts


async def publish(exchange: str, key: str, body: bytes) -> None:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        await ex.publish(aio_pika.Message(body), routing_key=key)


async def until(condition: Any, timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_forged_advert_with_doublings_is_dropped(
    queue: str, base: Path, exchange: str, submitter: Submitter
) -> None:
    running = await start_node(queue, base, pool={"exchange": exchange, "max_advert_kib": 256})
    try:
        advertiser, node = running.server.advertiser, running.server.node
        assert advertiser is not None and node is not None
        doublings = {"A0": q("x" * 1000), **{f"A{i}": f"strcat(A{i - 1}, A{i - 1})" for i in range(1, 21)}}
        evil = machine_text(**doublings, Start="size(A20) > 0")
        await publish(exchange, "advert.evil", forged("evil", queue, evil))
        await publish(exchange, "advert.huge", forged("huge", queue, machine_text(Pad=q("y" * 300_000))))
        await until(lambda: advertiser.dropped.dropped >= 2)
        assert not {"evil", "huge"} & set(node.pool.peers)
        # A cheap forged advert is kept (adverts are not authenticated), and matching goes on.
        await publish(exchange, "advert.cheap", forged("cheap", queue, machine_text()))
        await until(lambda: "cheap" in node.pool.peers)
        await seed_runs(submitter)
    finally:
        await running.stop()


async def test_a_job_only_a_forged_node_matches_is_still_held(
    queue: str, base: Path, exchange: str, submitter: Submitter
) -> None:
    running = await start_node(
        queue,
        base,
        broker={"max_offers": 3, "unmatched_delay_s": 0.05, "max_pass_s": 1},
        pool={"exchange": exchange, "advertise_interval_s": 1, "node_timeout_s": 30},
    )
    stop = asyncio.Event()

    async def keep_advertising() -> None:
        while not stop.is_set():
            await publish(exchange, "advert.ghost", forged("ghost", queue, machine_text()))
            await asyncio.sleep(0.2)

    ghost = asyncio.create_task(keep_advertising())
    try:
        node = running.server.node
        assert node is not None
        await until(lambda: "ghost" in node.pool.peers)
        mid = await submitter.send({"Cmd": q("/bin/true"), "Requirements": "TARGET.HasGPU =?= TRUE"})
        replies = await submitter.wait_final(mid, timeout_s=60)
        assert replies[-1].status == HELD, replies[-1].headers
        reason = str(replies[-1].headers["HoldReason"])
        assert "no execute node matched" in reason and "ghost" in reason and "max_pass_s" in reason, reason
        await seed_runs(submitter)
    finally:
        stop.set()
        await ghost
        await running.stop()


def toupper_chain(levels: int, width: int = 100_000) -> dict[str, Any]:
    """Each level walks the whole string: cheap by steps and by bytes alone, costly by both together."""
    ad: dict[str, Any] = {**SEED, "T0": classad2.quote("a" * width)}
    for i in range(1, levels + 1):
        ad[f"T{i}"] = f"toupper(T{i - 1})"
    ad["Cmd"] = f'strcat("/bin/echo", substr(T{levels}, 0, 0))'
    return ad


async def test_a_chain_that_walks_a_long_string_never_runs_on_the_loop(
    evalnode: RunningNode, submitter: Submitter
) -> None:
    """300 toupper() over a 100 KB string passed the steps and bytes bounds and blocked the loop 1.4 s a message."""
    found = adcost.problem({k: str(v) for k, v in toupper_chain(300).items() if k != "Arguments"})
    assert found is not None and "steps over up to" in found[1], found
    evaluator = evalnode.server.node.evaluator  # type: ignore[union-attr]
    before = evaluator.preflights
    replies = await submitter.run(toupper_chain(300), timeout_s=30)
    assert evaluator.preflights == before + 1  # the bounded child did the work, not carod's loop
    assert_held_for_evaluation(replies, "to evaluate (attribute T")  # the child's bound, not carod's loop
    await seed_runs(submitter)
