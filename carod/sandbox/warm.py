"""Sandboxes started ahead of their jobs: a job starts in about a millisecond.

Starting a job's chain (gate, bubblewrap's namespaces and mounts, setpriv)
costs ~5 ms, most of a small job's time on the node (docs/performance.md).
So, per slot, carod keeps one sandbox *started ahead*: a fresh directory, a
fresh cgroup (no limits yet), and the whole chain already running, ending in
the job user's shell (:data:`carod.sandbox.isolation.WAIT_SCRIPT`) waiting on
a pipe. When a job comes, carod unpacks its input into that directory,
checks its command, writes its limits into that cgroup, opens its stdio to
check and create the files, and then writes the job's fields (stdio paths,
rlimits, argv with environment) into the pipe and closes it: the shell opens
the stdio as the job user, sets the rlimits and execs the job. The next
sandbox is prepared while the job runs.

What each job gets is what a cold start gives it: namespaces of its own
(each waiting chain is one job's, never reused), a directory and a cgroup of
its own, the job user, the same root-side rule (nothing the job chose is
seen by a root process: the fields reach only the job user's shell). What
differs is said in docs/security.md ("Sandboxes started ahead").

A waiting shell that reads anything but a whole job (carod died, or gave the
sandbox up) exits 125 before anything of a job runs. Unused sandboxes are
removed at shutdown; after a crash, the next start removes them as it removes
any leftover (their cgroups are ``job-*``, their gates and directories are
under the sandbox root).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import resource
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from carod.errors import JobHeld
from carod.sandbox import isolation, network, runner
from carod.sandbox.cgroup import CgroupError, JobCgroup, Limits
from carod.sandbox.isolation import Layers
from carod.sandbox.users import JobUser
from carod.sandbox.workdir import Stdio

log = logging.getLogger("carod.warm")

#: The longest carod waits for a waiting shell to take its job's fields (it reads them at once).
SEND_TIMEOUT_S = 30.0
#: After SIGKILL, the longest carod waits for an unused sandbox's chain to end.
STOP_TIMEOUT_S = 5.0

MakeBox = Callable[[JobUser], tuple[Path, int | None]]
#: Attaches the network of a sandbox (network = outbound/services) to its chain's pid (blocking).
AttachNet = Callable[[int], network.Attached]
RemoveBox = Callable[[Path, int | None], None]


@dataclass
class Warm:
    """One sandbox started ahead: its user, directory, cgroup and waiting chain."""

    user: JobUser
    box: Path
    quota_group: int | None
    cgroup: JobCgroup | None
    popen: subprocess.Popen[bytes]
    #: the pipe's write end; -1 once the job was sent or the sandbox given up
    go_fd: int
    #: its slirp4netns (network = outbound/services), ended with it
    net: network.Attached | None = None

    def alive(self) -> bool:
        return self.go_fd >= 0 and self.popen.poll() is None

    def send(self, fields: list[str], timeout_s: float = SEND_TIMEOUT_S) -> None:
        """Give the waiting shell its job (blocking). Raises OSError (e.g. EPIPE: the shell is gone)."""
        data = b"".join(os.fsencode(f) + b"\0" for f in [*fields, "carod-end"])
        fd, self.go_fd = self.go_fd, -1
        if fd < 0:
            raise OSError("the sandbox prepared ahead was already used")
        try:
            os.set_blocking(fd, False)
            view = memoryview(data)
            deadline = time.monotonic() + timeout_s
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([], [fd], [], left)[1]:
                        raise TimeoutError("the sandbox prepared ahead did not take its job") from None
        finally:
            os.close(fd)

    def stop(self) -> None:
        """Give it up: the shell gets no job (it exits 125), then the chain is killed and reaped (blocking)."""
        if self.go_fd >= 0:
            os.close(self.go_fd)
            self.go_fd = -1
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.signal(signal.SIGKILL)
        try:
            self.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the chain of an unused sandbox (pid %d) did not end after SIGKILL", self.popen.pid)
        self.stop_network()

    def stop_network(self) -> None:
        """End its slirp4netns: its forwarded ports close (blocking, idempotent)."""
        if self.net is not None:
            self.net.stop()


def fields(stdin: str, stdout: str, stderr: str, *, limits: list[tuple[int, int]], argv: list[str]) -> list[str]:
    """What the waiting shell reads (isolation.WAIT_SCRIPT): stdio paths, rlimits in KiB, the job's argv.

    ``stderr`` = "" sends stderr where stdout goes. Only RLIMIT_FSIZE and
    RLIMIT_AS are the job's own (RLIMIT_CORE = 0 is set on the chain ahead).
    Raises ValueError for a field the shell could not read back (a NUL byte).
    """
    fsize = address = ""
    for which, value in limits:
        if which == resource.RLIMIT_FSIZE:
            fsize = str(-(-value // 1024))  # rounded up: at least the bytes asked for
        elif which == resource.RLIMIT_AS:
            address = str(value // 1024)
    result = [stdin, stdout, stderr, fsize, address, *argv]
    if any("\0" in f for f in result):
        raise ValueError("a NUL byte in the job's command line or environment")
    return result


class WarmPool:
    """The sandboxes started ahead, per job user; every preparing task is kept here.

    With a shared job user, ``per_user`` (the slots) sandboxes wait and a new
    one is prepared as each is taken. With slot users, each user's one waits;
    its next is prepared when its job is over (:meth:`refill`), since the end of
    a slot user's job kills every process of that user.
    """

    def __init__(
        self,
        layers: Layers,
        users: list[JobUser],
        per_user: int,
        *,
        make_box: MakeBox,
        remove_box: RemoveBox,
        refill_on_take: bool,
        attach_net: AttachNet | None = None,
    ) -> None:
        self.layers = layers
        self.users = users
        self.per_user = per_user
        self._make_box = make_box
        self._remove_box = remove_box
        self._refill_on_take = refill_on_take
        self._attach_net = attach_net
        self._waiting: dict[int, collections.deque[asyncio.Task[Warm | None]]] = {
            u.uid: collections.deque() for u in users
        }
        self._tasks: set[asyncio.Task[Warm | None]] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = False
        #: jobs that found a sandbox ready / had to wait for one / started cold
        self.hits = self.waits = self.misses = 0

    def start(self) -> None:
        for user in self.users:
            for _ in range(self.per_user):
                self._prepare_soon(user)

    async def ready(self) -> int:
        """Wait until every sandbox being prepared is ready (or failed). Returns how many are ready."""
        pending = [t for queue in self._waiting.values() for t in queue]
        done = await asyncio.gather(*pending)
        return sum(w is not None for w in done)

    def waiting(self) -> list[Warm]:
        """The sandboxes ready now (started ahead, no job yet)."""
        done = [t.result() for q in self._waiting.values() for t in q if t.done()]
        return [w for w in done if w is not None]

    async def take(self, user: JobUser) -> Warm | None:
        """A sandbox started ahead for ``user``; None when there is none (the job starts cold)."""
        queue = self._waiting.get(user.uid)
        if self.closed or not queue:
            self.misses += 1
            return None
        task = queue.popleft()
        if self._refill_on_take:
            self._prepare_soon(user)
        ready = task.done()
        try:
            warm = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._give_up_later)  # nobody takes it now
            raise
        if warm is not None and not warm.alive():
            log.warning(
                "a sandbox started ahead ended before its job came (pid %d, rc %s); starting cold",
                warm.popen.pid,
                warm.popen.returncode,
            )
            await self._give_up(warm)
            warm = None
        if warm is None:
            self.misses += 1
        elif ready:
            self.hits += 1
        else:
            self.waits += 1
        return warm

    async def prepare_now(self, user: JobUser) -> Warm | None:
        """A sandbox made now for a job that found none ready (network = outbound/services start no other way)."""
        if self.closed:
            return None
        task = asyncio.create_task(self._prepare(user))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            warm = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._give_up_later)
            raise
        return warm

    def refill(self, user: JobUser) -> None:
        """``user``'s job is over (slot users): prepare its next sandbox."""
        if not self._refill_on_take and not self.closed and user.uid in self._waiting:
            self._prepare_soon(user)

    async def close(self) -> None:
        """Stop preparing; kill and remove every sandbox nobody took."""
        self.closed = True
        queues = [t for queue in self._waiting.values() for t in queue]
        for queue in self._waiting.values():
            queue.clear()
        for warm in await asyncio.gather(*queues):
            if warm is not None:
                await self._give_up(warm)
        if self._closing:
            await asyncio.gather(*self._closing)

    def _prepare_soon(self, user: JobUser) -> None:
        task = asyncio.create_task(self._prepare(user))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._waiting[user.uid].append(task)

    async def _prepare(self, user: JobUser) -> Warm | None:
        made: tuple[Path, int | None] | None = None
        group: JobCgroup | None = None
        go_fd = -1
        try:
            made = box, quota_group = await asyncio.to_thread(self._make_box, user)
            if self.layers.cgroups is not None:
                group = await asyncio.to_thread(self.layers.cgroups.create, f"job-{box.name}", Limits())
            read_fd, go_fd = os.pipe2(os.O_CLOEXEC)
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                popen = await runner.spawn(
                    self.layers,
                    lambda seccomp_fd: isolation.waiting(self.layers, user, box, seccomp_fd=seccomp_fd),
                    Stdio(read_fd, null, null),
                    group,
                    [(resource.RLIMIT_CORE, 0)],
                )
            finally:
                os.close(read_fd)
                os.close(null)
        except (JobHeld, CgroupError, OSError) as exc:
            why = exc.reason if isinstance(exc, JobHeld) else str(exc)
            log.warning("could not start a sandbox ahead for %s: %s; its job will start cold", user.name, why)
            if go_fd >= 0:
                os.close(go_fd)
            if group is not None:
                await asyncio.to_thread(group.remove)
            if made is not None:
                await asyncio.to_thread(self._remove_box, *made)
            return None
        warm = Warm(user, box, quota_group, group, popen, go_fd)
        if self._attach_net is not None:
            try:
                warm.net = await asyncio.to_thread(self._attach_net, popen.pid)
            except OSError as exc:
                log.warning("could not set up the network of a sandbox for %s: %s", user.name, exc)
                await self._give_up(warm)
                return None
        return warm

    async def _give_up(self, warm: Warm) -> None:
        await asyncio.to_thread(warm.stop)
        if warm.cgroup is not None:
            await asyncio.to_thread(warm.cgroup.remove)
        await asyncio.to_thread(self._remove_box, warm.box, warm.quota_group)

    def _give_up_later(self, task: asyncio.Task[Warm | None]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        warm = task.result()
        if warm is not None:
            closing = asyncio.ensure_future(self._give_up(warm))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
