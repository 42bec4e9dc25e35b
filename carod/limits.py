"""What a job may use, and watching that it does not use more.

:func:`limits_for` is pure: what the job reserved (its ``Request*``
attributes or the node's defaults) and the node's ``[sandbox]`` settings give
a :class:`JobLimits`. :func:`enforce` watches a
running job: wall clock, sandbox size, the kernel's OOM kills. When a limit
is exceeded the job is stopped (KillSig, grace, SIGKILL of the whole tree)
and the caller gets a :class:`JobHeld` that names the limit and the usage,
with HTCondor's hold code (34 out of resources, 47 execute duration).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from carod.cgroup import Limits
from carod.config import SandboxConfig
from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.jobad import JobSpec
from carod.replies import ExitInfo
from carod.resources import Request

if TYPE_CHECKING:
    from carod.runner import JobProcess

MIB = 1024 * 1024


@dataclass(frozen=True)
class JobLimits:
    memory_mib: float | None
    memory_source: str
    cpus: float
    pids: int
    disk_kib: float | None
    duration_s: float | None
    duration_source: str

    def cgroup(self) -> Limits:
        return Limits(
            memory_bytes=int(self.memory_mib * MIB) if self.memory_mib else None,
            cpus=self.cpus,
            pids=self.pids,
        )

    @property
    def disk_bytes(self) -> int | None:
        return int(self.disk_kib * 1024) if self.disk_kib else None


def limits_for(spec: JobSpec, config: SandboxConfig, request: Request) -> JobLimits:
    """A job is limited to what it reserved (docs/pool.md), plus the node's own caps."""
    memory, memory_source = request.memory_mib, request.memory_source
    durations = []
    if spec.allowed_execute_duration_s is not None:
        durations.append((spec.allowed_execute_duration_s, "AllowedExecuteDuration"))
    if config.max_job_duration_s:
        durations.append((config.max_job_duration_s, "[sandbox] max_job_duration_s"))
    duration, duration_source = min(durations) if durations else (None, "")
    return JobLimits(
        memory_mib=memory if memory > 0 else None,
        memory_source=memory_source,
        cpus=request.cpus,
        pids=config.max_job_pids,
        disk_kib=request.disk_kib or None,
        duration_s=duration,
        duration_source=duration_source,
    )


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:.1f} MiB"


def memory_exceeded(limits: JobLimits, peak_kib: int | None) -> JobHeld:
    peak = f"; peak usage {_mib(peak_kib * 1024)}" if peak_kib else ""
    return JobHeld(
        f"the job exceeded its memory limit of {_mib((limits.memory_mib or 0) * MIB)} ({limits.memory_source}) "
        f"and was killed by the kernel's out-of-memory killer{peak}",
        HoldCode.JOB_OUT_OF_RESOURCES,
    )


def disk_exceeded(limits: JobLimits, used_bytes: int | None) -> JobHeld:
    used = f"; the sandbox held {_mib(used_bytes)}" if used_bytes is not None else " (a file hit the size limit)"
    return JobHeld(
        f"the job exceeded its disk limit of {_mib(limits.disk_bytes or 0)} (RequestDisk = {limits.disk_kib:.0f} KiB)"
        f"{used}",
        HoldCode.JOB_OUT_OF_RESOURCES,
    )


def duration_exceeded(limits: JobLimits, elapsed_s: float) -> JobHeld:
    return JobHeld(
        f"the job ran for {elapsed_s:.1f} s, past its wall-clock limit of {limits.duration_s:g} s "
        f"({limits.duration_source})",
        HoldCode.JOB_EXECUTE_EXCEEDED,
    )


def after_exit(limits: JobLimits, info: ExitInfo) -> JobHeld | None:
    """A limit the exit itself shows: an OOM kill, or SIGXFSZ from RLIMIT_FSIZE."""
    if info.oom_kills:
        return memory_exceeded(limits, info.max_rss_kib)
    if info.exit_signal == signal.SIGXFSZ and limits.disk_kib:
        return disk_exceeded(limits, None)
    return None


def disk_usage_bytes(path: Path) -> int:
    """Bytes the sandbox takes on disk (allocated blocks; hard links once; no link followed)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for _root, _dirs, files, dir_fd in os.fwalk(path, follow_symlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    return total


async def enforce(
    process: JobProcess, limits: JobLimits, box: Path, *, interval_s: float, kill_sig: int, grace_s: float
) -> tuple[ExitInfo, JobHeld | None]:
    """Wait for the job; stop it when it exceeds a limit. Returns its exit and the limit it broke."""
    started = time.monotonic()
    held: JobHeld | None = None
    while held is None:
        timeout = interval_s
        if limits.duration_s is not None:
            timeout = min(timeout, max(0.0, started + limits.duration_s - time.monotonic()))
        try:
            info = await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            pass
        else:
            return info, after_exit(limits, info)
        elapsed = time.monotonic() - started
        if limits.duration_s is not None and elapsed >= limits.duration_s:
            held = duration_exceeded(limits, elapsed)
        elif process.oom_kills():
            held = memory_exceeded(limits, process.peak_memory_kib())
        elif limits.disk_bytes is not None:
            used = await asyncio.to_thread(disk_usage_bytes, box)
            if used > limits.disk_bytes:
                held = disk_exceeded(limits, used)
    info = await process.stop(kill_sig, grace_s)
    return info, held
