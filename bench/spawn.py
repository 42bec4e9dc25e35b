"""How a job is spawned, measured: the options for starting `/bin/true` and seeing it end.

    .venv/bin/python -m bench.spawn [--runs 200]

Each row is the wall time (p50, p90) from "start it" to "it has exited and
been reaped", one process at a time, as root. The last rows are carod's
chain (docs/security.md) built by carod.sandbox.isolation, cold as carod runs it
today, and warm: bubblewrap, its namespaces and setpriv started ahead of
time, the job user's shell waiting on a pipe for the word to exec the job
(the design docs/performance.md proposes to close the latency gap).
Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from carod.sandbox.isolation import SH, Layers, command
from carod.sandbox.users import resolve_user

TRUE = "/bin/true"


def _posix_spawn() -> None:
    pid = os.posix_spawn(TRUE, [TRUE], {})
    os.waitpid(pid, 0)


def _popen(**kwargs: object) -> Callable[[], None]:
    def run() -> None:
        subprocess.Popen([TRUE], close_fds=True, **kwargs).wait()  # type: ignore[call-overload]

    return run


def _chain(argv: list[str], *, gate: bool) -> Callable[[], None]:
    def run() -> None:
        p = subprocess.Popen(argv, close_fds=True, start_new_session=True)
        if gate:
            os.waitpid(p.pid, os.WUNTRACED)
            os.kill(p.pid, signal.SIGCONT)
        p.wait()

    return run


def _asyncio_spawn(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> Callable[[], None]:
    loop = loop_factory()

    async def once() -> None:
        proc = await asyncio.create_subprocess_exec(TRUE)
        await proc.wait()

    def run() -> None:
        loop.run_until_complete(once())

    return run


def _pidfd_wait() -> None:
    p = subprocess.Popen([TRUE], close_fds=True)
    fd = os.pidfd_open(p.pid)
    try:
        import select

        select.select([fd], [], [])
        p.wait()
    finally:
        os.close(fd)


def time_it(fn: Callable[[], None], runs: int) -> tuple[float, float]:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return statistics.median(samples) * 1e3, samples[int(0.9 * (len(samples) - 1))] * 1e3


def warm(layers: Layers, box: Path, runs: int) -> tuple[float, float]:
    """The chain started ahead; timed from the word 'go' to the sandbox's exit."""
    user = resolve_user("nobody")
    samples = []
    for i in range(runs + 10):
        r, w = os.pipe()
        # The job user's shell, inside bubblewrap, waits on its stdin (the pipe), then execs the job.
        waiter = [SH, "-c", 'read -r _; exec "$@" </dev/null', "carod-warm", TRUE]
        p = subprocess.Popen(
            command(layers, user, box, waiter, {})[4:],  # without the gate
            close_fds=True,
            stdin=r,
            start_new_session=True,
        )
        os.close(r)
        time.sleep(0.01)  # ready well before the job comes
        t0 = time.perf_counter()
        os.write(w, b"go\n")
        p.wait()
        if i >= 10:
            samples.append(time.perf_counter() - t0)
        os.close(w)
    samples.sort()
    return statistics.median(samples) * 1e3, samples[int(0.9 * (len(samples) - 1))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.spawn")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="carod-spawn-", dir="/tmp"))
    os.chmod(work, 0o711)  # noqa: S103 - the job user must traverse it
    box = work / "box"
    box.mkdir()
    os.chown(box, 65534, 65534)
    setpriv = shutil.which("setpriv") or "setpriv"
    bwrap = shutil.which("bwrap")
    user = resolve_user("nobody")
    layers = Layers(bwrap=bwrap, cgroups=None, network=False, tmp_bytes=256 << 20, hidden=(work,), setpriv=setpriv)
    no_bwrap = Layers(bwrap=None, cgroups=None, network=False, tmp_bytes=0, hidden=(), setpriv=setpriv)
    rows: list[tuple[str, Callable[[], None]]] = [
        ("os.posix_spawn", _posix_spawn),
        ("subprocess.Popen (vfork)", _popen()),
        ("subprocess.Popen, waited with a pidfd", _pidfd_wait),
        ("subprocess.Popen(user=, group=) (fork)", _popen(user=65534, group=65534, extra_groups=[])),
        ("asyncio default loop", _asyncio_spawn(asyncio.new_event_loop)),
    ]
    try:
        import uvloop

        rows.append(("uvloop", _asyncio_spawn(uvloop.new_event_loop)))
    except ImportError:
        pass
    rows += [
        ("setpriv", _chain(command(no_bwrap, user, box, [TRUE], {})[4:], gate=False)),
        ("gate + setpriv (carod without bwrap)", _chain(command(no_bwrap, user, box, [TRUE], {}), gate=True)),
    ]
    if bwrap:
        rows.append(("gate + bwrap + setpriv (carod, cold)", _chain(command(layers, user, box, [TRUE], {}), gate=True)))
    print(f"{'':44} {'p50 ms':>8} {'p90 ms':>8}")
    for label, fn in rows:
        p50, p90 = time_it(fn, args.runs)
        print(f"{label:44} {p50:8.2f} {p90:8.2f}")
    if bwrap:
        p50, p90 = warm(layers, box, args.runs)
        print(f"{'bwrap + setpriv started ahead (warm)':44} {p50:8.2f} {p90:8.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
