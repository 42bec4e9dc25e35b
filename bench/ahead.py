"""Sandboxes started ahead (issue 16): idle nodes and slot users are as fast as busy shared-user ones.

    .venv/bin/python -m bench.ahead [--jobs 100] [--idle-s 600] [--slots 2]

Runs carod in this process (default config, its own queue) three times:

* ``shared``: one job user for all slots (``nobody``), ``--jobs`` sequential seed jobs, p50;
* ``slot users``: the same with ``[sandbox] slot_users`` (users made for the run, removed after);
* ``cold``: the same as ``shared`` with ``[sandbox] prestart = no``, for comparison;

then, on the shared-user node, waits ``--idle-s`` seconds with nothing to do
and times the first job after it against the warm p50 (``--idle-s 0`` skips
it). Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import statistics
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from bench.harness import Submitter, delete_queues
from carod import config as configuration
from carod.node.server import Server

SLOT_USER = "carod-bench-slot{}"


@contextmanager
def slot_users(n: int) -> Iterator[list[str]]:
    made, names = [], [SLOT_USER.format(i) for i in range(1, n + 1)]
    try:
        for name in names:
            try:
                pwd.getpwnam(name)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
                )
                made.append(name)
        yield names
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False, capture_output=True)


async def measure(label: str, sandbox: dict[str, str], jobs: int, slots: int, idle_s: float) -> None:
    queue = f"bench-ahead-{uuid.uuid4().hex[:6]}"
    work = tempfile.mkdtemp(prefix="carod-ahead-", dir="/tmp")
    os.chmod(work, 0o711)  # noqa: S103 - the job user must traverse it
    text = (
        f"[broker]\nqueue = {queue}\nbinding_key = {queue}\n"
        f"[node]\nslots = {slots}\nsandbox_root = {work}/sandboxes\nstate_dir = {work}/state\nlog_level = WARNING\n"
        "[sandbox]\n" + "".join(f"{k} = {v}\n" for k, v in sandbox.items())
    )
    server = Server(configuration.parse(text, source="bench", environ={}), handle_signals=False)
    serving = asyncio.create_task(server.serve())
    await server.started.wait()
    sub = Submitter(queue)
    await sub.open()
    try:
        latencies = await sub.latency(jobs)
        p50 = statistics.median(latencies) * 1e3
        p90 = sorted(latencies)[int(0.9 * (len(latencies) - 1))] * 1e3
        print(f"{label:28} p50 {p50:6.2f} ms  p90 {p90:6.2f} ms  ({jobs} sequential seed jobs, {slots} slots)")
        if idle_s:
            await asyncio.sleep(idle_s)
            _, first = await sub.one()
            after = [(await sub.one())[1] for _ in range(10)]
            print(
                f"{'  first job after ' + f'{idle_s:.0f} s idle':28} {first * 1e3:6.2f} ms "
                f"(the 10 after it: p50 {statistics.median(after) * 1e3:.2f} ms)"
            )
    finally:
        await sub.close()
        server.handle_exit()
        await serving
        await delete_queues(queue)
        subprocess.run(["rm", "-rf", work], check=False)  # noqa: ASYNC221 - after the run


async def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ahead")
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--idle-s", type=float, default=600.0)
    args = ap.parse_args()
    await measure("shared job user, ahead", {"prestart": "yes"}, args.jobs, args.slots, 0)
    with slot_users(args.slots) as users:
        await measure("slot users, ahead", {"slot_users": ", ".join(users)}, args.jobs, args.slots, 0)
    await measure("shared job user, cold", {"prestart": "no"}, args.jobs, args.slots, 0)
    if args.idle_s:
        await measure("shared job user, ahead", {"prestart": "yes"}, args.jobs, args.slots, args.idle_s)


if __name__ == "__main__":
    asyncio.run(main())
