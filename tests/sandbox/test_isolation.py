"""carod.sandbox.isolation: the command chain a job starts through, and the probe's verdict on the layers
(no broker, no jobs); the root side of the chain runs with a fixed environment (issue 14)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from carod.sandbox import isolation
from carod.sandbox.isolation import Layers
from carod.sandbox.users import JobUser

USER = JobUser("nobody", 65534, 65534, switch=True)


BOX = Path("/srv/carod/sandboxes/job.1234")


# ---------------------------------------------------------------- the command chain


def layers(*, bwrap: bool, network: str = "none") -> Layers:
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


def test_chain_with_network_host_keeps_the_host_network() -> None:
    argv = isolation.command(layers(bwrap=True, network="host"), USER, BOX, ["/bin/true"], {})
    assert "--unshare-net" not in argv and "/run" not in argv
    assert layers(bwrap=True, network="host").network_policy == "host"


@pytest.mark.parametrize("policy", ["none", "outbound", "services"])
def test_chain_of_every_other_policy_has_a_network_namespace_of_its_own(policy: str) -> None:
    """outbound and services get slirp4netns attached to that namespace (carod.sandbox.network), never the host's."""
    argv = isolation.command(layers(bwrap=True, network=policy), USER, BOX, ["/bin/true"], {})
    assert "--unshare-net" in argv
    assert argv[argv.index("/run") - 1] == "--tmpfs"  # local services' unix sockets stay hidden
    assert layers(bwrap=True, network=policy).network_policy == policy


def test_without_bwrap_jobs_share_the_host_network_and_the_ad_says_so() -> None:
    assert layers(bwrap=False, network="none").network_policy == "host"


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


# ---------------------------------------------------------------- the probe


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


async def test_root_chain_runs_with_a_fixed_environment_in_root() -> None:
    """The job's variables and directory are arguments of env, after setpriv's last ``--``."""
    layers = isolation.Layers(
        bwrap="/usr/bin/bwrap",
        cgroups=None,
        network="none",
        tmp_bytes=1024,
        hidden=(),
        setpriv="/usr/bin/setpriv",
    )
    from carod.sandbox.users import JobUser

    user = JobUser("nobody", 65534, 65534, switch=True)
    box = Path("/srv/box")
    argv = isolation.command(layers, user, box, ["/bin/true"], {"LD_PRELOAD": "./evil.so", "GCONV_PATH": "."})
    setpriv = argv.index("/usr/bin/setpriv")
    env_stage = argv.index("/usr/bin/env", setpriv)
    assert argv[setpriv:env_stage].count("--") == 1 and argv[env_stage - 1] == "--"
    job_part = ["/usr/bin/env", "-i", "-C", "/srv/box", "--", "LD_PRELOAD=./evil.so", "GCONV_PATH=.", "/bin/true"]
    assert argv[env_stage:] == job_part
    assert "--chdir" not in argv  # bwrap and setpriv run in /, not in the job's directory
    assert set(isolation.ROOT_ENV) == {"PATH", "LC_ALL"} and isolation.ROOT_CWD == "/"
