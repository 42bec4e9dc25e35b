"""What every part of the benchmark shares: the seed job, a timing submitter, a carod process.

Used by bench/__main__.py, bench/cost.py, bench/steps.py, bench/ahead.py and bench/pool.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika

URL = os.environ.get("CAROD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
SEED: dict[str, Any] = {
    "Cmd": '"/bin/echo"',
    "Arguments": '"Hello Grid!"',
    "Out": '"job.out"',
    "Err": '"job.err"',
    "Requirements": "TRUE",
}
CPUS = os.cpu_count() or 1
MIB = 1024 * 1024


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


class Submitter:
    """Publishes jobs and times their replies (first status, final)."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.finals: dict[str, asyncio.Future[float]] = {}
        self.firsts: dict[str, asyncio.Future[float]] = {}

    async def open(self) -> None:
        self.conn = await aio_pika.connect(URL)
        self.ch = await self.conn.channel(publisher_confirms=False)
        self.replies = await self.ch.declare_queue("", exclusive=True, auto_delete=True)
        await self.replies.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        status = (msg.headers or {}).get("JobStatus")
        mid = msg.correlation_id or ""
        now = time.perf_counter()
        first = self.firsts.pop(mid, None)
        if status is not None and first is not None and not first.done():
            first.set_result(now)
        if status in (4, 5):
            fut = self.finals.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_result(now)

    async def publish(self, headers: dict[str, Any], body: bytes = b"") -> tuple[str, float]:
        mid = str(uuid.uuid4())
        loop = asyncio.get_running_loop()
        self.finals[mid] = loop.create_future()
        self.firsts[mid] = loop.create_future()
        t0 = time.perf_counter()
        # Not mandatory: before carod has declared its queue (start-up), a job is simply dropped and retried.
        await self.ch.default_exchange.publish(
            aio_pika.Message(body, headers=headers, message_id=mid, reply_to=self.replies.name),
            self.queue,
            mandatory=False,
        )
        return mid, t0

    async def one(self, headers: dict[str, Any] | None = None, body: bytes = b"") -> tuple[float, float]:
        """(time to first status, time to final reply) of one job."""
        mid, t0 = await self.publish(headers or SEED, body)
        first = self.firsts.get(mid)
        final = await asyncio.wait_for(self.finals[mid], 120)
        first_at = await first if first is not None else final
        return first_at - t0, final - t0

    async def latency(self, jobs: int) -> list[float]:
        for _ in range(20):  # warm-up
            await self.one()
        return [(await self.one())[1] for _ in range(jobs)]

    async def burst(self, n: int) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(self.one() for _ in range(n)))
        return n / (time.perf_counter() - t0)

    async def close(self) -> None:
        await self.conn.close()


async def delete_queues(*queues: str, suffixes: tuple[str, ...] = (".unmatched", ".dead")) -> None:
    """Each job queue with the delay and dead-letter queues made beside it (carod's by default)."""
    conn = await aio_pika.connect(URL)
    async with conn:
        ch = await conn.channel()
        for queue in queues:
            for name in (queue, *(queue + suffix for suffix in suffixes)):
                await ch.queue_delete(name)


async def summary(name: str, queue: str, jobs: int, burst: int) -> dict[str, Any]:
    sub = Submitter(queue)
    await sub.open()
    lat = await sub.latency(jobs)
    rate = await sub.burst(burst)
    await sub.close()
    return {
        "name": name,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": pct(lat, 0.99) * 1e3,
        "throughput_jobs_s": rate,
        "latencies_ms": [x * 1e3 for x in lat],
    }


class Carod:
    """A carod process (with the loop-lag probe of bench/carod_lag.py) on its own queue."""

    def __init__(self, *, node: str = "", machine: str = "") -> None:
        self.queue = f"bench-carod-{uuid.uuid4().hex[:6]}"
        self.work = Path(tempfile.mkdtemp(prefix="carod-bench-", dir="/tmp"))
        os.chmod(self.work, 0o711)  # noqa: S103 - the job user must traverse it
        self.conf = self.work / "carod.conf"
        self.stats = self.work / "lag.json"
        self.conf.write_text(
            f"[broker]\nurl = {URL}\nqueue = {self.queue}\nbinding_key = {self.queue}\n"
            f"[node]\nsandbox_root = {self.work}/sandboxes\nstate_dir = {self.work}/state\nlog_level = WARNING\n"
            f"{node}\n" + (f"[machine]\n{machine}\n" if machine else "")
        )
        os.chmod(self.conf, 0o640)  # it names the broker's password: carod warns otherwise
        self.marks = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.carod_lag", str(self.conf), str(self.stats)
        )
        # Ready when it consumes (it declared the queue and answers a job).
        sub = Submitter(self.queue)
        await sub.open()
        deadline = time.monotonic() + 30
        while True:
            try:
                await asyncio.wait_for(sub.one(), 2)
                break
            except TimeoutError:
                if time.monotonic() > deadline or self.proc.returncode is not None:
                    raise RuntimeError("carod did not start") from None
        await sub.close()
        await asyncio.sleep(1)  # settle (adverts, first timers)

    def status(self, field: str) -> float:
        """A /proc/<pid>/status field in MiB (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def lag(self) -> dict[str, float]:
        """Event-loop lag since the previous call."""
        self.marks += 1
        self.proc.send_signal(signal.SIGUSR2)
        for _ in range(200):
            await asyncio.sleep(0.01)
            try:
                stats: dict[str, float] = json.loads(self.stats.read_text())
            except (OSError, ValueError):
                continue
            if stats["mark"] == self.marks:
                return stats
        raise RuntimeError("carod did not report its loop lag")

    async def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        await self.proc.wait()
        await delete_queues(self.queue)
        subprocess.run(["rm", "-rf", str(self.work)], check=False)  # noqa: ASYNC221 - after the run
