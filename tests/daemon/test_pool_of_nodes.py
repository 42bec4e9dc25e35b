"""A pool, not a node: three carod processes on one queue (issue 5).

Each node has its own config and machine ad (different Cpus, Memory, a
custom HasFoo). Jobs with mixed Requirements and Request* must each run once
on a node that matches them, no node may run more at once than its resources
allow, unmatchable jobs are Held after a bounded number of offers, and
`carod status` shows the pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import BROKER_URL, CAROD, Daemon, Submitter, q, queue_depth, start_daemon, write_config

#: Short delays so unmatched jobs come back quickly, and quick adverts.
BROKER = {"max_offers": 3, "unmatched_delay_s": 0.3}
POOL = {"advertise_interval_s": 0.5, "node_timeout_s": 5}  # a client command can take 3 s to start on a busy machine


@dataclass(frozen=True)
class Spec:
    name: str
    cpus: int
    memory_mib: int
    has_foo: bool | None


NODES = (
    Spec("pool-a", cpus=1, memory_mib=512, has_foo=True),
    Spec("pool-b", cpus=2, memory_mib=1024, has_foo=False),
    Spec("pool-c", cpus=2, memory_mib=2048, has_foo=None),
)


def machine_of(spec: Spec) -> dict[str, str]:
    machine = {"Cpus": str(spec.cpus), "Memory": str(spec.memory_mib)}
    if spec.has_foo is not None:
        machine["HasFoo"] = "TRUE" if spec.has_foo else "FALSE"
    return machine


async def start_pool(queue: str, base: Path, specs: tuple[Spec, ...], suffix: str = "") -> dict[str, Daemon]:
    daemons = {}
    for spec in specs:
        name = spec.name + suffix
        (base / name).mkdir(mode=0o711)
        config = write_config(
            base / name,
            queue,
            node={"name": name, "slots": 0, "drain_timeout_s": 30},
            broker=BROKER,
            machine=machine_of(spec),
            pool=POOL,
        )
        daemons[name] = await start_daemon(config)
    return daemons


async def stop_all(daemons: dict[str, Daemon]) -> None:
    codes = await asyncio.gather(*(d.stop() for d in daemons.values()))
    assert codes == [0] * len(codes), [d.log[-5:] for d in daemons.values()]


@pytest.fixture
async def pool_sub(queue: str) -> AsyncIterator[Submitter]:
    sub = await Submitter.open(queue)
    yield sub
    await sub.close()


#: (kind, job headers beyond Cmd/Out, nodes that can run it, RequestCpus, RequestMemory)
KINDS: dict[str, tuple[dict[str, object], set[str], int, int]] = {
    "any": ({}, {"pool-a", "pool-b", "pool-c"}, 1, 128),
    "foo": ({"Requirements": "HasFoo =?= TRUE"}, {"pool-a"}, 1, 128),
    "bigmem": ({"RequestMemory": 1500}, {"pool-c"}, 1, 1500),
    "twocpu": ({"RequestCpus": 2, "RequestMemory": 256}, {"pool-b", "pool-c"}, 2, 256),
    "midmem": ({"Requirements": "TARGET.TotalMemory >= 1000", "RequestMemory": 600}, {"pool-b", "pool-c"}, 1, 600),
    "nomatch": ({"Requirements": "TARGET.HasGPU =?= TRUE"}, set(), 1, 128),
}

#: The job prints when it started and ended (wall clock, seconds), around a short sleep.
TIMED = {
    "Cmd": q("/bin/sh"),
    "Arguments": q("-c 'date +%s.%N; sleep 0.05; date +%s.%N'"),
    "Out": q("times"),
}


def peak_usage(runs: list[tuple[float, float, int, int]]) -> tuple[int, int]:
    """(max cpus, max memory) in use at once, from (start, end, cpus, memory) intervals."""
    events = sorted([(s, 1, c, m) for s, _e, c, m in runs] + [(e, -1, c, m) for _s, e, c, m in runs])
    cpus = memory = peak_cpus = peak_memory = 0
    for _t, sign, c, m in events:  # ends sort before starts at the same instant
        cpus += sign * c
        memory += sign * m
        peak_cpus, peak_memory = max(peak_cpus, cpus), max(peak_memory, memory)
    return peak_cpus, peak_memory


async def test_three_nodes_300_mixed_jobs(queue: str, base: Path, pool_sub: Submitter) -> None:
    daemons = await start_pool(queue, base, NODES)
    rng = random.Random(5)  # noqa: S311 - a reproducible shuffle, not a secret
    weights = {"any": 150, "foo": 40, "bigmem": 20, "twocpu": 40, "midmem": 44, "nomatch": 6}
    kinds = [kind for kind, n in weights.items() for _ in range(n)]
    rng.shuffle(kinds)
    assert len(kinds) == 300
    sent: dict[str, tuple[str, float]] = {}
    try:
        for kind in kinds:
            extra = KINDS[kind][0]
            mid = await pool_sub.send({**TIMED, **extra})
            assert mid is not None
            sent[mid] = (kind, time.monotonic())
        held_after: dict[str, float] = {}
        for mid, (kind, published) in sent.items():
            await pool_sub.wait_final(mid, timeout_s=120)
            if kind == "nomatch":
                held_after[mid] = time.monotonic() - published
        makespan_s = max(time.monotonic() - p for _, p in sent.values())
    finally:
        await stop_all(daemons)
    await pool_sub.sync()

    runs: dict[str, list[tuple[float, float, int, int]]] = {spec.name: [] for spec in NODES}
    for mid, (kind, _) in sent.items():
        finals = pool_sub.finals(mid)
        assert len(finals) == 1, (kind, [r.headers for r in pool_sub.replies[mid]])
        final = finals[0]
        _extra, allowed, cpus, memory = KINDS[kind]
        if kind == "nomatch":
            assert final.status == 5
            reason = final.headers["HoldReason"]
            assert "no execute node matched the job's Requirements after 3 offers over" in reason
            assert "(Requirements = TARGET.HasGPU is true;" in reason
            continue
        assert final.status == 4, final.headers
        node = final.headers["RemoteHost"].strip('"')
        assert node in allowed, f"{kind} job ran on {node}"
        # every reply of the job came from that node: it ran there once
        assert {r.headers["RemoteHost"] for r in pool_sub.replies[mid]} == {q(node)}
        start, end = (float(x) for x in final.zip_read("times").split())
        runs[node].append((start, end, cpus, memory))

    for spec in NODES:
        assert runs[spec.name], f"{spec.name} ran nothing"
        peak_cpus, peak_memory = peak_usage(runs[spec.name])
        assert peak_cpus <= spec.cpus, (spec.name, peak_cpus)
        assert peak_memory <= spec.memory_mib, (spec.name, peak_memory)
    # Held within the configured bound: max_offers offers, each after at most
    # unmatched_delay_s in the delay queue plus its wait in the job queue.
    bound_s = BROKER["max_offers"] * (BROKER["unmatched_delay_s"] + makespan_s)
    assert held_after and max(held_after.values()) <= bound_s
    # ...and spread over time, not a hot loop
    assert min(held_after.values()) >= (BROKER["max_offers"] - 1) * BROKER["unmatched_delay_s"]


async def run_batch(queue: str, sub: Submitter, n: int) -> float:
    started = time.monotonic()
    mids = [await sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("0.05")}) for _ in range(n)]
    for mid in mids:
        replies = await sub.wait_final(mid, timeout_s=120)
        assert replies[-1].status == 4
    return time.monotonic() - started


async def test_throughput_scales_with_nodes(queue: str, base: Path, pool_sub: Submitter) -> None:
    one = await start_pool(queue, base, (NODES[1],), suffix="-solo")
    try:
        alone_s = await run_batch(queue, pool_sub, 300)
    finally:
        await stop_all(one)
    three = await start_pool(queue, base, NODES, suffix="-trio")
    try:
        pooled_s = await run_batch(queue, pool_sub, 300)
    finally:
        await stop_all(three)
    ratio = alone_s / pooled_s
    print(f"\n300 jobs: one node {alone_s:.2f}s, three nodes {pooled_s:.2f}s, speed-up {ratio:.2f}x")
    assert pooled_s < alone_s


def carod_status(queue: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CAROD, "status", "--url", BROKER_URL, "--queue", queue, "--wait", "3", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CAROD_BROKER_URL": BROKER_URL},
    )


async def status_json(queue: str) -> dict[str, dict[str, object]]:
    done = await asyncio.to_thread(carod_status, queue, "--json")
    assert done.returncode == 0, done.stderr
    adverts = [json.loads(line) for line in done.stdout.splitlines()]
    return {a["node"]: a for a in adverts}


def ad_value(advert: dict[str, object], name: str) -> float:
    for part in str(advert["ad"]).replace("[", "").replace("]", "").split(";"):
        key, _, value = part.partition("=")
        if key.strip() == name:
            return float(value)
    raise KeyError(name)


async def test_status_lists_the_pool_and_drops_stopped_nodes(queue: str, base: Path, pool_sub: Submitter) -> None:
    daemons = await start_pool(queue, base, NODES)
    try:
        # one long job on each of two nodes
        long_a = await pool_sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("12"), "Requirements": "HasFoo =?= TRUE"})
        long_c = await pool_sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("12"), "RequestMemory": 1500})
        await pool_sub.wait_running(long_a)
        await pool_sub.wait_running(long_c)
        seen = await status_json(queue)
        assert set(seen) == {"pool-a", "pool-b", "pool-c"}
        assert ad_value(seen["pool-a"], "Cpus") == 0 and ad_value(seen["pool-a"], "TotalCpus") == 1
        assert ad_value(seen["pool-c"], "Memory") == 2048 - 1500 and ad_value(seen["pool-c"], "TotalMemory") == 2048
        assert ad_value(seen["pool-b"], "Cpus") == 2 and ad_value(seen["pool-b"], "JobsRunning") == 0
        assert [j["message_id"] for j in seen["pool-a"]["jobs"]] == [long_a]  # type: ignore[index]

        table = await asyncio.to_thread(carod_status, queue)
        assert table.returncode == 0
        lines = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:4]}
        assert lines["pool-a"][1:5] == ["Running", "0/1", "384/512", "1"]
        assert lines["pool-b"][1:5] == ["Running", "2/2", "1024/1024", "0"]
        long_form = await asyncio.to_thread(carod_status, queue, "-l", "pool-c")
        assert "TotalMemory = 2048" in long_form.stdout and long_form.stdout.count(long_c) == 1

        # a node stopped with SIGTERM says so and is gone at once
        assert await daemons.pop("pool-b").stop() == 0
        seen = await status_json(queue)
        assert set(seen) == {"pool-a", "pool-c"}
        # a node killed outright is listed as silent, then dropped after node_timeout_s
        killed = daemons.pop("pool-c")
        killed.proc.kill()
        await killed.proc.wait()
        killed_at = time.monotonic()
        table = await asyncio.to_thread(carod_status, queue)
        assert "pool-c" in table.stdout and "Unresponsive" in table.stdout
        while "pool-c" in table.stdout:
            assert time.monotonic() - killed_at < 20, table.stdout
            table = await asyncio.to_thread(carod_status, queue)
        assert time.monotonic() - killed_at >= POOL["node_timeout_s"]
        assert "pool-a" in table.stdout
        # restarted on the same state, it cleans up what the kill left (its job's cgroup) and rejoins
        daemons["pool-c"] = await start_daemon(base / "pool-c" / "carod.conf")
        seen = await status_json(queue)
        assert set(seen) == {"pool-a", "pool-c"}
    finally:
        await stop_all(daemons)


async def test_start_policy_uses_job_and_node_state_and_is_reread_on_sighup(
    queue: str, base: Path, pool_sub: Submitter
) -> None:
    policy = 'TARGET.Owner =!= "mallory" && JobsRunning < 1'
    config = write_config(base, queue, node={"start": policy}, broker={"max_offers": 3, "unmatched_delay_s": 0.1})
    daemon = await start_daemon(config)
    try:
        refused = await pool_sub.wait_final(await pool_sub.send({"Cmd": q("/bin/true"), "Owner": q("mallory")}))
        assert [r.status for r in refused] == [5]
        assert "start policy refuses the job" in refused[0].headers["HoldReason"]
        # JobsRunning < 1: one job at a time, though the node has two slots
        first = await pool_sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("0.5"), "Owner": q("alice")})
        second = await pool_sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("0.5"), "Owner": q("alice")})
        await pool_sub.wait_final(first)
        await pool_sub.wait_final(second)
        events = [(mid, status) for mid, status in pool_sub.order if mid in (first, second)]
        assert [status for _, status in events] == [2, 4, 2, 4], f"the jobs overlapped: {events}"
        assert events[0][0] == events[1][0]

        config.write_text(config.read_text().replace('"mallory"', '"alice"'))
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_for_line("SIGHUP: reloaded")
        assert (await pool_sub.run({"Cmd": q("/bin/true"), "Owner": q("mallory")}))[-1].status == 4
        assert (await pool_sub.run({"Cmd": q("/bin/true"), "Owner": q("alice")}))[-1].status == 5
        assert await daemon.stop() == 0
    finally:
        if daemon.proc.returncode is None:
            await daemon.stop()


async def queue_stays(queue: str, depth: int, for_s: float) -> None:
    """The queue keeps ``depth`` ready messages throughout ``for_s`` (nobody takes them)."""
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        assert await queue_depth(queue) == depth
        await asyncio.sleep(0.05)


async def test_node_holds_only_what_it_can_start(queue: str, base: Path, pool_sub: Submitter) -> None:
    config = write_config(base, queue, node={"slots": 0}, machine={"Cpus": "2", "Memory": "1024"})
    daemon = await start_daemon(config)
    try:
        clock = {"Cmd": q("/bin/sh"), "Out": q("t")}
        one_cpu = await pool_sub.send({**clock, "Arguments": q("-c 'sleep 1.5; date +%s.%N'")})
        await pool_sub.wait_running(one_cpu)
        # fits the machine, not what is free: it waits here (no other node could take it sooner)
        two_cpus = await pool_sub.send({**clock, "Arguments": q("-c 'date +%s.%N'"), "RequestCpus": 2})
        await daemon.wait_for_line("state=waiting")
        # the node is full now: the next job stays in the queue for any other node
        behind = await pool_sub.send({"Cmd": q("/bin/true")})
        await queue_stays(queue, 1, for_s=0.5)
        for mid in (one_cpu, two_cpus, behind):
            assert (await pool_sub.wait_final(mid))[-1].status == 4
        one_ended = float(pool_sub.finals(one_cpu)[0].zip_read("t"))
        two_started = float(pool_sub.finals(two_cpus)[0].zip_read("t"))
        assert one_ended < two_started
        # a job that can never fit this machine is not held here either
        too_big = await pool_sub.send({"Cmd": q("/bin/true"), "RequestMemory": 4096})
        held = await pool_sub.wait_final(too_big)
        assert held[-1].status == 5 and "RequestMemory 4096 > TotalMemory 1024" in held[-1].headers["HoldReason"]
        assert await daemon.stop() == 0
    finally:
        if daemon.proc.returncode is None:
            await daemon.stop()


async def test_a_job_past_the_delivery_limit_is_held(queue: str, base: Path, pool_sub: Submitter) -> None:
    broker = {"delivery_limit": 2, "unmatched_delay_s": 0.1}
    config = write_config(base, queue, broker=broker)
    daemon = await start_daemon(config)  # declares the queues with x-delivery-limit = 2
    assert await daemon.stop() == 0
    mid = await pool_sub.send({"Cmd": q("/bin/true")})
    # a consumer that keeps failing: every delivery ends without an answer
    channel = await pool_sub.connection.channel()
    job_queue = await channel.declare_queue(queue, passive=True)
    for _ in range(3):
        message = await job_queue.get(timeout=10, fail=True)
        assert message is not None and message.message_id == mid
        await message.nack(requeue=True)
    await channel.close()
    async with asyncio.timeout(10):  # the broker gives up on it
        while await queue_depth(f"{queue}.dead") != 1:
            await asyncio.sleep(0.02)
    daemon = await start_daemon(config)
    try:
        replies = await pool_sub.wait_final(mid)
        assert [r.status for r in replies] == [5]
        assert "delivery limit ([broker] delivery_limit = 2)" in replies[0].headers["HoldReason"]
    finally:
        assert await daemon.stop() == 0
