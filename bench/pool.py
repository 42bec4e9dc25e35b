"""The pool: what an unmatchable job costs, and how throughput scales with nodes.

    .venv/bin/python -m bench.pool [--jobs 300] [--window 10]

1. One node, one job no node matches (``max_offers`` high so it keeps
   coming back) and matchable jobs behind it: the unmatchable job's
   deliveries per second, and the matchable jobs' throughput with and without it.
2. The same short jobs (``/bin/sleep 0.05``) on one node and on three
   (Cpus 2, 2 and 1 through ``[machine]``): the time for all of them, and the ratio.

Real carod processes, default sandbox, the local RabbitMQ. Prints a table and
writes bench/results/pool-<timestamp>.json. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

from bench.harness import delete_queues

URL = os.environ.get("CAROD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
SHORT = {"Cmd": '"/bin/sleep"', "Arguments": '"0.05"'}


class Node:
    def __init__(self, queue: str, name: str, cpus: int, **broker: object) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="carod-bench-", dir="/tmp"))
        os.chmod(self.work, 0o711)  # noqa: S103 - the job user must traverse it
        extra = "".join(f"{k} = {v}\n" for k, v in broker.items())
        self.conf = self.work / "carod.conf"
        self.conf.write_text(
            f"[broker]\nurl = {URL}\nqueue = {queue}\nbinding_key = {queue}\n{extra}"
            f"[node]\nname = {name}\nsandbox_root = {self.work}/sandboxes\nstate_dir = {self.work}/state\n"
            f"[machine]\nCpus = {cpus}\n"
        )
        self.declines = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "carod", "--config", str(self.conf), stderr=asyncio.subprocess.PIPE
        )
        self.reader = asyncio.create_task(self._read())
        self.ready = asyncio.Event()
        await asyncio.wait_for(self.ready.wait(), 30)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode()
            if " ready:" in line:
                self.ready.set()
            if "state=declined" in line:
                self.declines += 1

    async def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        await self.proc.wait()
        await self.reader


class Jobs:
    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.finals: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def open(self) -> None:
        self.conn = await aio_pika.connect(URL)
        self.ch = await self.conn.channel()
        self.replies = await self.ch.declare_queue("", exclusive=True, auto_delete=True)
        await self.replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        headers = dict(msg.headers or {})
        if headers.get("JobStatus") in (4, 5):
            fut = self.finals.get(msg.correlation_id or "")
            if fut is not None and not fut.done():
                fut.set_result(headers)

    async def send(self, headers: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        mid = str(uuid.uuid4())
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.finals[mid] = fut
        await self.ch.default_exchange.publish(
            aio_pika.Message(b"", headers=headers, message_id=mid, reply_to=self.replies.name), self.queue
        )
        return fut

    async def batch(self, n: int) -> float:
        started = time.perf_counter()
        futures = [await self.send(SHORT) for _ in range(n)]
        await asyncio.wait_for(asyncio.gather(*futures), 300)
        return time.perf_counter() - started


async def unmatched(jobs_n: int, window_s: float) -> dict[str, Any]:
    queue = f"bench-pool-{uuid.uuid4().hex[:6]}"
    node = Node(queue, "bench-solo", 2, max_offers=100_000)
    await node.start()
    jobs = Jobs(queue)
    await jobs.open()
    try:
        clean_s = await jobs.batch(jobs_n)
        await jobs.send({**SHORT, "Requirements": "TARGET.HasGPU =?= TRUE"})
        started, before = time.perf_counter(), node.declines
        with_s = await jobs.batch(jobs_n)
        busy_deliveries_s = (node.declines - before) / (time.perf_counter() - started)
        started, before = time.perf_counter(), node.declines
        await asyncio.sleep(window_s)  # the node has nothing else to do: the worst case
        deliveries_s = (node.declines - before) / (time.perf_counter() - started)
    finally:
        await jobs.conn.close()
        await node.stop()
        await delete_queues(queue)
    return {
        "jobs": jobs_n,
        "throughput_alone_jobs_s": jobs_n / clean_s,
        "throughput_with_unmatchable_jobs_s": jobs_n / with_s,
        "unmatchable_deliveries_per_s_while_busy": busy_deliveries_s,
        "unmatchable_deliveries_per_s_idle": deliveries_s,
        "unmatched_delay_s": 1.0,
    }


async def scaling(jobs_n: int) -> dict[str, Any]:
    times = {}
    for label, cpus in (("one", (2,)), ("three", (2, 2, 1))):
        queue = f"bench-pool-{uuid.uuid4().hex[:6]}"
        nodes = [Node(queue, f"bench-{label}-{i}", c) for i, c in enumerate(cpus)]
        for node in nodes:
            await node.start()
        jobs = Jobs(queue)
        await jobs.open()
        try:
            await jobs.batch(20)  # warm-up
            times[label] = await jobs.batch(jobs_n)
        finally:
            await jobs.conn.close()
            for node in nodes:
                await node.stop()
            await delete_queues(queue)
    return {
        "jobs": jobs_n,
        "one_node_s": times["one"],
        "three_nodes_s": times["three"],
        "speedup": times["one"] / times["three"],
    }


async def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pool")
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--window", type=float, default=10.0, help="seconds to count the unmatchable job's deliveries")
    args = ap.parse_args()
    u = await unmatched(args.jobs, args.window)
    s = await scaling(args.jobs)
    print(
        f"unmatchable job: {u['unmatchable_deliveries_per_s_idle']:.2f} deliveries/s on an idle node, "
        f"{u['unmatchable_deliveries_per_s_while_busy']:.2f} while jobs run (unmatched_delay_s = 1.0)"
    )
    print(
        f"matchable jobs behind it: {u['throughput_with_unmatchable_jobs_s']:.1f} jobs/s "
        f"(alone: {u['throughput_alone_jobs_s']:.1f} jobs/s)"
    )
    print(
        f"{s['jobs']} x sleep 0.05: one node {s['one_node_s']:.2f}s, three nodes {s['three_nodes_s']:.2f}s, "
        f"speed-up x{s['speedup']:.2f}"
    )
    out = Path(__file__).parent / "results" / time.strftime("pool-%Y%m%dT%H%M%S.json")
    out.write_text(json.dumps({"cpus": os.cpu_count(), "unmatched": u, "scaling": s}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    asyncio.run(main())
