"""The bounded evaluator: a child process that evaluates the ClassAds carod cannot bound by reading them.

A job ad whose cost :mod:`carod.wire.adcost` cannot bound from its text (a call to
``sprintf``, a chain of ``strcat`` doublings, ...) is never evaluated on
carod's event loop. At the job's arrival it goes, with this node's machine
ad, to a long-lived child (``python -m carod.node.evaluator``, started with carod)
that runs under ``RLIMIT_AS`` (``[node] eval_memory_mib`` above what it needs
to start) and answers within ``[node] eval_timeout_s`` or is killed and
replaced. The child does the pre-flight (:func:`preflight`):

* evaluates every attribute of the job ad in the match context (MY = job,
  TARGET = machine), and the machine's ``Start``, ``Requirements`` and
  ``Rank`` against the job;
* replaces every attribute that does not depend on the machine (no
  ``TARGET`` reference, direct or through other attributes) by its value,
  which must be at most :data:`MAX_VALUE_BYTES`;
* checks that what is left (expressions about the machine) is bounded by
  construction (:func:`carod.wire.adcost.problem`), since carod evaluates those
  at every match.

carod continues with the reduced ad in-process as before. A job that breaks a
bound is answered Held (:class:`carod.errors.JobHeld`, HoldReasonCode 21)
naming the attribute; a dead or hung child costs that job and nothing else.

Frames on the pipes: a 4-byte big-endian length and a JSON object. The
attribute being evaluated is written to a shared page (a memfd), so carod can
name it when the child is killed.

The child is started with :class:`subprocess.Popen` (``close_fds``) on the
loop's thread, as jobs are, never with ``asyncio.create_subprocess_exec``:
under uvloop that is libuv's spawn, which passes carod's descriptors on
(docs/security.md). It inherits its two pipes, carod's stderr and the page,
nothing else. Its pipes are non-blocking and read and written with the loop's
``add_reader``/``add_writer``, its exit seen with a pidfd: the same on
asyncio's loop and on uvloop's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import pwd
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import classad2

from carod.errors import CarodError, JobHeld
from carod.holdcodes import HoldCode
from carod.units import MIB
from carod.wire import adcost
from carod.wire.classads import Undefined, evaluate, evaluate_in_match

if TYPE_CHECKING:  # not imported by the child
    from carod.config import Config
    from carod.edges.metrics import Metrics

log = logging.getLogger("carod.evaluator")

#: Largest value an attribute may evaluate to (it replaces the expression in the ad carod keeps).
MAX_VALUE_BYTES = 64 * 1024
#: Largest reduced ad the child may send back.
MAX_REPLY_BYTES = 4 * MIB
_PAGE = 4096
_LEN = struct.Struct(">I")
#: How long the child may take to start and say it is ready.
_START_TIMEOUT_S = 30.0
#: Attributes of the machine ad evaluated against the job.
MACHINE_POLICY = ("Start", "Requirements", "Rank")


class EvaluatorError(CarodError):
    """The evaluator child could not be started."""


# ---------------------------------------------------------------- the child


def preflight(job_text: str, machine: classad2.ClassAd) -> dict[str, Any]:
    """Evaluate and reduce a job ad (in the child). Returns ``{"ad": text}`` or ``{"held": reason}``."""
    job = classad2.parseOne(job_text)
    reduced: dict[str, str] = {}
    values: dict[str, object] = {}
    for name in list(job.keys()):
        _mark(f"job {name}")
        expr = job.lookup(name)
        try:
            depends = any(ref for ref in job.externalRefs(expr))
        except (classad2.ClassAdException, ValueError):
            depends = True  # e.g. a cycle: left as it is, and adcost says why it is not bounded
        if depends:  # about the machine: evaluated at each match, so it must be bounded (below)
            evaluate_in_match(job, machine, name)  # what the library gives up on is ERROR
            reduced[name] = str(expr)
        else:  # the same value with any machine: only MY attributes are involved
            values[name] = evaluate(job, name)
    for name in MACHINE_POLICY:
        if name in machine and any(ref for ref in machine.externalRefs(machine.lookup(name))):
            _mark(f"machine {name}")  # it reads the job's attributes
            evaluate_in_match(machine, job, name)
    _mark("")
    for name, value in values.items():
        text = _literal(value)
        if len(text) > MAX_VALUE_BYTES:
            return {
                "held": f"the job's {name} evaluates to a value of {len(text)} bytes; "
                f"a job attribute's value may be at most {MAX_VALUE_BYTES} bytes"
            }
        reduced[name] = text
    found = adcost.problem(reduced)
    if found is not None:
        name, why = found
        return {
            "held": f"the job's {name} depends on the machine (TARGET) and {why}; carod evaluates such an "
            "expression at every match, so it must stay small and use only simple functions "
            '(docs/protocol.md, "Bounded evaluation")'
        }
    return {"ad": "[" + "; ".join(f"{name} = {text}" for name, text in reduced.items()) + "]"}


def _literal(value: object) -> str:
    if isinstance(value, Undefined):
        return "error" if value.error else "undefined"
    holder = classad2.ClassAd()
    holder["v"] = value
    return str(holder.lookup("v"))


_page: mmap.mmap | None = None


def _mark(what: str) -> None:
    """Say what is being evaluated, for carod to name it if the child is killed."""
    if _page is not None:
        data = what.encode("utf-8", "replace")[: _PAGE - 2]
        _page[2 : 2 + len(data)] = data
        _page[0:2] = len(data).to_bytes(2, "big")


def _vm_size_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    return 0


def main(argv: list[str]) -> int:
    """``python -m carod.node.evaluator MEMORY_MIB PAGE_FD [UID GID]``: answer requests on stdin until it closes.

    Started by root, it becomes UID:GID (no groups, so no capabilities) before it reads a request.
    """
    global _page
    memory_mib, page_fd = int(argv[0]), int(argv[1])
    _page = mmap.mmap(page_fd, _PAGE)
    limit = _vm_size_kib() * 1024 + memory_mib * MIB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if len(argv) >= 4 and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(int(argv[3]))
        os.setuid(int(argv[2]))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    ready = json.dumps({"ready": os.getpid()}).encode()
    stdout.write(_LEN.pack(len(ready)) + ready)
    stdout.flush()
    machine = classad2.ClassAd()
    while True:
        head = stdin.read(_LEN.size)
        if len(head) < _LEN.size:
            return 0
        request = json.loads(stdin.read(_LEN.unpack(head)[0]))
        try:
            if request.get("machine") is not None:  # None: the same as the last request's
                machine = classad2.parseOne(request["machine"])
            answer = preflight(request["job"], machine)
        except MemoryError:
            answer = {"memory": True}
        except (classad2.ClassAdException, ValueError) as exc:
            answer = {"held": f"the job ad could not be read back ({exc})"}
        except Exception as exc:  # a bug here, not the job's doing: carod requeues the job
            answer = {"bug": repr(exc)[:1000]}
        data = json.dumps({**answer, "id": request.get("id")}).encode()
        stdout.write(_LEN.pack(len(data)) + data)
        stdout.flush()
        if answer.get("memory"):
            return 0  # a fresh child for the next job


# ---------------------------------------------------------------- carod's side


class Evaluator:
    """carod's handle on the child: one request at a time, each bounded in time; a fresh child after a failure."""

    def __init__(
        self, *, timeout_s: float, memory_mib: int, user: str | None = None, metrics: Metrics | None = None
    ) -> None:
        """``user``: run the child as this user when carod runs as root (the job user: it needs no rights)."""
        self.timeout_s = timeout_s
        self.memory_mib = memory_mib
        self.metrics = metrics
        self._ids: list[str] = []
        if user is not None and os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                entry = pwd.getpwnam("nobody")
            self._ids = [str(entry.pw_uid), str(entry.pw_gid)]
        self._proc: _Child | None = None
        #: children killed without waiting (a cancelled request), reaped in the background
        self._reaping: set[asyncio.Task[None]] = set()
        #: the machine ad text the child has (it is sent only when it changed)
        self._machine_sent: str | None = None
        self._lock = asyncio.Lock()
        self._sequence = 0
        fd = os.memfd_create("carod-evaluator", os.MFD_CLOEXEC)  # the child's by pass_fds, no other's
        os.ftruncate(fd, _PAGE)
        self._page_fd = fd
        self._page = mmap.mmap(fd, _PAGE)
        #: children killed or lost, and job ads sent to the child (for tests and logs)
        self.restarts = 0
        self.preflights = 0

    @classmethod
    def for_node(cls, config: Config, metrics: Metrics | None = None) -> Evaluator:
        """With ``[node] eval_timeout_s`` and ``eval_memory_mib``, the child running as ``[node] job_user``."""
        node = config.node
        return cls(timeout_s=node.eval_timeout_s, memory_mib=node.eval_memory_mib, user=node.job_user, metrics=metrics)

    async def start(self) -> None:
        """Start the child. Raises EvaluatorError."""
        self._abandon()
        self._machine_sent = None
        command = f"{sys.executable} -m carod.node.evaluator"
        try:
            proc = _Child.spawn(
                [sys.executable, "-m", "carod.node.evaluator", str(self.memory_mib), str(self._page_fd), *self._ids],
                page_fd=self._page_fd,
            )
        except OSError as exc:
            raise EvaluatorError(f"cannot start the ClassAd evaluator ({command}): {exc!r}") from exc
        try:
            await asyncio.wait_for(self._read(proc), _START_TIMEOUT_S)  # {"ready": pid}
        except (EOFError, TimeoutError, ValueError, OSError) as exc:
            await proc.kill()
            raise EvaluatorError(f"cannot start the ClassAd evaluator ({command}): {exc!r}") from exc
        except BaseException:
            self._reap_later(proc)  # cancelled: never keep a child whose first answer was not read
            raise
        self._proc = proc

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def job_ad(self, job: classad2.ClassAd, machine: Callable[[], classad2.ClassAd]) -> classad2.ClassAd:
        """The ad carod handles in-process. Raises JobHeld.

        ``job`` itself when :func:`carod.wire.adcost.problem` bounds it from its text
        (the fast path: no round trip, ``machine`` not called); otherwise the
        child's reduced ad, evaluated against ``machine()``.
        """
        if adcost.problem({name: str(job.lookup(name)) for name in job}) is None:
            return job
        self.preflights += 1
        try:
            reduced = await self.preflight(job, machine())
        except JobHeld:
            self._count("held")
            raise
        except EvaluatorError:
            self._count("failed")
            raise
        self._count("ok")
        return reduced

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.evaluations.labels(outcome=outcome).inc()

    async def preflight(self, job: classad2.ClassAd, machine: classad2.ClassAd) -> classad2.ClassAd:
        """The job ad reduced by the child (see the module doc). Raises JobHeld."""
        machine_text = str(machine)
        async with self._lock:
            if self._proc is None or self._proc.exited():
                await self.start()
            same = machine_text == self._machine_sent
            self._sequence += 1
            request = json.dumps(
                {"id": self._sequence, "job": str(job), "machine": None if same else machine_text}
            ).encode()
            self._machine_sent = machine_text
            proc = self._proc
            self._page[0:2] = b"\0\0"
            started = time.monotonic()
            try:
                answer = await asyncio.wait_for(self._ask(proc, request), self.timeout_s)
            except asyncio.CancelledError:
                self._abandon()  # its answer would be read as the next job's
                raise
            except TimeoutError:
                what = self._what()
                await self._replace(f"took more than {self.timeout_s:g}s")
                raise JobHeld(
                    f"the job's ClassAd took more than {self.timeout_s:g} s to evaluate ({what}); "
                    f"carod evaluates a job ad for at most [node] eval_timeout_s = {self.timeout_s:g} s",
                    HoldCode.JOB_POLICY_UNDEFINED,
                ) from None
            except (EOFError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
                # Died without an answer: the C++ library aborts when an allocation fails under RLIMIT_AS.
                what = self._what()
                await self._replace(f"died ({exc!r})")
                raise self._memory_held(what) from exc
            if answer.get("id") != self._sequence:  # never another job's answer
                await self._replace(f"answered request {answer.get('id')!r} to request {self._sequence}")
                raise EvaluatorError("the ClassAd evaluator's answer was not for this job")
            if "bug" in answer:
                await self._replace(f"failed: {answer['bug']}")
                raise EvaluatorError(f"the ClassAd evaluator failed: {answer['bug']}")
            if answer.get("memory"):
                what = self._what()
                await self._replace("ran out of memory")
                raise self._memory_held(what)
            log.debug("pre-flight took %.6fs", time.monotonic() - started)
        held = answer.get("held")
        if isinstance(held, str):
            raise JobHeld(held, HoldCode.JOB_POLICY_UNDEFINED)
        text = answer.get("ad")
        if not isinstance(text, str):
            raise JobHeld("the ClassAd evaluator gave no answer for the job", HoldCode.JOB_POLICY_UNDEFINED)
        try:
            reduced = classad2.parseOne(text)
        except (classad2.ClassAdException, ValueError) as exc:
            raise JobHeld(f"the job ad reduced by the evaluator does not parse ({exc})") from exc
        # Checked again here: carod trusts no answer of the child's to be cheap to evaluate.
        if adcost.problem({name: str(reduced.lookup(name)) for name in reduced}) is not None:
            raise EvaluatorError("the ClassAd evaluator answered with an ad that is not bounded")
        return reduced

    def _memory_held(self, what: str) -> JobHeld:
        return JobHeld(
            f"the job's ClassAd took more than {self.memory_mib} MiB to evaluate ({what}); carod evaluates a job "
            f"ad with at most [node] eval_memory_mib = {self.memory_mib} MiB",
            HoldCode.JOB_POLICY_UNDEFINED,
        )

    async def _ask(self, proc: _Child | None, request: bytes) -> dict[str, Any]:
        if proc is None:
            raise EOFError("the evaluator is not running")
        await proc.write(_LEN.pack(len(request)) + request)
        return await self._read(proc)

    async def _read(self, proc: _Child) -> dict[str, Any]:
        head = await proc.readexactly(_LEN.size)
        size = _LEN.unpack(head)[0]
        if size > MAX_REPLY_BYTES:
            raise ValueError(f"an answer of {size} bytes")
        data = json.loads(await proc.readexactly(size))
        if not isinstance(data, dict):
            raise ValueError("an answer that is not an object")
        return data

    def _what(self) -> str:
        size = int.from_bytes(self._page[0:2], "big")
        name = self._page[2 : 2 + size].decode("utf-8", "replace")
        if not name:
            return "while reading the ad"
        side, _, attribute = name.partition(" ")
        return f"attribute {attribute}" if side == "job" else f"this machine's {attribute} against the job"

    async def _replace(self, why: str) -> None:
        """Kill the child (it is not trusted any more) and start a fresh one."""
        self.restarts += 1
        log.warning("the ClassAd evaluator %s: killed and restarted", why)
        await self._kill()
        with contextlib.suppress(EvaluatorError):
            await self.start()

    def _abandon(self) -> None:
        """Kill the child without waiting for it; the next request starts a fresh one."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._reap_later(proc)

    def _reap_later(self, proc: _Child) -> None:
        task = proc.abandon()
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    async def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await proc.kill()

    async def close(self) -> None:
        async with self._lock:
            await self._kill()
        if self._reaping:
            await asyncio.gather(*self._reaping, return_exceptions=True)
        self._page.close()
        os.close(self._page_fd)


class _Child:
    """The child process, its pipes (carod's ends, non-blocking) and its pidfd, each closed exactly once."""

    def __init__(self, popen: subprocess.Popen[bytes], to_child: int, from_child: int) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._to_child = to_child
        self._from_child = from_child
        self._buffer = bytearray()
        self._closed = False
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)  # unreaped, so the pid is still this child's
        except OSError:
            self._pidfd = None

    @classmethod
    def spawn(cls, argv: list[str], *, page_fd: int) -> _Child:
        """Start it on the loop's thread (as jobs: carod/sandbox/runner.py). Raises OSError."""
        child_in, to_child = os.pipe2(os.O_CLOEXEC)
        from_child, child_out = os.pipe2(os.O_CLOEXEC)
        try:
            # On the loop's thread on purpose (module docstring); a fork and exec, no wait.
            popen = subprocess.Popen(
                argv,
                stdin=child_in,
                stdout=child_out,
                pass_fds=(page_fd,),
                close_fds=True,
                cwd="/",
                env=_child_env(),
            )
        except BaseException:
            for fd in (to_child, from_child):
                os.close(fd)
            raise
        finally:
            os.close(child_in)
            os.close(child_out)
        os.set_blocking(to_child, False)
        os.set_blocking(from_child, False)
        return cls(popen, to_child, from_child)

    def exited(self) -> bool:
        return self.popen.poll() is not None

    async def write(self, data: bytes) -> None:
        """Write all of ``data``. Raises BrokenPipeError when the child is gone."""
        view = memoryview(data)
        while view:
            if self._closed:
                raise EOFError("the evaluator's pipes are closed")
            try:
                view = view[os.write(self._to_child, view) :]
            except BlockingIOError:
                await self._ready(writing=True)

    async def readexactly(self, size: int) -> bytes:
        """``size`` bytes from the child. Raises asyncio.IncompleteReadError at its end."""
        while len(self._buffer) < size:
            if self._closed:
                raise EOFError("the evaluator's pipes are closed")
            try:
                data = os.read(self._from_child, max(size - len(self._buffer), 65536))
            except BlockingIOError:
                await self._ready(writing=False)
                continue
            if not data:
                raise asyncio.IncompleteReadError(bytes(self._buffer), size)
            self._buffer += data
        answer = bytes(self._buffer[:size])
        del self._buffer[:size]
        return answer

    async def _ready(self, *, writing: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writing:
            loop.add_writer(self._to_child, wake)
        else:
            loop.add_reader(self._from_child, wake)
        try:
            await ready
        finally:
            if writing:
                loop.remove_writer(self._to_child)
            else:
                loop.remove_reader(self._from_child)

    def _close_pipes(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._to_child)
            os.close(self._from_child)

    def _signal_kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()  # not if it was reaped already

    async def kill(self) -> None:
        """Kill it and wait until it is reaped."""
        self._close_pipes()
        self._signal_kill()
        await self._reap()

    def abandon(self) -> asyncio.Task[None]:
        """Kill it now; the task that reaps it is returned (to be awaited before the loop ends)."""
        self._close_pipes()
        self._signal_kill()
        return asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        try:
            if self.popen.returncode is not None:
                return
            if self._pidfd is None:  # a kernel without pidfds
                await asyncio.to_thread(self.popen.wait)
                return
            loop = asyncio.get_running_loop()
            gone = loop.create_future()

            def readable() -> None:
                if not gone.done():
                    gone.set_result(None)

            loop.add_reader(self._pidfd, readable)
            try:
                await gone
            finally:
                loop.remove_reader(self._pidfd)
            self.popen.wait()  # it has exited: at once
        finally:
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None


def _child_env() -> dict[str, str]:
    """The child's environment: none of carod's (it may hold the broker's credentials)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
