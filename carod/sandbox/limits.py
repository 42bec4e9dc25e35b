"""What a job may use, and watching that it does not use more.

:func:`limits_for` is pure: what the job reserved (its ``Request*``
attributes or the node's defaults) and the node's ``[sandbox]`` settings give
a :class:`JobLimits`. :func:`enforce` watches a
running job: wall clock, sandbox size, the kernel's OOM kills. When a limit
is exceeded the job is stopped (KillSig, grace, SIGKILL of the whole tree)
and the caller gets a :class:`JobHeld` that names the limit and the usage,
with HTCondor's hold code (34 out of resources, 47 execute duration).

The disk is measured by a :class:`DiskMeter`: the sandbox's quota group when
the kernel bounds it (carod.sandbox.diskquota; "full" is usage within a small slack
of the limit, as the kernel stops writes just below it), else a walk of the
sandbox's files (over the limit).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from carod.config import SandboxConfig
from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import tree
from carod.sandbox.cgroup import Limits
from carod.units import MIB
from carod.wire.jobad import JobSpec, Request
from carod.wire.replies import ExitInfo


class Watched(Protocol):
    """What :func:`enforce` needs of a running job (carod.sandbox.runner.JobProcess is one)."""

    async def wait(self) -> ExitInfo: ...

    async def stop(self, kill_sig: int, grace_s: float) -> ExitInfo: ...

    def oom_kills(self) -> int: ...

    def peak_memory_kib(self) -> int | None: ...


@dataclass(frozen=True)
class JobLimits:
    memory_mib: float | None
    memory_source: str
    cpus: float
    pids: int
    disk_kib: float | None
    duration_s: float | None
    duration_source: str
    #: where disk_kib came from, for hold reasons
    disk_source: str = "RequestDisk"

    def cgroup(self) -> Limits:
        return Limits(
            memory_bytes=int(self.memory_mib * MIB) if self.memory_mib else None,
            cpus=self.cpus,
            pids=self.pids,
        )

    @property
    def disk_bytes(self) -> int | None:
        return int(self.disk_kib * 1024) if self.disk_kib else None


def limits_for(spec: JobSpec, config: SandboxConfig, request: Request, default_disk_kib: float = 0.0) -> JobLimits:
    """A job is limited to what it reserved (docs/pool.md), plus the node's own caps.

    ``default_disk_kib``: the disk limit of a job without RequestDisk (0: none).
    """
    memory, memory_source = request.memory_mib, request.memory_source
    durations = []
    if spec.allowed_execute_duration_s is not None:
        durations.append((spec.allowed_execute_duration_s, "AllowedExecuteDuration"))
    if config.max_job_duration_s:
        durations.append((config.max_job_duration_s, "[sandbox] max_job_duration_s"))
    duration, duration_source = min(durations) if durations else (None, "")
    if request.disk_kib:
        disk_kib, disk_source = request.disk_kib, f"RequestDisk = {request.disk_kib:.0f} KiB"
    else:
        disk_kib, disk_source = default_disk_kib, "the node's default for a job without RequestDisk"
    return JobLimits(
        memory_mib=memory if memory > 0 else None,
        memory_source=memory_source,
        cpus=request.cpus,
        pids=config.max_job_pids,
        disk_kib=disk_kib or None,
        duration_s=duration,
        duration_source=duration_source,
        disk_source=disk_source,
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
        f"the job exceeded its disk limit of {_mib(limits.disk_bytes or 0)} ({limits.disk_source}){used}",
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
    """Bytes the sandbox takes on disk (carod.sandbox.tree.usage_bytes: allocated blocks, no link followed).

    The job is still running: only directories are opened, without blocking
    and without following a link, and the walk is a loop, not a recursion.
    """
    return tree.usage_bytes(path)


@dataclass(frozen=True)
class DiskMeter:
    """How a running job's disk use is read.

    With ``slack_bytes`` (a quota group: one sysfs read) it is read on the
    loop, also once the job has exited; without (a walk of the files, in a
    thread) only while the job runs.
    """

    used: Callable[[], int]
    #: a usage this close to the limit is "full" (the kernel stopped it); None: only past the limit
    slack_bytes: int | None = None
    #: the limit the kernel enforces is never below this (carod.sandbox.diskquota.kernel_limit_bytes)
    min_limit_bytes: int = 0

    def full(self, used_bytes: int, limit_bytes: int) -> bool:
        if self.slack_bytes is None:
            return used_bytes > limit_bytes
        return used_bytes + self.slack_bytes >= max(limit_bytes, self.min_limit_bytes)


def walk_meter(box: Path) -> DiskMeter:
    return DiskMeter(lambda: disk_usage_bytes(box))


async def enforce(
    process: Watched, limits: JobLimits, disk: DiskMeter, *, interval_s: float, kill_sig: int, grace_s: float
) -> tuple[ExitInfo, JobHeld | None]:
    """Wait for the job; stop it when it exceeds a limit. Returns its exit and the limit it broke.

    A walk of the sandbox (a meter without slack) runs in a thread alongside:
    one at a time, awaited at most ``interval_s`` (or until the wall-clock
    limit) per round, so a tree that takes long to walk never delays the
    wall-clock limit, the memory check or the job's exit by more than that.
    """
    started = time.monotonic()
    held: JobHeld | None = None
    walks = _Walks(limits, disk)
    try:
        while held is None:
            timeout = interval_s
            if limits.duration_s is not None:
                timeout = min(timeout, max(0.0, started + limits.duration_s - time.monotonic()))
            try:
                info = await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                pass
            else:
                held = after_exit(limits, info)
                if held is None and disk.slack_bytes is not None:
                    held = _disk_full(limits, disk)
                return info, held
            elapsed = time.monotonic() - started
            if limits.duration_s is not None and elapsed >= limits.duration_s:
                held = duration_exceeded(limits, elapsed)
            elif process.oom_kills():
                held = memory_exceeded(limits, process.peak_memory_kib())
            elif disk.slack_bytes is not None:
                held = _disk_full(limits, disk)
            else:
                wait_s = interval_s
                if limits.duration_s is not None:
                    wait_s = min(wait_s, max(0.0, started + limits.duration_s - time.monotonic()))
                held = await walks.held(wait_s)
    finally:
        walks.cancel()
    info = await process.stop(kill_sig, grace_s)
    return info, held


def _disk_full(limits: JobLimits, disk: DiskMeter) -> JobHeld | None:
    """Held when the sandbox is at (quota) or past (walk) its disk limit: a quick read, on the loop."""
    if limits.disk_bytes is None:
        return None
    try:
        used = disk.used()
    except OSError:
        return None
    return disk_exceeded(limits, used) if disk.full(used, limits.disk_bytes) else None


class _Walks:
    """The walks of one job's sandbox (in threads): one at a time, never waited for longer than asked."""

    def __init__(self, limits: JobLimits, disk: DiskMeter) -> None:
        self.limits = limits
        self.disk = disk
        self.walk: asyncio.Task[int] | None = None

    async def held(self, wait_s: float) -> JobHeld | None:
        """Held when the last walk found the sandbox past its limit; None also while a walk is still going."""
        if self.limits.disk_bytes is None:
            return None
        if self.walk is None:
            self.walk = asyncio.create_task(asyncio.to_thread(self.disk.used))
        done, _ = await asyncio.wait({self.walk}, timeout=wait_s)
        if not done:
            return None  # still walking: the job is watched meanwhile, the walk goes on
        walk, self.walk = self.walk, None
        try:
            used = walk.result()
        except OSError:
            return None  # (the tree changed under the walk: the next one decides)
        return disk_exceeded(self.limits, used) if self.disk.full(used, self.limits.disk_bytes) else None

    def cancel(self) -> None:
        """The job is over: a walk still going in its thread is no longer waited for."""
        if self.walk is not None:
            self.walk.cancel()
            self.walk = None
