"""carod against the alternatives, in one run: null responder, Celery, carod.

    make bench        # = .venv/bin/python -m bench (Celery from the `bench` extra)
    .venv/bin/python -m bench [--jobs 300] [--burst 2000] [--only null,celery,carod] [--no-extras]

Every contender does the seed job (`/bin/echo "Hello Grid!"`, Out/Err to
files, the working directory zipped and returned) on the local RabbitMQ:

* ``null``: an aio-pika responder that answers each job message at once
  without running anything (the broker round trip: the floor);
* ``celery``: a Celery worker (prefork, concurrency = cores, acks_late,
  rpc:// results) whose task runs the job with subprocess and zipfile
  (bench/celery_app.py);
* ``carod``: a real carod process, default config (bubblewrap, cgroups,
  setpriv, journal), jobs as ``nobody``.

For each: latency p50/p99 of sequential jobs (publish to final reply),
throughput of a burst; for carod its RSS idle, with 1,000 jobs waiting in
its queue, and its peak. Extras (carod only): event-loop lag while a job
returns a 200 MB result and while a 50 MB input is unpacked, time to first
status with that input, throughput as slots go from 1 to 2 x cores, and the
cost of ClassAd parse + match. Prints a table with the targets of issue 6
and writes bench/results/<time>.json. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import aio_pika

from carod.client import Client
from carod.config import Config
from carod.node.machine import detect
from carod.wire import classads, jobad
from carod.wire.message import parse_envelope

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


def _pct(values: list[float], q: float) -> float:
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


async def delete_queues(*queues: str) -> None:
    """Each job queue with the delay and dead-letter queues carod made beside it (if any)."""
    conn = await aio_pika.connect(URL)
    async with conn:
        ch = await conn.channel()
        for queue in queues:
            for name in (queue, f"{queue}.unmatched", f"{queue}.dead"):
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
        "p99_ms": _pct(lat, 0.99) * 1e3,
        "throughput_jobs_s": rate,
    }


# ------------------------------------------------------------------ null


async def run_null(args: argparse.Namespace) -> dict[str, Any]:
    queue = f"bench-null-{uuid.uuid4().hex[:6]}"
    conn = await aio_pika.connect(URL)
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=CPUS)
    q = await ch.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})

    async def on(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        await ch.default_exchange.publish(
            aio_pika.Message(b"", headers={"JobStatus": 4, "JobState": '"Exited"'}, correlation_id=msg.message_id),
            msg.reply_to or "",
        )
        await msg.ack()

    await q.consume(on)
    try:
        return await summary("null", queue, args.jobs, args.burst)
    finally:
        await ch.queue_delete(queue)
        await conn.close()


# ---------------------------------------------------------------- celery


async def run_celery(args: argparse.Namespace) -> dict[str, Any]:
    queue = f"bench-celery-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, BENCH_CELERY_QUEUE=queue, CAROD_BROKER_URL=URL)
    celery = Path(sys.executable).with_name("celery")
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for below
        [str(celery), "-A", "bench.celery_app", "worker", "-P", "prefork", f"--concurrency={CPUS}", "-l", "WARNING"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.celery_app",
            str(args.jobs),
            str(args.burst),
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError("the Celery client failed")
        return {"name": "celery", **json.loads(out)}
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.to_thread(worker.wait, 30)
        await delete_queues(queue)


# ----------------------------------------------------------------- carod


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


async def rss_with_waiting_jobs(carod: Carod, waiting: int) -> float:
    """Peak RSS while two long jobs fill the slots and ``waiting`` jobs wait in the queue."""
    sub = Submitter(carod.queue)
    await sub.open()
    sleepers = [
        await sub.publish({"Cmd": '"/bin/sleep"', "Arguments": '"4"', "Requirements": "TRUE"}) for _ in range(CPUS)
    ]
    await asyncio.gather(*(sub.firsts[mid] for mid, _ in sleepers if mid in sub.firsts))
    for _ in range(waiting):
        await sub.publish(SEED)
    peak = 0.0
    for _ in range(20):
        peak = max(peak, carod.status("VmRSS"))
        await asyncio.sleep(0.1)
    conn = await aio_pika.connect(URL)
    async with conn:
        ch = await conn.channel()
        await (await ch.declare_queue(carod.queue, passive=True)).purge()
    await asyncio.gather(*(sub.finals[mid] for mid, _ in sleepers))
    await sub.close()
    return peak


async def run_carod(args: argparse.Namespace) -> dict[str, Any]:
    carod = Carod()
    await carod.start()
    try:
        idle = carod.status("VmRSS")
        row = await summary("carod", carod.queue, args.jobs, args.burst)
        row["rss_idle_mib"] = idle
        row["rss_after_burst_mib"] = carod.status("VmRSS")
        row["rss_1000_waiting_mib"] = await rss_with_waiting_jobs(carod, 1000)
        row["rss_peak_mib"] = carod.status("VmHWM")
        return row
    finally:
        await carod.stop()


# ---------------------------------------------------------------- extras


def _input_zip(size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("input.bin", secrets.token_bytes(size))
    return buf.getvalue()


async def large_files(result_mib: int, input_mib: int) -> dict[str, Any]:
    carod = Carod(node=f"max_result_mib = {result_mib + 64}")
    await carod.start()
    out: dict[str, Any] = {}
    try:
        rss_before = carod.status("VmRSS")
        async with Client(URL, queue=carod.queue) as client:
            await carod.lag()
            t0 = time.perf_counter()
            job = await client.submit(
                "/bin/sh", ["-c", f"head -c {result_mib * MIB} /dev/urandom > big.bin"], attributes={"Out": '"o"'}
            )
            rss_peak = 0.0
            result = asyncio.ensure_future(job.result(timeout_s=300))
            while not result.done():
                rss_peak = max(rss_peak, carod.status("VmRSS"))
                await asyncio.sleep(0.05)
            final = result.result()
            elapsed = time.perf_counter() - t0
            lag = await carod.lag()
            with zipfile.ZipFile(io.BytesIO(final.body)) as z:
                size = z.getinfo("big.bin").file_size
            if size != result_mib * MIB:
                raise RuntimeError(f"the big result came back with {size} bytes")
        out["result"] = {
            "mib": result_mib,
            "seconds": elapsed,
            "lag_max_ms": lag["max_ms"],
            "lag_p99_ms": lag["p99_ms"],
            "rss_before_mib": rss_before,
            "rss_peak_mib": rss_peak,
        }
        body = _input_zip(input_mib * MIB)
        sub = Submitter(carod.queue)
        await sub.open()
        firsts, finals = [], []
        await carod.lag()
        for _ in range(3):
            first, final_s = await sub.one({"Cmd": '"/bin/true"', "Requirements": "TRUE"}, body)
            firsts.append(first)
            finals.append(final_s)
        lag = await carod.lag()
        await sub.close()
        out["input"] = {
            "mib": input_mib,
            "first_status_ms": statistics.median(firsts) * 1e3,
            "final_ms": statistics.median(finals) * 1e3,
            "lag_max_ms": lag["max_ms"],
            "lag_p99_ms": lag["p99_ms"],
        }
        return out
    finally:
        await carod.stop()


async def slot_scaling(burst: int) -> list[dict[str, Any]]:
    rows = []
    for slots in range(1, 2 * CPUS + 1):
        carod = Carod(node=f"slots = {slots}", machine=f"Cpus = {slots}")
        await carod.start()
        try:
            sub = Submitter(carod.queue)
            await sub.open()
            rate = await sub.burst(burst)
            await sub.close()
            rows.append({"slots": slots, "throughput_jobs_s": rate})
        finally:
            await carod.stop()
    return rows


def classad_cost(n: int = 2000) -> dict[str, float]:
    """Header parsing, defaults, job spec and Requirements match per job (no I/O)."""
    machine = detect(Config())
    headers = dict(SEED, Requirements='TARGET.Memory > 100 && TARGET.Arch == "X86_64" || TRUE')
    t0 = time.perf_counter()
    for _ in range(n):
        parse_envelope("m", "r", headers, queue="grid")
        ad = classads.ad_from_headers(headers)
        jobad.apply_defaults(ad)
        jobad.job_spec(ad)
        classads.match(ad, machine)
    return {"per_job_ms": (time.perf_counter() - t0) / n * 1e3}


# ------------------------------------------------------------------ report

TARGETS = [
    # (label, value function, limit, lower is better)
    ("p50 carod/celery", lambda r: r["carod"]["p50_ms"] / r["celery"]["p50_ms"], 0.8),
    ("p50 carod/null", lambda r: r["carod"]["p50_ms"] / r["null"]["p50_ms"], 2.5),
    ("p99 carod/celery", lambda r: r["carod"]["p99_ms"] / r["celery"]["p99_ms"], 1.0),
    ("throughput celery/carod", lambda r: r["celery"]["throughput_jobs_s"] / r["carod"]["throughput_jobs_s"], 1 / 1.5),
    ("RSS idle MiB", lambda r: r["carod"]["rss_idle_mib"], 80),
    ("RSS 1000 waiting MiB", lambda r: r["carod"]["rss_1000_waiting_mib"], 80),
    ("loop lag p99 ms, 200 MB result", lambda r: r["extras"]["large"]["result"]["lag_p99_ms"], 20),
    ("loop lag p99 ms, 50 MB input", lambda r: r["extras"]["large"]["input"]["lag_p99_ms"], 20),
]


def report(results: dict[str, Any]) -> list[dict[str, Any]]:
    print(f"\n{'':8} {'p50 ms':>8} {'p99 ms':>8} {'jobs/s':>8}")
    for name in ("null", "celery", "carod"):
        if name in results:
            row = results[name]
            print(f"{name:8} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['throughput_jobs_s']:8.0f}")
    if "carod" in results:
        c = results["carod"]
        print(
            f"carod RSS MiB: idle {c['rss_idle_mib']:.1f}, after the burst {c['rss_after_burst_mib']:.1f}, "
            f"1000 waiting {c['rss_1000_waiting_mib']:.1f}, peak {c['rss_peak_mib']:.1f}"
        )
    extras = results.get("extras", {})
    if "large" in extras:
        r, i = extras["large"]["result"], extras["large"]["input"]
        print(
            f"{r['mib']} MiB result: {r['seconds']:.2f} s, loop lag max {r['lag_max_ms']:.1f} ms "
            f"p99 {r['lag_p99_ms']:.1f} ms, RSS {r['rss_before_mib']:.1f} -> peak {r['rss_peak_mib']:.1f} MiB"
        )
        print(
            f"{i['mib']} MiB input: first status {i['first_status_ms']:.0f} ms, final {i['final_ms']:.0f} ms, "
            f"loop lag max {i['lag_max_ms']:.1f} ms p99 {i['lag_p99_ms']:.1f} ms"
        )
    if "slots" in extras:
        print("slots -> jobs/s: " + ", ".join(f"{s['slots']}: {s['throughput_jobs_s']:.0f}" for s in extras["slots"]))
    if "classad" in extras:
        print(f"ClassAd parse + match: {extras['classad']['per_job_ms']:.3f} ms per job")
    checks = []
    print("\ntargets (issue 6):")
    for label, value, limit in TARGETS:
        try:
            v = value(results)
        except KeyError:
            continue
        ok = v <= limit
        checks.append({"target": label, "value": v, "limit": limit, "met": ok})
        print(f"  {'met ' if ok else 'MISS'} {label:32} {v:8.2f}  (<= {limit:.2f})")
    return checks


async def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--jobs", type=int, default=300, help="sequential jobs for the latency figures")
    ap.add_argument("--burst", type=int, default=2000, help="jobs in the throughput burst")
    ap.add_argument("--only", default="null,celery,carod", help="comma-separated contenders")
    ap.add_argument("--no-extras", action="store_true", help="skip large files, slot scaling, ClassAd cost")
    ap.add_argument("--scaling-burst", type=int, default=500)
    ap.add_argument("--result-mib", type=int, default=200)
    ap.add_argument("--input-mib", type=int, default=50)
    args = ap.parse_args()
    only = set(args.only.split(","))
    results: dict[str, Any] = {}
    if "null" in only:
        results["null"] = await run_null(args)
    if "celery" in only:
        results["celery"] = await run_celery(args)
    if "carod" in only:
        results["carod"] = await run_carod(args)
    if not args.no_extras:
        results["extras"] = {
            "classad": classad_cost(),
            "large": await large_files(args.result_mib, args.input_mib),
            "slots": await slot_scaling(args.scaling_burst),
        }
    checks = report(results)
    commit = subprocess.run(  # noqa: ASYNC221 - after the run
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    out = Path(__file__).parent / "results" / time.strftime("%Y%m%dT%H%M%S.json")
    out.write_text(
        json.dumps(
            {
                "commit": commit.stdout.strip(),
                "cpus": CPUS,
                "jobs": args.jobs,
                "burst": args.burst,
                "results": results,
                "targets": checks,
            },
            indent=2,
        )
    )
    print(f"written: {out}")


if __name__ == "__main__":
    asyncio.run(main())
