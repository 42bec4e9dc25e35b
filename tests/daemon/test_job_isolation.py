"""Adversarial jobs through a real carod on the real broker (issue 4: the sandbox).

Each job tries to hurt something outside itself or to outgrow a limit; each is
blocked or ended with the right reply, and the node serves the next job.
A test that needs a layer the host cannot offer skips with the reason.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import struct
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from carod.errors import StartupError
from carod.units import MIB
from tests.helpers import (
    CAROD,
    Reply,
    RunningNode,
    Submitter,
    processes_with,
    q,
    raw_zip,
    sandbox_of,
    start_node,
    write_config,
)

SEED = {"Cmd": q("/bin/echo"), "Arguments": q("Hello Grid!"), "Out": q("job.out")}

#: Short checks and grace so that limit tests take seconds.
FAST = {"check_interval_s": 0.2, "max_job_pids": 64}
SLOT_USERS = ("carod-test-slot1", "carod-test-slot2")


def sh(script: str, **attrs: Any) -> dict[str, Any]:
    return {"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'"), "Out": q("out"), "Err": q("err"), **attrs}


def out(reply: Reply, name: str = "out") -> str:
    return reply.zip_read(name).decode()


def layers(node: RunningNode) -> Any:
    assert node.server.layers is not None
    return node.server.layers


def need_bwrap(node: RunningNode) -> None:
    if layers(node).bwrap is None:
        pytest.skip("the host has no working bubblewrap (apt install bubblewrap); this layer is off")


def need_controller(node: RunningNode, controller: str) -> None:
    cgroups = layers(node).cgroups
    if cgroups is None or controller not in cgroups.controllers:
        pytest.skip(f"the host gives carod no {controller} cgroup controller; the rlimit fallback is used")


@pytest.fixture
async def boxed(queue: str, base: Path) -> AsyncIterator[RunningNode]:
    """A node with every layer the host has (the default config) and quick limit checks."""
    running = await start_node(queue, base, node={"kill_grace_s": 1}, sandbox=FAST)
    yield running
    await running.stop()


# ---------------------------------------------------------------- credentials


async def test_start_up_says_which_layers_are_active(queue: str, base: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="carod.server")
    node = await start_node(queue, base)
    await node.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sandbox: ")]
    summary = [line for line in lines if "setpriv" in line]
    assert len(summary) == 1, lines
    assert ("bubblewrap (read-only /" in summary[0]) == (layers(node).bwrap is not None)
    assert ("cgroup v" in summary[0]) == (layers(node).cgroups is not None)
    assert "job user nobody (shared by all jobs)" in summary[0]


async def test_job_cannot_read_shadow_or_carods_config(boxed: RunningNode, submitter: Submitter) -> None:
    config = boxed.base / "carod.conf"
    config.write_text("[broker]\nurl = amqp://carod:secret-password@host/\n")
    os.chmod(config, 0o600)
    done = await submitter.run(sh(f"cat /etc/shadow; echo rc=$?; cat {config}; echo rc=$?"))
    assert done[-1].status == 4, done[-1].headers
    text = out(done[-1])
    assert text.split() == ["rc=1", "rc=1"]
    assert "secret-password" not in text and "root:" not in text


async def test_job_cannot_signal_carod(boxed: RunningNode, submitter: Submitter) -> None:
    done = await submitter.run(sh(f"kill -TERM {os.getpid()}; echo rc=$?; kill -KILL {os.getpid()}; echo rc=$?"))
    assert out(done[-1]).split() == ["rc=1", "rc=1"]
    assert (await submitter.run(SEED))[-1].status == 4  # carod (this process) is alive and serving


async def test_job_cannot_write_outside_its_sandbox(boxed: RunningNode, submitter: Submitter) -> None:
    tag = uuid.uuid4().hex
    targets = [f"/carod-escape-{tag}", f"/etc/carod-escape-{tag}", f"{boxed.base}/carod-escape-{tag}"]
    script = "; ".join(f"touch {t}; echo rc=$?" for t in targets) + f"; echo hi > /tmp/carod-escape-{tag}; echo tmp=$?"
    done = await submitter.run(sh(script))
    assert done[-1].status == 4
    lines = out(done[-1]).split()
    assert lines[:3] == ["rc=1", "rc=1", "rc=1"]
    for target in targets:
        assert not os.path.lexists(target)
    if layers(boxed).bwrap is not None:
        assert lines[3] == "tmp=0"  # its private /tmp is writable...
        assert not os.path.lexists(f"/tmp/carod-escape-{tag}")  # ...and is not the host's
    if os.path.lexists(f"/tmp/carod-escape-{tag}"):
        os.unlink(f"/tmp/carod-escape-{tag}")


async def test_job_cannot_touch_another_jobs_sandbox(boxed: RunningNode, submitter: Submitter) -> None:
    need_bwrap(boxed)  # with one shared job user and no bubblewrap, jobs can reach each other (docs/security.md)
    first = await submitter.send(sh("echo secret > mine; sleep 3"))
    await submitter.wait_running(first)
    box = await sandbox_of(boxed.base, first)
    done = await submitter.run(
        sh(f'cat {box}/mine; echo rc=$?; touch {box}/evil; echo rc=$?; ls /proc | grep -c "^[0-9]"')
    )
    lines = out(done[-1]).split()
    assert lines[:2] == ["rc=1", "rc=1"]
    assert not (box / "evil").exists()
    assert int(lines[2]) < 10  # its own /proc: its few processes, not the host's
    assert (await submitter.wait_final(first, 30))[-1].status == 4


# ---------------------------------------------------------------- limits


async def test_fork_without_bound_is_capped_and_ended(boxed: RunningNode, submitter: Submitter) -> None:
    need_controller(boxed, "pids")
    marker = uuid.uuid4().hex[:12]
    script = f'i=0; while [ $i -lt 300 ]; do sh -c "sleep 600" {marker} & i=$((i+1)); done; sleep 600'
    done = await submitter.run(sh(script, AllowedExecuteDuration=5), timeout_s=60)
    final = done[-1]
    # dash gives up at the first fork the pids limit refuses; a shell that kept
    # trying would be ended by AllowedExecuteDuration instead.
    assert final.status == 4 and final.headers["ExitCode"] != 0, final.headers
    assert "fork" in out(final, "err").lower()
    assert processes_with(marker) == []
    assert (await submitter.run(SEED))[-1].status == 4


async def test_memory_past_request_memory_is_held(boxed: RunningNode, submitter: Submitter) -> None:
    need_controller(boxed, "memory")
    grab = "import time; b = bytearray(400 * 1024 * 1024); time.sleep(2)"
    done = await submitter.run(
        {"Cmd": q("/usr/bin/python3"), "Arguments": q(f"-c '{grab}'"), "RequestMemory": 64}, timeout_s=60
    )
    final = done[-1]
    assert final.status == 5, final.headers
    assert final.headers["HoldReasonCode"] == 34
    assert "memory limit of 64.0 MiB (RequestMemory)" in final.headers["HoldReason"]
    assert (await submitter.run(SEED))[-1].status == 4


async def test_one_file_past_request_disk_is_held(boxed: RunningNode, submitter: Submitter) -> None:
    done = await submitter.run(sh("dd if=/dev/zero of=big bs=1M count=50", RequestDisk=10240), timeout_s=60)
    final = done[-1]
    assert final.status == 5, final.headers
    assert final.headers["HoldReasonCode"] == 34
    assert "disk limit of 10.0 MiB (RequestDisk = 10240 KiB)" in final.headers["HoldReason"]


async def test_many_files_past_request_disk_are_held(boxed: RunningNode, submitter: Submitter) -> None:
    script = "i=0; while [ $i -lt 40 ]; do head -c 1000000 /dev/zero > f$i || exit 3; i=$((i+1)); done; sleep 60"
    done = await submitter.run(sh(script, RequestDisk=10240), timeout_s=60)
    final = done[-1]
    assert final.status == 5, final.headers
    assert final.headers["HoldReasonCode"] == 34
    assert "the sandbox held" in final.headers["HoldReason"]


async def test_wall_clock_limit_from_the_job(boxed: RunningNode, submitter: Submitter) -> None:
    started = time.monotonic()
    done = await submitter.run(sh("sleep 60", AllowedExecuteDuration=1), timeout_s=30)
    final = done[-1]
    assert final.status == 5 and final.headers["HoldReasonCode"] == 47, final.headers
    assert "wall-clock limit of 1 s (AllowedExecuteDuration)" in final.headers["HoldReason"]
    assert time.monotonic() - started < 10
    assert (await submitter.run(SEED))[-1].status == 4


async def test_wall_clock_limit_of_the_node(queue: str, base: Path, submitter: Submitter) -> None:
    node = await start_node(queue, base, sandbox={"max_job_duration_s": 1, "check_interval_s": 0.2})
    try:
        done = await submitter.run(sh("sleep 60", AllowedExecuteDuration=100), timeout_s=30)
    finally:
        await node.stop()
    assert done[-1].headers["HoldReasonCode"] == 47
    assert "([sandbox] max_job_duration_s)" in done[-1].headers["HoldReason"]


# ---------------------------------------------------------------- no survivors

ESCAPE = 'setsid sh -c "trap \\"\\" TERM; exec sleep 600" {marker} </dev/null >/dev/null 2>&1 &'


@pytest.fixture(scope="module")
def slot_users() -> Iterator[tuple[str, ...]]:
    """Two dedicated job users, created for these tests and removed after."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("slot users need root and useradd")
    made = []
    for name in SLOT_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True
            )
            made.append(name)
    yield SLOT_USERS
    for name in made:
        subprocess.run(["userdel", name], check=False, capture_output=True)


LAYER_SETS = {
    "default": {},
    "bwrap-only": {"cgroups": "none"},
    "cgroup-v1-only": {"isolation": "none", "cgroups": "v1"},
    "cgroup-v2-only": {"isolation": "none", "cgroups": "v2"},
    "slot-user-sweep-only": {"isolation": "none", "cgroups": "none", "slot_users": ",".join(SLOT_USERS)},
}


@pytest.mark.parametrize("layer_set", list(LAYER_SETS))
async def test_double_fork_into_new_session_ignoring_term_does_not_survive(
    layer_set: str, queue: str, base: Path, submitter: Submitter, request: pytest.FixtureRequest
) -> None:
    settings = dict(LAYER_SETS[layer_set])
    if "slot_users" in settings:
        request.getfixturevalue("slot_users")
    try:
        node = await start_node(queue, base, node={"kill_grace_s": 1}, sandbox={**FAST, **settings})
    except StartupError as exc:  # a layer this host does not have
        if "cgroup" in str(exc) or "bwrap" in str(exc):
            pytest.skip(f"{layer_set}: not on this host ({exc})")
        raise
    try:
        if layer_set == "bwrap-only":
            need_bwrap(node)
        left = uuid.uuid4().hex[:12]
        exited = await submitter.run(sh(ESCAPE.format(marker=left) + " echo started"))
        assert exited[-1].status == 4 and out(exited[-1]).strip() == "started"
        assert processes_with(left) == [], f"{layer_set}: a process that left the job's session survived it"

        stopped = uuid.uuid4().hex[:12]
        script = 'trap "" TERM; ' + ESCAPE.format(marker=stopped) + " sleep 600"
        t0 = time.monotonic()
        held = await submitter.run(sh(script, AllowedExecuteDuration=1), timeout_s=30)
        assert held[-1].headers["HoldReasonCode"] == 47
        assert time.monotonic() - t0 >= 1.9  # KillSig ignored: SIGKILL came after the grace period
        assert processes_with(stopped) == [], f"{layer_set}: a job that ignored SIGTERM survived its limit"
        assert (await submitter.run(SEED))[-1].status == 4
    finally:
        await node.stop()


async def test_slot_users_keep_concurrent_jobs_apart(
    slot_users: tuple[str, ...], queue: str, base: Path, submitter: Submitter
) -> None:
    node = await start_node(
        queue, base, node={"slots": 2}, sandbox={"isolation": "none", "slot_users": ",".join(slot_users)}
    )
    try:
        victim = await submitter.send(sh("id -un; sleep 3; echo survived", Environment=q("SECRET=carod-xyzzy")))
        await submitter.wait_running(victim)
        script = (
            'id -un; for p in /proc/[0-9]*; do cat $p/environ 2>/dev/null; done | tr "\\\\0" "\\\\n" '
            "| grep -c carod-xyzzy; kill -9 -1"
        )
        attacker = await submitter.run(sh(script))
        victim_done = (await submitter.wait_final(victim, 30))[-1]
    finally:
        await node.stop()
    attacker_lines = out(attacker[-1]).split()
    assert attacker_lines[1] == "0"  # read no other job's environment
    assert attacker[-1].status == 4  # kill -9 -1 reached only its own processes (never the caller)
    victim_lines = out(victim_done).split()
    assert victim_done.status == 4 and victim_lines[-1] == "survived"
    assert {victim_lines[0], attacker_lines[0]} == set(slot_users)


# ---------------------------------------------------------------- results


async def test_result_zip_skips_links_fifos_and_devices(boxed: RunningNode, submitter: Submitter) -> None:
    script = "ln -s /etc/shadow shadow; mkfifo fifo; ln -s /dev/zero zero; mkdir d; ln -s /etc d/etc; echo ok > real"
    done = await submitter.run(sh(script, Out=q("real"), Err=q("/dev/null")))
    final = done[-1]
    assert final.status == 4, final.headers
    assert final.zip_names() == ["real"]
    assert final.headers["SkippedOutputCount"] == 4
    assert set(final.headers["SkippedOutput"].strip('"').split(", ")) == {"d/etc", "fifo", "shadow", "zero"}


async def test_ten_gigabyte_sparse_file_is_held_without_reading_it(boxed: RunningNode, submitter: Submitter) -> None:
    started = time.monotonic()
    done = await submitter.run(sh("truncate -s 10G sparse"), timeout_s=30)
    assert done[-1].status == 5 and done[-1].headers["HoldReasonCode"] == 33, done[-1].headers
    assert time.monotonic() - started < 10
    assert (await submitter.run(SEED))[-1].status == 4


# ---------------------------------------------------------------- input zips


def overlapping_zip(copies: int, size: int) -> bytes:
    """CVE-2024-0450's trick: many central-directory entries pointing at one compressed member."""
    raw = raw_zip(("a", b"\0" * size, 0o100644), compression=zipfile.ZIP_DEFLATED)
    eocd = raw.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", raw[eocd + 12 : eocd + 20])
    entry = raw[cd_offset : cd_offset + cd_size]
    directory = entry * copies
    end = bytearray(raw[eocd:])
    struct.pack_into("<HHII", end, 8, copies, copies, len(directory), cd_offset)
    return raw[:cd_offset] + directory + bytes(end)


BAD_ZIPS = {
    "zip-slip": (raw_zip(("../../evil", b"x", 0o100644)), 13, "unsafe name"),
    "absolute": (raw_zip(("/tmp/evil", b"x", 0o100644)), 13, "unsafe name"),
    "symlink": (raw_zip(("evil", b"/etc/shadow", 0o120777)), 13, "symbolic link"),
    "bomb": (raw_zip(("zeros", b"\0" * (64 * MIB), 0o100644), compression=zipfile.ZIP_DEFLATED), 32, "limit of 16 MiB"),
    "overlapping": (overlapping_zip(200, 2 * MIB), 13, "twice"),
}


@pytest.mark.parametrize("kind", list(BAD_ZIPS))
async def test_bad_input_zip_is_held_and_writes_nothing_outside(
    kind: str, queue: str, base: Path, submitter: Submitter
) -> None:
    body, code, reason = BAD_ZIPS[kind]
    node = await start_node(queue, base, node={"max_input_mib": 16})
    try:
        done = await submitter.run({"Cmd": q("/bin/true")}, body=body)
        following = await submitter.run(SEED)
    finally:
        await node.stop()
    assert done[-1].status == 5 and done[-1].headers["HoldReasonCode"] == code, done[-1].headers
    assert reason in done[-1].headers["HoldReason"]
    assert following[-1].status == 4
    assert not os.path.lexists("/tmp/evil")
    assert [p for p in base.rglob("evil")] == []


# ---------------------------------------------------------------- start-up


async def test_isolation_bwrap_required_but_missing_exits_78(base: Path, queue: str) -> None:
    bin_dir = base / "bin"
    bin_dir.mkdir()
    for tool in ("setpriv", "sh"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    config = write_config(base, queue, sandbox={"isolation": "bwrap"})
    proc = await asyncio.create_subprocess_exec(
        *CAROD,
        "--config",
        str(config),
        stderr=subprocess.PIPE,
        env={"PATH": str(bin_dir), "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 78, err.decode()
    assert "[sandbox] isolation = bwrap: bwrap is not installed" in err.decode()
