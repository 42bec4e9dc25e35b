"""Start the job's process as the job user, wait for it, stop it.

The process is started with :class:`subprocess.Popen` on the default asyncio
loop's thread, never through uvloop (which cannot drop privileges and leaks
descriptors; see docs/security.md):

* ``user``/``group`` = the job user, ``extra_groups=[]`` (no supplementary
  groups), ``umask`` 077;
* ``close_fds`` (only 0, 1, 2 are inherited), ``start_new_session`` (its own
  session and process group);
* an environment built only from the job's ``Environment`` on top of a
  minimal PATH/HOME/TMPDIR.

It is waited for with a pidfd on the event loop (no thread, no SIGCHLD
handler); ``wait4`` then gives its exit status and resource usage. Once the
main process has exited, the rest of its process group is killed while its
zombie still holds the group id, so no stray process survives the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import pwd
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from carod.errors import EXIT_NOPERM, EXIT_NOUSER, JobHeld, StartupError
from carod.holdcodes import HoldCode
from carod.jobad import JobSpec
from carod.replies import ExitInfo
from carod.sandbox import Owner, Stdio

BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
#: How long to wait for a SIGKILLed job's processes to actually die.
GROUP_DEATH_TIMEOUT_S = 5.0

log = logging.getLogger("carod.runner")


@dataclass(frozen=True)
class JobUser:
    """Who jobs run as. ``switch`` is False when carod itself is that user."""

    name: str
    uid: int
    gid: int
    switch: bool

    @property
    def owner(self) -> Owner:
        return Owner(self.uid, self.gid)


def resolve_user(name: str) -> JobUser:
    """Look up the job user and check carod may run jobs as it."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise StartupError(f"[node] job_user: there is no user {name!r} on this host", EXIT_NOUSER) from None
    if entry.pw_uid == 0:
        raise StartupError("[node] job_user: jobs must not run as root", EXIT_NOPERM)
    me = os.geteuid()
    if me == entry.pw_uid:
        return JobUser(entry.pw_name, entry.pw_uid, entry.pw_gid, switch=False)
    if me != 0:
        raise StartupError(
            f"[node] job_user: carod runs as uid {me} and cannot start jobs as {entry.pw_name!r}; "
            "run carod as root, or set job_user to the user carod runs as",
            EXIT_NOPERM,
        )
    return JobUser(entry.pw_name, entry.pw_uid, entry.pw_gid, switch=True)


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


class JobProcess:
    """One running job. :meth:`wait` returns once it and its group are gone."""

    def __init__(self, popen: subprocess.Popen[bytes], started: float) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.started_monotonic = started
        self.start_time = time.time()
        self._exit: ExitInfo | None = None
        self._waiter: asyncio.Task[ExitInfo] | None = None

    @classmethod
    def start(cls, spec: JobSpec, sandbox: Path, user: JobUser, stdio: Stdio) -> JobProcess:
        executable = command_path(spec, sandbox)
        started = time.monotonic()
        try:
            popen = subprocess.Popen(
                [spec.cmd, *spec.arguments],
                executable=executable,
                cwd=sandbox,
                env=job_environment(spec, sandbox, user),
                stdin=stdio.stdin,
                stdout=stdio.stdout,
                stderr=stdio.stderr,
                close_fds=True,
                start_new_session=True,
                umask=0o077,
                user=user.uid if user.switch else None,
                group=user.gid if user.switch else None,
                extra_groups=[] if user.switch else None,
            )
        except FileNotFoundError as exc:
            raise JobHeld(
                f"the job's command {spec.cmd!r} does not exist on this node",
                HoldCode.FAILED_TO_CREATE_PROCESS,
                exc.errno or 0,
            ) from exc
        except PermissionError as exc:
            raise JobHeld(
                f"the job's command {spec.cmd!r} cannot be executed by the job user {user.name!r} ({exc.strerror})",
                HoldCode.FAILED_TO_CREATE_PROCESS,
                exc.errno or 0,
            ) from exc
        except OSError as exc:
            if exc.errno == errno.ENOEXEC:
                raise JobHeld(
                    f"the job's command {spec.cmd!r} cannot be executed: it is not a program or script this node "
                    "can run (a script needs a #! line)",
                    HoldCode.FAILED_TO_CREATE_PROCESS,
                    exc.errno,
                ) from exc
            raise JobHeld(
                f"the job's command {spec.cmd!r} could not be started: {exc.strerror}",
                HoldCode.FAILED_TO_CREATE_PROCESS,
                exc.errno or 0,
            ) from exc
        return cls(popen, started)

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
        _, status, usage = os.wait4(self.pid, 0)  # noqa: ASYNC222 - it has exited: this does not block
        if _group_exists(self.pid):
            # SIGKILL is asynchronous: the job is over only when its processes are.
            await asyncio.to_thread(_wait_group_dead, self.pid, GROUP_DEATH_TIMEOUT_S)
        self._popen.returncode = os.waitstatus_to_exitcode(status)
        code: int | None = None
        sig: int | None = None
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
        else:
            code = os.WEXITSTATUS(status)
        self._exit = ExitInfo(
            exit_code=code,
            exit_signal=sig,
            duration_s=time.monotonic() - self.started_monotonic,
            user_cpu_s=usage.ru_utime,
            sys_cpu_s=usage.ru_stime,
            max_rss_kib=usage.ru_maxrss,
        )
        return self._exit

    def signal_group(self, sig: int) -> None:
        if self._exit is None:
            _kill_group(self.pid, sig)

    async def stop(self, kill_sig: int, grace_s: float) -> ExitInfo:
        """KillSig to the whole group, then SIGKILL after ``grace_s``."""
        self.signal_group(kill_sig)
        try:
            return await asyncio.wait_for(self.wait(), grace_s)
        except TimeoutError:
            self.signal_group(signal.SIGKILL)
            return await self.wait()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_members(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` that are not yet zombies."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ... ; comm may contain spaces and parentheses
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


def _wait_group_dead(pgid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while _live_members(pgid):
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


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell it from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def kill_leftover(pid: int, start_time: str | None) -> bool:
    """Kill the process group of a job carod lost track of (it died while the job ran).

    Only when ``pid`` is still the same process (same start time). Blocking:
    call it in a thread. Returns True when something was killed.
    """
    if start_time is None or process_start_time(pid) != start_time:
        return False
    _kill_group(pid, signal.SIGKILL)
    _wait_group_dead(pid, GROUP_DEATH_TIMEOUT_S)
    return True
