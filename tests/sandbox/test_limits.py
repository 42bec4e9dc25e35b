"""carod.sandbox.limits: a job's limits from its requests and the node's settings, and what ended it;
the wall-clock limit is enforced while a walk of the job's files is slow (issue 14)."""

from __future__ import annotations

import asyncio
import signal
import threading

from carod.config import SandboxConfig
from carod.holdcodes import HoldCode
from carod.sandbox import limits
from carod.sandbox.limits import JobLimits
from carod.wire import jobad
from carod.wire.classads import ad_from_headers
from carod.wire.jobad import Request
from carod.wire.replies import ExitInfo


def spec(**attrs: str) -> jobad.JobSpec:
    ad = ad_from_headers({"Cmd": '"/bin/true"', **attrs})
    return jobad.job_spec(ad)


def limits_of(job: jobad.JobSpec, config: SandboxConfig, default_memory_mib: int = 128) -> limits.JobLimits:
    return limits.limits_for(job, config, Request.for_job(job, default_memory_mib))


def test_limits_from_the_jobs_requests() -> None:
    job = spec(RequestMemory="512", RequestCpus="2", RequestDisk="2048", AllowedExecuteDuration="60")
    got = limits_of(job, SandboxConfig(max_job_pids=100))
    assert got.memory_mib == 512 and got.memory_source == "RequestMemory"
    assert got.cpus == 2 and got.pids == 100
    assert got.disk_bytes == 2048 * 1024
    assert got.duration_s == 60 and got.duration_source == "AllowedExecuteDuration"
    assert got.cgroup().memory_bytes == 512 * 1024 * 1024


def test_limits_defaults_without_requests_are_what_the_job_reserves() -> None:
    got = limits_of(spec(), SandboxConfig(), default_memory_mib=256)
    assert got.memory_mib == 256
    assert got.memory_source == "the node's default RequestMemory, [node] default_request_memory_mib"
    assert got.cpus == 1 and got.disk_bytes is None
    # issue 14: a job is ended after a day by default
    assert (got.duration_s, got.duration_source) == (86400, "[sandbox] max_job_duration_s")


def test_a_job_without_request_disk_gets_the_nodes_default_disk_limit() -> None:
    job = spec()
    got = limits.limits_for(job, SandboxConfig(), Request.for_job(job, 128), default_disk_kib=65536)
    assert got.disk_bytes == 64 * 1024 * 1024
    assert got.disk_source == "the node's default for a job without RequestDisk"


def test_node_maximum_duration_wins_when_shorter() -> None:
    shorter = limits_of(spec(AllowedExecuteDuration="600"), SandboxConfig(max_job_duration_s=60))
    assert (shorter.duration_s, shorter.duration_source) == (60, "[sandbox] max_job_duration_s")
    longer = limits_of(spec(AllowedExecuteDuration="6"), SandboxConfig(max_job_duration_s=60))
    assert (longer.duration_s, longer.duration_source) == (6, "AllowedExecuteDuration")


def info(**kwargs: object) -> ExitInfo:
    base: dict[str, object] = {
        "exit_code": None,
        "exit_signal": None,
        "duration_s": 1.0,
        "user_cpu_s": 0.0,
        "sys_cpu_s": 0.0,
        "max_rss_kib": 65536,
    }
    base.update(kwargs)
    return ExitInfo(**base)  # type: ignore[arg-type]


def test_exit_by_sigxfsz_with_a_disk_request_is_the_disk_limit() -> None:
    job = limits_of(spec(RequestDisk="1024"), SandboxConfig())
    held = limits.after_exit(job, info(exit_signal=signal.SIGXFSZ))
    assert held is not None and held.code == 34 and "disk limit of 1.0 MiB" in held.reason
    assert limits.after_exit(job, info(exit_code=0)) is None


def test_an_oom_kill_is_the_memory_limit() -> None:
    job = limits_of(spec(RequestMemory="64"), SandboxConfig())
    held = limits.after_exit(job, info(exit_signal=9, oom_kills=1))
    assert held is not None and held.code == 34
    assert "memory limit of 64.0 MiB (RequestMemory)" in held.reason and "peak usage 64.0 MiB" in held.reason


# ---------------------------------------------------------------- enforce (issue 14)


class _SleepingJob:
    """Stands in for a JobProcess that never ends by itself (enforce's view of it)."""

    def __init__(self) -> None:
        self.stopped = asyncio.Event()
        self.info = ExitInfo(
            exit_code=None, exit_signal=9, duration_s=0.0, user_cpu_s=0.0, sys_cpu_s=0.0, max_rss_kib=0
        )

    async def wait(self) -> ExitInfo:
        await self.stopped.wait()
        return self.info

    def oom_kills(self) -> int:
        return 0

    def peak_memory_kib(self) -> int | None:
        return None

    async def stop(self, kill_sig: int, grace_s: float) -> ExitInfo:
        self.stopped.set()
        return self.info


async def test_a_slow_walk_does_not_delay_the_wall_clock_limit() -> None:
    """A walk that takes long (a huge tree) no longer holds up enforce: the wall-clock limit fires on time."""
    release = threading.Event()
    walked = threading.Event()

    def slow_walk() -> int:
        walked.set()
        release.wait(60)
        return 0

    job_limits = JobLimits(
        memory_mib=None,
        memory_source="",
        cpus=1.0,
        pids=100,
        disk_kib=1024.0,
        duration_s=1.0,
        duration_source="AllowedExecuteDuration",
    )
    process = _SleepingJob()
    try:
        async with asyncio.timeout(20):
            info, held = await limits.enforce(
                process,  # type: ignore[arg-type]
                job_limits,
                limits.DiskMeter(slow_walk),
                interval_s=0.1,
                kill_sig=15,
                grace_s=1.0,
            )
    finally:
        release.set()
    assert walked.is_set()  # the walk did start, and was still going
    assert held is not None and held.code == HoldCode.JOB_EXECUTE_EXCEEDED, held
    assert "past its wall-clock limit of 1 s (AllowedExecuteDuration)" in held.reason
    assert info is process.info
