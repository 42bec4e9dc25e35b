"""Reply messages: what the submitter sees, as header dicts. Pure, no I/O.

Every reply carries ``JobStatus``, ``JobState``, ``Sequence`` (1, 2, ... per
job and attempt), ``RemoteHost`` and ``EnteredCurrentStatus``. Values follow
the job-header convention (see :mod:`carod.classads`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from carod.classads import Scalar, format_headers
from carod.holdcodes import HoldCode


class JobStatus(enum.IntEnum):
    IDLE = 1
    RUNNING = 2
    REMOVED = 3
    COMPLETED = 4
    HELD = 5


STATE_NAMES = {
    JobStatus.IDLE: "Idle",
    JobStatus.RUNNING: "Running",
    JobStatus.REMOVED: "Removed",
    JobStatus.COMPLETED: "Exited",
    JobStatus.HELD: "Held",
}


@dataclass(frozen=True)
class Reply:
    """One reply: its headers and, for a final reply, the result zip on disk."""

    status: JobStatus
    headers: dict[str, Scalar]
    body_path: Path | None = None

    @property
    def final(self) -> bool:
        return self.status in (JobStatus.COMPLETED, JobStatus.HELD, JobStatus.REMOVED)


@dataclass(frozen=True)
class ExitInfo:
    """How the job's process ended and what it used."""

    exit_code: int | None
    exit_signal: int | None
    duration_s: float
    user_cpu_s: float
    sys_cpu_s: float
    #: Peak memory (KiB): of the whole job from its cgroup, else the largest process's.
    max_rss_kib: int
    #: Processes of the job the kernel's OOM killer killed (cgroup memory limit).
    oom_kills: int = 0

    @property
    def by_signal(self) -> bool:
        return self.exit_signal is not None


def _common(status: JobStatus, sequence: int, node: str, now: float, run_count: int) -> dict[str, Scalar]:
    return {
        "JobStatus": int(status),
        "JobState": STATE_NAMES[status],
        "Sequence": sequence,
        "RemoteHost": node,
        "EnteredCurrentStatus": int(now),
        "JobRunCount": run_count,
    }


def running(*, sequence: int, node: str, now: float, start_date: float, pid: int, run_count: int = 1) -> Reply:
    attrs = _common(JobStatus.RUNNING, sequence, node, now, run_count)
    attrs.update({"JobStartDate": int(start_date), "JobPid": pid})
    return Reply(JobStatus.RUNNING, format_headers(attrs))


@dataclass(frozen=True)
class Usage:
    """What a running job uses now."""

    wall_s: float
    user_cpu_s: float
    sys_cpu_s: float
    #: memory in use now and the most so far (KiB)
    memory_kib: int
    peak_memory_kib: int
    pids: int


def update(*, sequence: int, node: str, start_date: float, pid: int, usage: Usage, run_count: int) -> Reply:
    """A JobStatus 2 update while the job runs (its status has not changed since start_date)."""
    attrs = _common(JobStatus.RUNNING, sequence, node, start_date, run_count)
    attrs.update(
        {
            "JobStartDate": int(start_date),
            "JobPid": pid,
            "NumPids": usage.pids,
            "RemoteWallClockTime": round(usage.wall_s, 6),
            "RemoteUserCpu": round(usage.user_cpu_s, 6),
            "RemoteSysCpu": round(usage.sys_cpu_s, 6),
            "ResidentSetSize": usage.memory_kib,
            "ImageSize": usage.peak_memory_kib,
        }
    )
    return Reply(JobStatus.RUNNING, format_headers(attrs))


#: Headers of a live-output message (not a reply: no JobStatus).
STREAM_HEADER = "x-carod-stream"
OFFSET_HEADER = "x-carod-offset"
SKIPPED_HEADER = "x-carod-skipped"
OUTPUT_TYPE = "carod.output"


def output_headers(stream: str, offset: int, skipped: int) -> dict[str, Scalar]:
    """A chunk of live output: which stream, where in the file it starts, bytes left out just before it."""
    return {STREAM_HEADER: stream, OFFSET_HEADER: offset, SKIPPED_HEADER: skipped}


def _exit_attrs(info: ExitInfo) -> dict[str, Scalar]:
    attrs: dict[str, Scalar] = {
        "ExitBySignal": info.by_signal,
        "JobDuration": round(info.duration_s, 6),
        "RemoteWallClockTime": round(info.duration_s, 6),
        "RemoteUserCpu": round(info.user_cpu_s, 6),
        "RemoteSysCpu": round(info.sys_cpu_s, 6),
        "ResidentSetSize": info.max_rss_kib,
        "ImageSize": info.max_rss_kib,
    }
    if info.exit_signal is not None:
        attrs["ExitSignal"] = info.exit_signal
    if info.exit_code is not None:
        attrs["ExitCode"] = info.exit_code
    return attrs


#: At most this many skipped names are listed in a reply.
MAX_SKIPPED_LISTED = 100


def exited(
    *,
    sequence: int,
    node: str,
    now: float,
    info: ExitInfo,
    body_path: Path | None,
    run_count: int = 1,
    skipped: tuple[str, ...] = (),
) -> Reply:
    attrs = _common(JobStatus.COMPLETED, sequence, node, now, run_count)
    attrs.update(_exit_attrs(info))
    attrs["CompletionDate"] = int(now)
    if skipped:
        # Not in the zip: links, FIFOs, devices, files of another user, undecodable names.
        attrs["SkippedOutputCount"] = len(skipped)
        attrs["SkippedOutput"] = ", ".join(skipped[:MAX_SKIPPED_LISTED])
    return Reply(JobStatus.COMPLETED, format_headers(attrs), body_path)


def held(
    *,
    sequence: int,
    node: str,
    now: float,
    reason: str,
    code: HoldCode,
    subcode: int = 0,
    info: ExitInfo | None = None,
    body_path: Path | None = None,
    run_count: int = 0,
) -> Reply:
    attrs = _common(JobStatus.HELD, sequence, node, now, run_count)
    attrs.update({"HoldReason": reason, "HoldReasonCode": int(code), "HoldReasonSubCode": subcode})
    if info is not None:
        attrs.update(_exit_attrs(info))
    return Reply(JobStatus.HELD, format_headers(attrs), body_path)


def removed(*, sequence: int, node: str, now: float, reason: str, info: ExitInfo | None, run_count: int) -> Reply:
    """The job was removed (``carod rm``); it will not run again."""
    attrs = _common(JobStatus.REMOVED, sequence, node, now, run_count)
    attrs["RemoveReason"] = reason
    if info is not None:
        attrs.update(_exit_attrs(info))
    return Reply(JobStatus.REMOVED, format_headers(attrs))


def idle(*, sequence: int, node: str, now: float, reason: str, run_count: int) -> Reply:
    """The job was evicted from this node and goes back to the queue."""
    attrs = _common(JobStatus.IDLE, sequence, node, now, run_count)
    attrs["LastVacateReason"] = reason
    return Reply(JobStatus.IDLE, format_headers(attrs))
