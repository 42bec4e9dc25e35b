"""Where one job's time goes inside carod: each step of its path, timed.

    .venv/bin/python -m bench.steps [--jobs 200] [--burst 0]

Runs carod in this process (default config, its own queue) with timing
wrappers around the steps of a job's path (executor, journal, replies, the
wait for the process), sends ``--jobs`` seed jobs one at a time (or a burst
of ``--burst`` at once) and prints each step's p50, plus the CPU time per
job of this process, its children (the job chains) and RabbitMQ, and the
journal's commits per job: those a job waited for (its critical path) and
all of them. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import resource
import statistics
import subprocess
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from bench.__main__ import Submitter, delete_queues
from carod import config as configuration
from carod.edges import journal
from carod.node import answer
from carod.node import arrival as node
from carod.node.server import Server
from carod.sandbox import execute, runner

TIMES: dict[str, list[float]] = defaultdict(list)


def _wrap(cls: type, name: str) -> None:
    original: Callable[..., Awaitable[Any]] = getattr(cls, name)

    @functools.wraps(original)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            TIMES[f"{cls.__name__}.{name}"].append(time.perf_counter() - t0)

    setattr(cls, name, timed)


def _instrument() -> None:
    for name in ("create_box", "start", "watch", "collect", "end"):
        _wrap(execute.Executor, name)
    for name in ("get", "receive", "start_attempt", "set_pid", "add_reply", "confirmed"):
        _wrap(journal.Journal, name)
    for name in ("send", "final", "commit_final"):
        _wrap(answer.Answerer, name)
    _wrap(runner.JobProcess, "_reap")
    _wrap(node.Node, "_handle")
    exited = runner._exited

    async def timed_exited(pid: int) -> None:
        t0 = time.perf_counter()
        await exited(pid)
        TIMES["(waiting for the process to exit)"].append(time.perf_counter() - t0)

    runner._exited = timed_exited


def _rabbit_cpu_s() -> float:
    found = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True, check=False).stdout.split()
    if not found:
        return 0.0
    with open(f"/proc/{found[0]}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.steps")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--burst", type=int, default=0)
    ap.add_argument("--prestart", choices=("yes", "no"), default="yes", help="[sandbox] prestart")
    args = ap.parse_args()
    _instrument()
    queue = f"bench-steps-{uuid.uuid4().hex[:6]}"
    work = tempfile.mkdtemp(prefix="carod-steps-", dir="/tmp")
    os.chmod(work, 0o711)  # noqa: S103 - the job user must traverse it
    config = configuration.parse(
        f"[broker]\nqueue = {queue}\nbinding_key = {queue}\n"
        f"[node]\nsandbox_root = {work}/sandboxes\nstate_dir = {work}/state\nlog_level = WARNING\n"
        f"[sandbox]\nprestart = {args.prestart}\n",
        source="bench",
        environ={},
    )
    server = Server(config, handle_signals=False)
    serving = asyncio.create_task(server.serve())
    await server.started.wait()
    sub = Submitter(queue)
    await sub.open()
    await sub.latency(30)  # warm-up
    TIMES.clear()
    store = server.journal
    commits0, waited0 = (store.commits, store.waited_writes) if store is not None else (0, 0)
    self0, kids0, rabbit0 = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
        _rabbit_cpu_s(),
    )
    t0 = time.perf_counter()
    if args.burst:
        n = args.burst
        print(f"burst of {n}: {await sub.burst(n):.0f} jobs/s")
    else:
        n = args.jobs
        latencies = [(await sub.one())[1] for _ in range(n)]
        print(f"{n} sequential jobs: end-to-end p50 {statistics.median(latencies) * 1e3:.2f} ms")
    wall = time.perf_counter() - t0
    self1, kids1, rabbit1 = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
        _rabbit_cpu_s(),
    )
    commits = (store.commits - commits0) if store is not None else 0
    waited = (store.waited_writes - waited0) if store is not None else 0
    await sub.close()
    server.handle_exit()
    await serving
    await delete_queues(queue)
    subprocess.run(["rm", "-rf", work], check=False)  # noqa: ASYNC221 - after the run

    def per_job(seconds: float) -> str:
        return f"{seconds / n * 1e3:.2f}"

    print(
        f"per job: wall {per_job(wall)} ms; CPU of carod (+ the submitter) "
        f"user {per_job(self1.ru_utime - self0.ru_utime)} sys {per_job(self1.ru_stime - self0.ru_stime)} ms, "
        f"job chains user {per_job(kids1.ru_utime - kids0.ru_utime)} "
        f"sys {per_job(kids1.ru_stime - kids0.ru_stime)} ms, "
        f"RabbitMQ {per_job(rabbit1 - rabbit0)} ms"
    )
    # A write waited for is a commit on the job's path (one commit may serve several jobs' writes).
    print(f"journal per job: {waited / n:.2f} commits waited for (critical path), {commits / n:.2f} commits in all")
    print(f"\n{'step':36} {'calls':>6} {'p50 ms':>8}")
    for name, values in sorted(TIMES.items(), key=lambda kv: -statistics.median(kv[1])):
        print(f"{name:36} {len(values):6} {statistics.median(values) * 1e3:8.3f}")


if __name__ == "__main__":
    asyncio.run(main())
