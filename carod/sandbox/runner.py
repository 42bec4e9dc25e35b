"""Start the job's process through the isolation chain, wait for it, stop it.

A job is started with :class:`subprocess.Popen` on the event loop's thread
(never through a loop's own spawn: uvloop's, libuv's, passes the parent's
descriptors on; see docs/security.md) as the chain
:func:`carod.sandbox.isolation.command` builds (or, ahead of its job,
:func:`carod.sandbox.isolation.waiting`, carod.sandbox.warm):

* Popen itself runs as root with ``close_fds`` (only 0, 1, 2 are inherited),
  ``start_new_session`` (own session and process group, no controlling terminal), ``umask`` 077, in ``/`` with
  a fixed environment (:data:`carod.sandbox.isolation.ROOT_ENV`): the job's own environment (its ``Environment`` on top
  of a minimal PATH/HOME/TMPDIR) and its sandbox as working directory are applied by ``env -i -C`` after the
  switch to the job user, never seen by a root process;
* while the gate is stopped, carod (in a worker thread: a cgroup v1 move can
  wait for other jobs' forks and exits) moves it into the job's cgroup and
  sets its rlimits (core 0; file size from RequestDisk; address space from
  RequestMemory when there is no memory cgroup), then lets it go;
* setpriv drops to the job user, bubblewrap (when present) isolates.

It is waited for with a pidfd on the event loop; ``wait4`` gives its exit
status and resource usage. When the main process has exited, the rest of the
job is killed: the whole cgroup (freeze + kill, or ``cgroup.kill``); without
one the process group, plus every process of the job's slot user.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import cmdpath, isolation, procfs
from carod.sandbox.cgroup import JobCgroup, Limits, sweep_user
from carod.sandbox.isolation import Layers
from carod.sandbox.limits import JobLimits
from carod.sandbox.users import JobUser
from carod.sandbox.workdir import Stdio, executable_by
from carod.units import MIB
from carod.wire.jobad import JobSpec
from carod.wire.replies import ExitInfo, Usage

BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
#: How long to wait for a SIGKILLed job's processes to actually die.
GROUP_DEATH_TIMEOUT_S = 5.0

log = logging.getLogger("carod.runner")
_SIGNALS = {int(s) for s in signal.valid_signals()}


def job_environment(spec: JobSpec, sandbox: Path, user: JobUser) -> dict[str, str]:
    env = {
        "PATH": BASE_PATH,
        "HOME": str(sandbox),
        "TMPDIR": str(sandbox),
        "USER": user.name,
        "LOGNAME": user.name,
        "_CONDOR_SCRATCH_DIR": str(sandbox),
    }
    env.update(dict(spec.environment))
    return env


def command_path(spec: JobSpec, sandbox: Path) -> str:
    """An absolute Cmd as given; a relative one is inside the sandbox (HTCondor)."""
    return spec.cmd if spec.cmd.startswith("/") else str(sandbox / spec.cmd)


def check_command(spec: JobSpec, sandbox: Path, user: JobUser, view: cmdpath.View) -> str:
    """The job's executable, checked the way exec would for the job user, in its view. Raises JobHeld. Blocking.

    carod runs as root, but it must not tell the job more than the job user
    could find out (carod.sandbox.cmdpath): the path is walked as the job user, in
    the job's view, without the kernel following a link for root.
    """
    path = command_path(spec, sandbox)

    def held(why: str, code: int) -> JobHeld:
        return JobHeld(f"the job's command {spec.cmd!r} {why}", HoldCode.FAILED_TO_CREATE_PROCESS, code)

    try:
        ref = cmdpath.open_as(path, user.owner, view)
    except cmdpath.CommandRefused as refused:
        raise held(refused.why, refused.code) from None
    try:
        st = os.fstat(ref)
        if not stat.S_ISREG(st.st_mode):
            raise held("cannot be executed: it is not a regular file", errno.EACCES)
        if not executable_by(st, user.owner):
            raise held(f"cannot be executed by the job user {user.name!r} (Permission denied)", errno.EACCES)
        # Only a regular file is read, through the descriptor the walk ended on: 4 bytes.
        fd = os.open(f"/proc/self/fd/{ref}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.read(fd, 4)
        finally:
            os.close(fd)
    except OSError as exc:
        raise held(f"cannot be read: {exc.strerror}", exc.errno or 0) from exc
    finally:
        os.close(ref)
    if head[:2] != b"#!" and head != b"\x7fELF":
        raise held(
            "cannot be executed: it is not a program or script this node can run (a script needs a #! line)",
            errno.ENOEXEC,
        )
    return path


def rlimits(limits: JobLimits, cgroup: JobCgroup | None, controllers: frozenset[str]) -> list[tuple[int, int]]:
    """The rlimits for a job: always no core dumps; the rest where no cgroup does it."""
    result = [(resource.RLIMIT_CORE, 0)]
    if limits.disk_bytes is not None:
        result.append((resource.RLIMIT_FSIZE, limits.disk_bytes))
    if limits.memory_mib and (cgroup is None or "memory" not in controllers):
        result.append((resource.RLIMIT_AS, int(limits.memory_mib * MIB)))
    return result


class JobProcess:
    """One running job. :meth:`wait` returns once every process of it is gone."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        user: JobUser,
        cgroup: JobCgroup | None,
        *,
        sweep: bool,
        status_from_code: bool = False,
    ) -> None:
        self._popen = popen
        #: bubblewrap reports a job killed by signal N as exit code 128+N
        self._status_from_code = status_from_code
        self.pid = popen.pid
        self.user = user
        self.cgroup = cgroup
        self._sweep = sweep
        self.started_monotonic = time.monotonic()
        self.start_time = time.time()
        self._exit: ExitInfo | None = None
        self._waiter: asyncio.Task[ExitInfo] | None = None

    @classmethod
    async def start(
        cls,
        argv: list[str],
        *,
        box: Path,
        env: dict[str, str],
        stdio: Stdio,
        user: JobUser,
        layers: Layers,
        cgroup: JobCgroup | None,
        limits: list[tuple[int, int]],
        sweep: bool,
    ) -> JobProcess:
        """Start ``argv`` as ``user`` in ``box`` through the chain. Raises JobHeld."""
        popen = await spawn(
            layers,
            lambda seccomp_fd: isolation.command(layers, user, box, argv, env, seccomp_fd=seccomp_fd),
            stdio,
            cgroup,
            limits,
        )
        return cls(popen, user, cgroup, sweep=sweep, status_from_code=layers.bwrap is not None)

    async def wait(self) -> ExitInfo:
        """The job's exit; safe to await from several places at once."""
        if self._waiter is None:
            self._waiter = asyncio.ensure_future(self._reap())
        return await asyncio.shield(self._waiter)

    async def _reap(self) -> ExitInfo:
        await _exited(self.pid)
        # The main process is a zombie now: its pid is still reserved, so
        # its process group id cannot be reused while we sweep the group.
        _kill_group(self.pid, signal.SIGKILL)
        if self._leftovers_possible():
            await asyncio.to_thread(self._kill_rest)
        _, status, usage = os.wait4(self.pid, 0)  # noqa: ASYNC222 - it has exited: this does not block
        self._popen.returncode = os.waitstatus_to_exitcode(status)
        code: int | None = None
        sig: int | None = None
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
        else:
            code = os.WEXITSTATUS(status)
            if self._status_from_code and code - 128 in _SIGNALS:
                sig = code - 128
                code = None
        user_s, sys_s, rss_kib, oom = usage.ru_utime, usage.ru_stime, usage.ru_maxrss, 0
        if self.cgroup is not None:
            measured = self.cgroup.usage()  # a few small cgroupfs reads: cheaper than a thread hop
            user_s = max(user_s, measured.user_cpu_s)
            sys_s = max(sys_s, measured.sys_cpu_s)
            rss_kib = measured.peak_memory_kib or rss_kib
            oom = measured.oom_kills
        self._exit = ExitInfo(
            exit_code=code,
            exit_signal=sig,
            duration_s=time.monotonic() - self.started_monotonic,
            user_cpu_s=user_s,
            sys_cpu_s=sys_s,
            max_rss_kib=rss_kib,
            oom_kills=oom,
        )
        return self._exit

    def _leftovers_possible(self) -> bool:
        """Could a process of the job outlive its main one? Cheap checks, on the loop.

        Every process of a job with a cgroup is in it and cannot leave it, so
        an empty cgroup means nothing is left (under bubblewrap the PID
        namespace died with its init before the main process could exit).
        Without one, the process group is all there is to go by.
        """
        if self._sweep:
            return True
        if self.cgroup is not None:
            return bool(self.cgroup.pids())
        return _group_exists(self.pid)

    def _kill_rest(self) -> None:
        """Every other process of the job, however it hid (blocking)."""
        if self.cgroup is not None:
            if not self.cgroup.settle() and not self.cgroup.kill(GROUP_DEATH_TIMEOUT_S):
                log.warning("processes of job cgroup %s still alive after SIGKILL", self.cgroup.name)
        elif _group_exists(self.pid):
            _wait_group_dead(self.pid, GROUP_DEATH_TIMEOUT_S)
        if self._sweep:
            killed = sweep_user(self.user.uid)
            if killed:
                log.info("killed %d leftover processes of slot user %s", killed, self.user.name)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the job's own processes (not carod's helpers running as root)."""
        if self._exit is not None:
            return
        if self.cgroup is not None:
            self.cgroup.signal(sig, uid=self.user.uid)
            return
        for pid in procfs.live_members(self.pid):
            if procfs.uid_of(pid) == self.user.uid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole job now; :meth:`wait` finishes the sweep."""
        if self._exit is not None:
            return
        _kill_group(self.pid, signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.signal(signal.SIGKILL)

    async def stop(self, kill_sig: int, grace_s: float) -> ExitInfo:
        """KillSig to the job, then SIGKILL of everything after ``grace_s``."""
        self.signal(kill_sig)
        try:
            return await asyncio.wait_for(self.wait(), grace_s)
        except TimeoutError:
            self.kill()
            return await self.wait()

    async def usage(self) -> Usage:
        """What the job uses now: from its cgroup (a few small reads), else its process group's /proc entries."""
        wall_s = time.monotonic() - self.started_monotonic
        if self.cgroup is not None:
            measured = self.cgroup.usage()
            pids = len(self.cgroup.pids())
            memory = measured.memory_kib or 0
            return Usage(
                wall_s, measured.user_cpu_s, measured.sys_cpu_s, memory, measured.peak_memory_kib or memory, pids
            )
        user_s, sys_s, rss_kib, pids = await asyncio.to_thread(procfs.group_usage, self.pid)
        return Usage(wall_s, user_s, sys_s, rss_kib, rss_kib, pids)

    def oom_kills(self) -> int:
        return self.cgroup.usage().oom_kills if self.cgroup is not None else 0

    def peak_memory_kib(self) -> int | None:
        return self.cgroup.usage().peak_memory_kib if self.cgroup is not None else None


async def spawn(
    layers: Layers,
    chain: Callable[[int | None], list[str]],
    stdio: Stdio,
    cgroup: JobCgroup | None,
    limits: list[tuple[int, int]],
) -> subprocess.Popen[bytes]:
    """Start a chain (``chain(seccomp_fd)``: isolation.command or isolation.waiting) under its limits.

    On the loop's thread (module docstring); the gate is put into its cgroup
    and under its rlimits, then let go, in a worker thread. Raises JobHeld.
    """
    seccomp_fd: int | None = None
    try:
        if layers.bwrap and layers.seccomp:
            seccomp_fd = _filter_fd(layers.seccomp)
        popen = subprocess.Popen(  # noqa: ASYNC220 - on the loop's thread on purpose (module docstring)
            chain(seccomp_fd),
            pass_fds=() if seccomp_fd is None else (seccomp_fd,),
            cwd=isolation.ROOT_CWD,
            env=isolation.ROOT_ENV,
            stdin=stdio.stdin,
            stdout=stdio.stdout,
            stderr=stdio.stderr,
            close_fds=True,
            start_new_session=True,
            umask=0o077,
        )
    except OSError as exc:
        raise JobHeld(
            f"carod could not start the job: {exc.strerror}", HoldCode.FAILED_TO_CREATE_PROCESS, exc.errno or 0
        ) from exc
    finally:
        if seccomp_fd is not None:
            os.close(seccomp_fd)
    # Off the loop: a cgroup v1 move can wait for other jobs' forks and exits.
    release = asyncio.ensure_future(asyncio.to_thread(_release, popen, limits, cgroup))
    try:
        await asyncio.shield(release)
    except asyncio.CancelledError:
        # Forced exit: nobody will watch this job; do not let it run.
        _kill_group(popen.pid, signal.SIGKILL)
        raise
    except OSError as exc:
        if popen.returncode is None:
            popen.kill()
            popen.wait()
        raise JobHeld(
            f"carod could not put the job under its limits: {exc.strerror}",
            HoldCode.FAILED_TO_CREATE_PROCESS,
            exc.errno or 0,
        ) from exc
    return popen


def _release(popen: subprocess.Popen[bytes], limits: list[tuple[int, int]], cgroup: JobCgroup | None) -> None:
    """Put the stopped gate under its rlimits and into its cgroup, then let it go (blocking)."""
    # The gate stops itself at once; nothing of the job has run yet.
    _, status = os.waitpid(popen.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        popen.returncode = os.waitstatus_to_exitcode(status)
        raise OSError(errno.ECHILD, "the start-up shell ended before the job started")
    for which, value in limits:
        resource.prlimit(popen.pid, which, (value, value))
    if cgroup is not None:
        cgroup.add(popen.pid)
    os.kill(popen.pid, signal.SIGCONT)


def _filter_fd(program: bytes) -> int:
    """A descriptor holding the seccomp filter, read from its start by bwrap (one per job)."""
    fd = os.memfd_create("carod-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def probe_limits() -> Limits:
    return Limits(memory_bytes=64 * MIB, cpus=1.0, pids=64)


async def probe(layers: Layers, user: JobUser, box: Path, cgroup: JobCgroup | None) -> str:
    """Run the probe job through the whole chain and return what it printed."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    out = os.fdopen(read_fd, "rb")
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        process = await JobProcess.start(
            [isolation.SH, "-c", isolation.PROBE_SCRIPT],
            box=box,
            env={"PATH": BASE_PATH},
            stdio=Stdio(null, write_fd, write_fd),
            user=user,
            layers=layers,
            cgroup=cgroup,
            limits=[(resource.RLIMIT_CORE, 0)],
            sweep=False,
        )
    except BaseException:
        out.close()
        raise
    finally:
        os.close(write_fd)
        os.close(null)
    with out:
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
        return out.read().decode(errors="replace")


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_group_dead(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while procfs.live_members(pgid):
        if time.monotonic() > deadline:
            log.warning("processes of job group %d still alive %.1fs after SIGKILL", pgid, timeout_s)
            return
        _kill_group(pgid, signal.SIGKILL)
        time.sleep(0.002)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _exited(pid: int) -> None:
    """Wait until ``pid`` has exited, without reaping it."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        await asyncio.to_thread(os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def kill_stopped_gates(sandbox_root: Path) -> int:
    """Kill the start-up gates an earlier carod left stopped (blocking). Returns how many.

    A gate stops itself until carod has put it in its cgroup. Should carod die
    in that moment, nobody continues it, and the kernel does not either (its
    process group was in a session of its own from the start, so it never
    *becomes* orphaned). Nothing of the job has run; the gate is found by its
    command line, which names this node's sandbox root.
    """
    marker = f"{isolation.GATE_SCRIPT}\0carod-gate\0".encode()
    root = os.fsencode(str(sandbox_root)) + b"/"
    killed = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read(1 << 16)
        except OSError:
            continue
        if marker in cmdline and root in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(name), signal.SIGKILL)
                killed += 1
    return killed


def kill_leftover(pid: int, start_time: str | None) -> bool:
    """Kill the process group of a job carod lost track of (it died while the job ran).

    Only when ``pid`` is still the same process (same start time). Blocking:
    call it in a thread. Returns True when something was killed.
    """
    if start_time is None or procfs.process_start_time(pid) != start_time:
        return False
    _kill_group(pid, signal.SIGKILL)
    _wait_group_dead(pid, GROUP_DEATH_TIMEOUT_S)
    return True
