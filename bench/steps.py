"""Where one job's time goes inside carod: each step of its path, timed.

    .venv/bin/python -m bench.steps [--jobs 200] [--burst 0]
    .venv/bin/python -m bench.steps --process [--uvloop] [--jobs 300]

Runs carod in this process (default config, its own queue) with timing
wrappers around the steps of a job's path (executor, journal, replies, the
wait for the process), sends ``--jobs`` seed jobs one at a time (or a burst
of ``--burst`` at once) and prints each step's p50, plus the CPU time per
job of this process, its children (the job chains) and RabbitMQ, and the
journal's commits per job: those a job waited for (its critical path) and
all of them. ``--prestart no``: every job's sandbox started cold. ``--want-io-proxy``:
the jobs ask for chirp (its steps are timed too). Not part
of the tests.

``--process``: carod's own CPU per job instead, without the submitter's:
carod runs as a real process (``python -m carod``, default config; with
``--uvloop``, on uvloop's loop) and its CPU is read from
``/proc/<pid>/stat``, the event loop thread apart from the others
(``/proc/<pid>/task``). No step timings in this mode.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from bench.harness import SEED, URL, Submitter, delete_queues
from carod import config as configuration
from carod.edges import journal
from carod.node import answer, chirp
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
    for name in ("create_box", "chirp", "start", "watch", "collect", "end"):
        _wrap(execute.Executor, name)
    for name in ("start", "close"):
        _wrap(chirp.ChirpServer, name)
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
    return _cpu_s(f"/proc/{found[0]}/stat")[0]


def _cpu_s(stat_path: str) -> tuple[float, float]:
    """(user + sys, children's user + sys) seconds of a process or thread, from its /proc stat file."""
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _threads_cpu_s(pid: int) -> dict[int, float]:
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(task)] = _cpu_s(f"/proc/{pid}/task/{task}/stat")[0]
        except OSError:
            continue  # a worker thread that just ended
    return found


#: carod on uvloop's loop, whatever its config says (carod's own way is `[node] event_loop = uvloop`).
_ON_UVLOOP = (
    "import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "from carod.cli import main; sys.argv[0] = 'carod'; sys.exit(main())"
)


async def process_cpu(jobs: int, uvloop: bool) -> None:
    """carod's own CPU per job, as a real process (``--process``)."""
    queue = f"bench-steps-{uuid.uuid4().hex[:6]}"
    work = tempfile.mkdtemp(prefix="carod-steps-", dir="/tmp")
    os.chmod(work, 0o711)  # noqa: S103 - the job user must traverse it
    conf = os.path.join(work, "carod.conf")
    with open(conf, "w") as f:
        f.write(
            f"[broker]\nurl = {URL}\nqueue = {queue}\nbinding_key = {queue}\n"
            f"[node]\nsandbox_root = {work}/sandboxes\nstate_dir = {work}/state\nlog_level = WARNING\n"
        )
    os.chmod(conf, 0o600)
    start = ["-c", _ON_UVLOOP] if uvloop else ["-m", "carod"]
    carod = await asyncio.create_subprocess_exec(sys.executable, *start, "--config", conf, stderr=subprocess.DEVNULL)
    sub = Submitter(queue)
    await sub.open()
    try:
        deadline = time.monotonic() + 60
        while True:  # ready when it answers (a job sent before it declared its queue is dropped)
            try:
                await asyncio.wait_for(sub.one(), 2)
                break
            except TimeoutError:
                if time.monotonic() > deadline or carod.returncode is not None:
                    raise RuntimeError("carod did not start") from None
        await sub.latency(10)  # warm-up (20 + 10 jobs)
        threads0, (own0, kids0), rabbit0 = _threads_cpu_s(carod.pid), _cpu_s(f"/proc/{carod.pid}/stat"), _rabbit_cpu_s()
        t0 = time.perf_counter()
        latencies = [(await sub.one())[1] for _ in range(jobs)]
        wall = time.perf_counter() - t0
        threads1, (own1, kids1), rabbit1 = _threads_cpu_s(carod.pid), _cpu_s(f"/proc/{carod.pid}/stat"), _rabbit_cpu_s()
    finally:
        await sub.close()
        carod.terminate()
        await carod.wait()
        await delete_queues(queue)
        subprocess.run(["rm", "-rf", work], check=False)  # noqa: ASYNC221 - after the run

    def ms(seconds: float) -> str:
        return f"{seconds / jobs * 1e3:.2f}"

    loop_s = threads1.get(carod.pid, 0.0) - threads0.get(carod.pid, 0.0)
    print(
        f"{jobs} sequential jobs ({'uvloop' if uvloop else 'asyncio'}): end-to-end p50 "
        f"{statistics.median(latencies) * 1e3:.2f} ms, wall {ms(wall)} ms per job"
    )
    print(
        f"CPU per job: carod {ms(own1 - own0)} ms (event loop thread {ms(loop_s)}, other threads "
        f"{ms(own1 - own0 - loop_s)}), job chains {ms(kids1 - kids0)}, RabbitMQ {ms(rabbit1 - rabbit0)}"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.steps")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--burst", type=int, default=0)
    ap.add_argument("--prestart", choices=("yes", "no"), default="yes", help="[sandbox] prestart")
    ap.add_argument("--want-io-proxy", action="store_true", help="sequential jobs with WantIOProxy = TRUE (chirp)")
    ap.add_argument("--process", action="store_true", help="carod's own CPU per job, as a real process")
    ap.add_argument("--uvloop", action="store_true", help="with --process: carod on uvloop")
    args = ap.parse_args()
    if args.process:
        await process_cpu(args.jobs, args.uvloop)
        return
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
        headers = {**SEED, "WantIOProxy": "TRUE"} if args.want_io_proxy else SEED
        latencies = [(await sub.one(headers))[1] for _ in range(n)]
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
