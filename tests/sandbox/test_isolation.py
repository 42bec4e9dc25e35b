"""The sandbox's pure parts: the command chain, the probe's verdict, the limits (no broker, no jobs)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from carod import config as configuration
from carod.config import SandboxConfig
from carod.errors import ConfigError, JobHeld
from carod.sandbox import isolation, limits
from carod.sandbox.isolation import Layers
from carod.sandbox.users import JobUser
from carod.wire import jobad
from carod.wire.classads import ad_from_headers
from carod.wire.jobad import Request
from carod.wire.replies import ExitInfo

USER = JobUser("nobody", 65534, 65534, switch=True)
BOX = Path("/srv/carod/sandboxes/job.1234")


def layers(*, bwrap: bool, network: bool = False) -> Layers:
    return Layers(
        bwrap="/usr/bin/bwrap" if bwrap else None,
        cgroups=None,
        network=network,
        tmp_bytes=64 * 1024 * 1024,
        hidden=(Path("/srv/carod"), Path("/srv/carod/sandboxes")),
        setpriv="/usr/bin/setpriv",
    )


def test_chain_without_bwrap_is_gate_then_setpriv_then_the_job() -> None:
    argv = isolation.command(layers(bwrap=False), USER, BOX, ["/bin/echo", "hi"], {})
    assert argv[:4] == ["/bin/sh", "-c", isolation.GATE_SCRIPT, "carod-gate"]
    setpriv = argv[4:]
    assert setpriv[0] == "/usr/bin/setpriv"
    for flag in ("--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs", "--bounding-set=-all"):
        assert flag in setpriv
    assert setpriv[-3:] == ["--", "/bin/echo", "hi"]


def test_chain_with_bwrap_isolates_and_hides_carods_state() -> None:
    argv = isolation.command(layers(bwrap=True), USER, BOX, ["/bin/true"], {})
    bwrap = argv[argv.index("/usr/bin/bwrap") : argv.index("/usr/bin/setpriv")]
    assert bwrap[1:4] == ["--ro-bind", "/", "/"]
    for flag in ("--unshare-pid", "--unshare-ipc", "--unshare-net", "--die-with-parent"):
        assert flag in bwrap
    text = " ".join(bwrap)
    assert "--size 67108864 --tmpfs /tmp" in text and "--size 67108864 --tmpfs /dev/shm" in text
    assert "--tmpfs /srv/carod --tmpfs /srv/carod/sandboxes" in text
    assert f"--bind {BOX} {BOX}" in text
    assert text.index("--tmpfs /srv/carod/sandboxes") < text.index("--bind")  # the box is mounted over the mask
    assert "--unshare-user" not in bwrap  # as root it would map the job to host root


def test_chain_with_network_allowed_keeps_the_host_network() -> None:
    argv = isolation.command(layers(bwrap=True, network=True), USER, BOX, ["/bin/true"], {})
    assert "--unshare-net" not in argv and "/run" not in argv


def test_chain_when_carod_is_the_job_user_only_sets_no_new_privs() -> None:
    me = JobUser("me", os.getuid(), os.getgid(), switch=False)
    argv = isolation.command(layers(bwrap=False), me, BOX, ["/bin/true"], {})
    assert argv[4:] == [
        "/usr/bin/setpriv",
        "--no-new-privs",
        "--",
        "/usr/bin/env",
        "-i",
        "-C",
        str(BOX),
        "--",
        "/bin/true",
    ]


GOOD_PROBE = """Name:\tcat
Uid:\t65534\t65534\t65534\t65534
Gid:\t65534\t65534\t65534\t65534
Groups:\t
CapEff:\t0000000000000000
NoNewPrivs:\t1
ns-pid pid:[1]
ns-net net:[2]
"""


def test_probe_that_shows_every_layer_holding_has_no_problems() -> None:
    assert isolation.probe_problems(GOOD_PROBE, USER, layers(bwrap=True)) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (("Uid:\t65534\t65534\t65534\t65534", "Uid:\t0\t0\t0\t0"), "uids"),
        (("Groups:\t", "Groups:\t6 42"), "supplementary groups"),
        (("NoNewPrivs:\t1", "NoNewPrivs:\t0"), "no_new_privs"),
        (("CapEff:\t0000000000000000", "CapEff:\t000001ffffffffff"), "capabilities"),
        (("ns-pid pid:[1]", f"ns-pid {os.readlink('/proc/self/ns/pid')}"), "PID namespace"),
        (("ns-net net:[2]", "ns-net net:[2]\nroot-writable"), "write to /usr"),
    ],
)
def test_probe_problems_are_named(change: tuple[str, str], problem: str) -> None:
    output = GOOD_PROBE.replace(*change)
    problems = isolation.probe_problems(output, USER, layers(bwrap=True))
    assert any(problem in p for p in problems), problems


def test_empty_probe_output_is_a_problem() -> None:
    assert isolation.probe_problems("", USER, layers(bwrap=False)) == ["the probe job printed nothing"]


# ---------------------------------------------------------------- limits


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


@pytest.mark.parametrize(
    ("attr", "value"),
    [("RequestMemory", '"lots"'), ("RequestCpus", "0"), ("RequestDisk", "-1"), ("AllowedExecuteDuration", "TRUE")],
)
def test_bad_requests_are_held_naming_the_attribute(attr: str, value: str) -> None:
    with pytest.raises(JobHeld, match=attr):
        spec(**{attr: value})


# ---------------------------------------------------------------- [sandbox] config


def test_sandbox_section_parses() -> None:
    cfg = configuration.parse(
        "[node]\nslots = 2\n[sandbox]\nisolation = none\ncgroups = v1\nnetwork = yes\n"
        "slot_users = carod1, carod2\nmax_job_duration_s = 3600\n",
        environ={},
    )
    assert cfg.sandbox.isolation == "none" and cfg.sandbox.cgroups == "v1" and cfg.sandbox.network is True
    assert cfg.sandbox.slot_users == ("carod1", "carod2")
    assert "slot_users = carod1, carod2" in configuration.effective(cfg)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[sandbox]\nisolation = docker\n", "[sandbox] isolation"),
        ("[sandbox]\ncgroups = v3\n", "[sandbox] cgroups"),
        ("[sandbox]\nnetwork = maybe\n", "[sandbox] network"),
        ("[sandbox]\ntmp_mib = 0\n", "[sandbox] tmp_mib"),
        ("[sandbox]\nmax_job_duration_s = -1\n", "[sandbox] max_job_duration_s"),
        ("[sandbox]\nslot_users = a, root\n", "[sandbox] slot_users"),
        ("[sandbox]\nslot_users = a, a\n", "[sandbox] slot_users"),
        ("[node]\nslots = 3\n[sandbox]\nslot_users = a, b\n", "[sandbox] slot_users"),
        ("[sandbox]\nbogus = 1\n", "[sandbox] bogus"),
    ],
)
def test_bad_sandbox_settings_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        configuration.parse(text, environ={})
