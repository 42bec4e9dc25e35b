"""carod against the alternatives, in one run: null responder, Celery, Dramatiq, carod (and Slurm).

    make bench        # = .venv/bin/python -m bench (Celery, Dramatiq, matplotlib from the `bench` extra)
    .venv/bin/python -m bench [--jobs 300] [--burst 2000] [--only null,celery,dramatiq,carod]
                              [--no-extras] [--peers hpc] [--curve 1,2,4,8] [--sleep-jobs 1000]
                              [--waiting 1000,10000] [--no-png] [--event-loop asyncio|uvloop]

Every contender does the seed job (`/bin/echo "Hello Grid!"`, Out/Err to
files, the working directory zipped and returned) on the local RabbitMQ:

* ``null``: an aio-pika responder that answers each job message at once
  without running anything (the broker round trip: the floor);
* ``celery``: a Celery worker (prefork, concurrency = cores, acks_late,
  rpc:// results) whose task runs the job with subprocess and zipfile
  (bench/celery_app.py);
* ``dramatiq``: a Dramatiq worker (RabbitMQ broker, processes = cores x 1 thread)
  with the same task, the zip published by the task to the submitter's reply
  queue on the same RabbitMQ (bench/dramatiq_app.py says why not Redis);
* ``carod``: a real carod process, default config (bubblewrap, cgroups,
  setpriv, journal), jobs as ``nobody``;
* ``slurm`` (with ``--peers hpc``): ``srun /bin/echo "Hello Grid!"`` on a
  private single-node Slurm the bench sets up and tears down
  (bench/slurm.py; skipped with the reason when it cannot be set up).

For each: latency p50/p99 of sequential jobs (publish to final reply, after
20 of warm-up), throughput of a burst; for carod its RSS idle, with 1,000 and
10,000 jobs waiting in its queue (``--waiting``), and its peak. The cost
curve (bench/cost.py, ``--curve``): carod's jobs/s and p50 at 1, 2, 4, 8
slots; and ``--sleep-jobs`` x ``sleep 1`` on ``--sleep-slots`` 64 slots
against the ideal jobs x 1 s / slots. Extras (carod only, skipped with
``--no-extras`` like the curve and the sleep run): event-loop lag while a
job returns a 200 MB result and while a 50 MB input is unpacked, time to
first status with that input, and the cost of ClassAd parse + match.

Prints a table with the targets of issue 6, writes
bench/results/<time>.json (every figure, with the sequential latencies) and
bench/results/<time>.png (bench/plot.py), copied to docs/performance.png.
The default run took 3.5 min on the 2-core development machine (8 when busy);
``--peers hpc`` adds about half a minute. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika

from bench import cost
from bench.harness import CPUS, MIB, SEED, URL, Carod, Submitter, delete_queues, summary
from carod.client import Client
from carod.config import Config
from carod.node.machine import detect
from carod.wire import classads, jobad
from carod.wire.message import parse_envelope

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("null", "celery", "dramatiq", "carod")

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


# -------------------------------------------------------- celery, dramatiq


async def _worker_and_client(
    name: str, worker_argv: list[str], client_module: str, env: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    """Start a worker, run its client (which prints a JSON summary), stop the worker."""
    worker = subprocess.Popen(  # noqa: ASYNC220 - started once, waited for below
        worker_argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            client_module,
            str(args.jobs),
            str(args.burst),
            env=env,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the {name} client failed")
        return {"name": name, **json.loads(out)}
    finally:
        worker.send_signal(signal.SIGTERM)
        await asyncio.to_thread(worker.wait, 30)


async def run_celery(args: argparse.Namespace) -> dict[str, Any]:
    queue = f"bench-celery-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, BENCH_CELERY_QUEUE=queue, CAROD_BROKER_URL=URL)
    celery = Path(sys.executable).with_name("celery")
    argv = [str(celery), "-A", "bench.celery_app", "worker", "-P", "prefork", f"--concurrency={CPUS}", "-l", "WARNING"]
    try:
        return await _worker_and_client("celery", argv, "bench.celery_app", env, args)
    finally:
        await delete_queues(queue)


async def run_dramatiq(args: argparse.Namespace) -> dict[str, Any]:
    queue = f"bench-dramatiq-{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, BENCH_DRAMATIQ_QUEUE=queue, CAROD_BROKER_URL=URL)
    dramatiq = Path(sys.executable).with_name("dramatiq")
    argv = [str(dramatiq), "bench.dramatiq_app", "--processes", str(CPUS), "--threads", "1"]
    try:
        return await _worker_and_client("dramatiq", argv, "bench.dramatiq_app", env, args)
    finally:
        await delete_queues(queue, suffixes=(".DQ", ".XQ"))


# ----------------------------------------------------------------- slurm


async def run_slurm(args: argparse.Namespace) -> dict[str, Any] | None:
    from bench import slurm  # only with --peers hpc

    try:
        return await asyncio.to_thread(slurm.run, args.hpc_jobs, args.hpc_burst)
    except slurm.SlurmUnavailable as exc:
        print(f"slurm: skipped: {exc}", file=sys.stderr)
        return None


# ----------------------------------------------------------------- carod


async def run_carod(args: argparse.Namespace) -> dict[str, Any]:
    carod = Carod(node=f"event_loop = {args.event_loop}" if args.event_loop else "")
    await carod.start()
    try:
        idle = carod.status("VmRSS")
        row = await summary("carod", carod.queue, args.jobs, args.burst)
        row["rss_idle_mib"] = idle
        row["rss_after_burst_mib"] = carod.status("VmRSS")
        row["waiting"] = []
        for n in args.waiting:
            measured = await cost.rss_with_waiting_jobs(carod, n)
            row["waiting"].append(measured)
            row[f"rss_{n}_waiting_mib"] = measured["rss_mib"]
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

TARGETS: list[tuple[str, Callable[[dict[str, Any]], float], float]] = [
    # (label, value function, limit: lower is better)
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
    print(f"\n{'':9} {'p50 ms':>8} {'p99 ms':>8} {'jobs/s':>8}")
    for name in (*CONTENDERS, "slurm"):
        if name in results:
            row = results[name]
            burst = f"  (burst of {row['burst']})" if "burst" in row else ""
            print(f"{name:9} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['throughput_jobs_s']:8.1f}{burst}")
    if "carod" in results:
        c = results["carod"]
        waiting = ", ".join(
            f"{w['waiting']} waiting {w['rss_mib']:.1f}" + (f" ({w['started']} of them ran)" if w["started"] else "")
            for w in c["waiting"]
        )
        print(
            f"carod RSS MiB: idle {c['rss_idle_mib']:.1f}, after the burst {c['rss_after_burst_mib']:.1f}, "
            f"{waiting}, peak {c['rss_peak_mib']:.1f}"
        )
    if "curve" in results:
        print(
            "carod cost curve, slots -> jobs/s, p50 ms: "
            + ", ".join(f"{s['slots']}: {s['throughput_jobs_s']:.0f}, {s['p50_ms']:.1f}" for s in results["curve"])
        )
    if "sleep" in results:
        s = results["sleep"]
        print(
            f"{s['jobs']} x sleep {s['sleep_s']:g} on {s['slots']} slots: {s['wall_s']:.1f} s from the first publish "
            f"to the last final reply, ideal {s['ideal_s']:.1f} s: x{s['ratio']:.2f} (carod peak RSS "
            f"{s['rss_peak_mib']:.1f} MiB)"
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


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--jobs", type=int, default=300, help="sequential jobs for the latency figures")
    ap.add_argument("--burst", type=int, default=2000, help="jobs in the throughput burst")
    ap.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    ap.add_argument(
        "--no-extras", action="store_true", help="skip large files, ClassAd cost, the cost curve and the sleep run"
    )
    ap.add_argument("--event-loop", choices=("asyncio", "uvloop"), help="carod's [node] event_loop (default: its own)")
    ap.add_argument("--peers", default="", help="'hpc': add a private single-node Slurm (srun)")
    ap.add_argument("--hpc-jobs", type=int, default=100, help="sequential srun for Slurm's latency")
    ap.add_argument("--hpc-burst", type=int, default=40, help="srun started at once for Slurm's throughput")
    ap.add_argument("--curve", type=_ints, default=[1, 2, 4, 8], help="carod slot counts of the cost curve ('' = none)")
    ap.add_argument("--curve-jobs", type=int, default=100, help="sequential jobs per curve point")
    ap.add_argument("--scaling-burst", type=int, default=500, help="burst per curve point")
    ap.add_argument("--sleep-jobs", type=int, default=1000, help="sleep jobs on --sleep-slots (0 = skip)")
    ap.add_argument("--sleep-slots", type=int, default=64)
    ap.add_argument("--sleep-s", type=float, default=1.0)
    ap.add_argument("--waiting", type=_ints, default=[1000, 10000], help="carod's RSS with this many jobs waiting")
    ap.add_argument("--result-mib", type=int, default=200)
    ap.add_argument("--input-mib", type=int, default=50)
    ap.add_argument("--no-png", action="store_true", help="no PNG (nor docs/performance.png)")
    args = ap.parse_args()
    peers = {p for p in args.peers.split(",") if p}
    if peers - {"hpc"}:
        ap.error(f"--peers: unknown {', '.join(sorted(peers - {'hpc'}))} (known: hpc)")
    args.hpc = "hpc" in peers
    return args


async def main() -> None:
    args = _args()
    only = set(args.only.split(","))
    results: dict[str, Any] = {}
    runners = {"null": run_null, "celery": run_celery, "dramatiq": run_dramatiq, "carod": run_carod}
    for name, runner in runners.items():
        if name in only:
            results[name] = await runner(args)
    if args.hpc and (row := await run_slurm(args)) is not None:
        results["slurm"] = row
    if "carod" in only and not args.no_extras:
        if args.curve:
            results["curve"] = await cost.curve(args.curve, args.curve_jobs, args.scaling_burst)
        if args.sleep_jobs:
            results["sleep"] = await cost.sleep_jobs(args.sleep_jobs, args.sleep_slots, args.sleep_s)
        results["extras"] = {
            "classad": classad_cost(),
            "large": await large_files(args.result_mib, args.input_mib),
        }
    checks = report(results)
    commit = subprocess.run(  # noqa: ASYNC221 - after the run
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=ROOT
    )
    out = Path(__file__).parent / "results" / time.strftime("%Y%m%dT%H%M%S.json")
    run = {
        "commit": commit.stdout.strip(),
        "cpus": CPUS,
        "jobs": args.jobs,
        "burst": args.burst,
        "results": results,
        "targets": checks,
    }
    out.write_text(json.dumps(run, indent=2))
    print(f"written: {out}")
    if not args.no_png:
        from bench import plot  # matplotlib: the bench extra

        plot.draw(run, out.with_suffix(".png"))
        shutil.copyfile(out.with_suffix(".png"), ROOT / "docs" / "performance.png")
        print(f"written: {out.with_suffix('.png')}, docs/performance.png")


if __name__ == "__main__":
    asyncio.run(main())
