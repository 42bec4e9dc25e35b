"""Latency and throughput of the seed job: carod vs. a null responder.

    .venv/bin/python -m bench [--jobs 300] [--burst 2000]

`null` answers each job message at once without running anything (the broker
round trip, the floor). `carod` is a real carod process with its default
settings (slots = CPUs), jobs as `nobody`, on the local RabbitMQ. Each job is
`/bin/echo "Hello Grid!"` with Out/Err to files and the result zip returned.
Prints a table and writes bench/results/<timestamp>.json. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

URL = os.environ.get("CAROD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
SEED = {
    "Cmd": '"/bin/echo"',
    "Arguments": '"Hello Grid!"',
    "Out": '"job.out"',
    "Err": '"job.err"',
    "Requirements": "TRUE",
}


class Submitter:
    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.waiters: dict[str, asyncio.Future[float]] = {}

    async def open(self) -> None:
        self.conn = await aio_pika.connect(URL)
        self.ch = await self.conn.channel(publisher_confirms=False)
        self.replies = await self.ch.declare_queue("", exclusive=True, auto_delete=True)
        await self.replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        h = msg.headers or {}
        if h.get("JobStatus") in (4, 5):
            fut = self.waiters.pop(msg.correlation_id or "", None)
            if fut is not None and not fut.done():
                fut.set_result(time.perf_counter())

    async def one(self) -> float:
        mid = str(uuid.uuid4())
        fut = asyncio.get_running_loop().create_future()
        self.waiters[mid] = fut
        t0 = time.perf_counter()
        await self.ch.default_exchange.publish(
            aio_pika.Message(b"", headers=SEED, message_id=mid, reply_to=self.replies.name), self.queue
        )
        return (await asyncio.wait_for(fut, 60)) - t0

    async def burst(self, n: int) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(self.one() for _ in range(n)))
        return n / (time.perf_counter() - t0)

    async def close(self) -> None:
        await self.conn.close()


async def null_responder(queue: str, stop: asyncio.Event) -> None:
    conn = await aio_pika.connect(URL)
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=os.cpu_count() or 1)
    q = await ch.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})

    async def on(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        await ch.default_exchange.publish(
            aio_pika.Message(b"", headers={"JobStatus": 4, "JobState": '"Exited"'}, correlation_id=msg.message_id),
            msg.reply_to or "",
        )
        await msg.ack()

    await q.consume(on)
    await stop.wait()
    await ch.queue_delete(queue)
    await conn.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def measure(name: str, queue: str, jobs: int, burst: int) -> dict[str, Any]:
    sub = Submitter(queue)
    await sub.open()
    for _ in range(20):  # warm-up
        await sub.one()
    lat = sorted([await sub.one() for _ in range(jobs)])
    rate = await sub.burst(burst)
    await sub.close()
    return {
        "name": name,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
        "throughput_jobs_s": rate,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--burst", type=int, default=2000)
    args = ap.parse_args()
    results = []

    queue = f"bench-null-{uuid.uuid4().hex[:6]}"
    stop = asyncio.Event()
    task = asyncio.create_task(null_responder(queue, stop))
    await asyncio.sleep(0.5)
    results.append(await measure("null", queue, args.jobs, args.burst))
    stop.set()
    await task

    queue = f"bench-carod-{uuid.uuid4().hex[:6]}"
    work = Path(tempfile.mkdtemp(prefix="carod-bench-", dir="/tmp"))
    os.chmod(work, 0o711)  # noqa: S103 - the job user must traverse it
    conf = work / "carod.conf"
    conf.write_text(
        f"[broker]\nurl = {URL}\nqueue = {queue}\nbinding_key = {queue}\n"
        f"[node]\nsandbox_root = {work}/sandboxes\nstate_dir = {work}/state\nlog_level = WARNING\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carod", "--config", str(conf), stderr=asyncio.subprocess.PIPE
    )
    await asyncio.sleep(2)
    idle_rss = rss_kib(proc.pid)
    r = await measure("carod", queue, args.jobs, args.burst)
    r["rss_idle_mib"] = idle_rss / 1024
    r["rss_after_mib"] = rss_kib(proc.pid) / 1024
    results.append(r)
    proc.send_signal(signal.SIGTERM)
    await proc.wait()
    conn = await aio_pika.connect(URL)
    async with conn:
        ch = await conn.channel()
        await ch.queue_delete(queue)
        await ch.queue_delete(f"{queue}.unmatched")
        await ch.queue_delete(f"{queue}.dead")

    null = results[0]
    print(f"{'':8} {'p50 ms':>8} {'p99 ms':>8} {'jobs/s':>8}")
    for row in results:
        print(f"{row['name']:8} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['throughput_jobs_s']:8.0f}")
    p50_ratio = r["p50_ms"] / null["p50_ms"]
    rate_ratio = r["throughput_jobs_s"] / null["throughput_jobs_s"]
    print(f"carod/null: p50 x{p50_ratio:.2f}, throughput x{rate_ratio:.2f}")
    print(f"carod RSS: {r['rss_idle_mib']:.1f} MiB idle, {r['rss_after_mib']:.1f} MiB after the burst")
    out = Path(__file__).parent / "results" / time.strftime("%Y%m%dT%H%M%S.json")
    out.write_text(
        json.dumps({"cpus": os.cpu_count(), "jobs": args.jobs, "burst": args.burst, "results": results}, indent=2)
    )
    print(f"written: {out}")


if __name__ == "__main__":
    asyncio.run(main())
