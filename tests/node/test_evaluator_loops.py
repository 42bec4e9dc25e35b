"""The evaluator child on each event loop carod can run on ([node] event_loop): what it inherits, how it is replaced.

It runs as the job user and reads job-chosen expressions, so it must inherit
nothing of carod's but its two pipes, the page it marks its progress on and
carod's stderr (docs/security.md). Each test runs on asyncio's loop and, when
uvloop is installed, on uvloop's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import classad2
import pytest

from carod.node.evaluator import Evaluator
from carod.wire.classads import ad_from_headers, evaluate
from tests.helpers import sum_doublings

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed"))]
MACHINE = '[Name = "m"; Memory = 4096; Cpus = 2]'
COSTLY = {"Cmd": 'replaceAll("x", "/bin/xcho", "e")', "Requirements": "TARGET.Memory > 1"}


def run_on(loop_name: str, test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop_name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(test())


def descriptors(pid: int) -> dict[int, str]:
    fds = Path(f"/proc/{pid}/fd")
    return {int(fd.name): os.readlink(fd) for fd in fds.iterdir()}


@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_child_inherits_only_its_pipes_the_page_and_stderr(loop_name: str) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="carod-evaluator-fds-"))
    # What carod may have open when the child starts: inheritable or not, files, sockets, pipes.
    canary = os.open(scratch / "canary", os.O_CREAT | os.O_RDWR, 0o600)
    os.set_inheritable(canary, True)
    hidden = os.open(scratch / "hidden", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    left, right = socket.socketpair()
    left.set_inheritable(True)
    pipe_r, pipe_w = os.pipe()
    os.set_inheritable(pipe_r, True)

    async def check() -> None:
        assert type(asyncio.get_running_loop()).__module__.split(".")[0] == loop_name
        evaluator = Evaluator(timeout_s=10, memory_mib=256)
        await evaluator.start()
        try:
            pid = evaluator.pid
            assert pid is not None
            seen = descriptors(pid)
            assert seen[0].startswith("pipe:") and seen[1].startswith("pipe:") and seen[0] != seen[1]
            assert seen[2] == os.readlink("/proc/self/fd/2")  # carod's stderr, as before
            others = {fd: target for fd, target in seen.items() if fd > 2}
            assert others and all(target.startswith("/memfd:carod-evaluator") for target in others.values()), seen
            # and it still answers
            reduced = await evaluator.preflight(ad_from_headers(COSTLY), classad2.parseOne(MACHINE))
            assert evaluate(reduced, "Cmd") == "/bin/echo"
        finally:
            await evaluator.close()

    try:
        run_on(loop_name, check)
    finally:
        for fd in (canary, hidden, pipe_r, pipe_w):
            os.close(fd)
        left.close()
        right.close()
        for name in ("canary", "hidden"):
            (scratch / name).unlink()
        scratch.rmdir()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_killed_child_is_reaped_and_replaced_and_none_is_left(loop_name: str) -> None:
    machine = classad2.parseOne(MACHINE)

    async def check() -> None:
        evaluator = Evaluator(timeout_s=10, memory_mib=256)
        await evaluator.start()
        first = evaluator.pid
        assert first is not None
        try:
            os.kill(first, signal.SIGKILL)
            while Path(f"/proc/{first}/stat").read_text().split(") ")[1][0] != "Z":
                await asyncio.sleep(0.01)  # a zombie now: it is carod's to reap
            reduced = await evaluator.preflight(ad_from_headers(COSTLY), machine)
            assert evaluate(reduced, "Cmd") == "/bin/echo"
            assert evaluator.pid not in (None, first)
            assert not Path(f"/proc/{first}").exists()  # reaped
            # A request given up half-way kills its child; closing reaps it.
            second = evaluator.pid
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(evaluator.preflight(ad_from_headers(_endless()), machine), 0.3)
        finally:
            await evaluator.close()
        for pid in (first, second):
            assert not Path(f"/proc/{pid}").exists()

    run_on(loop_name, check)


def _endless() -> dict[str, str]:
    return sum_doublings(26)
