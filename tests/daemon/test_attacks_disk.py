"""Issue 14, "disk and time are unbounded by default": each attack against a real carod.

With the kernel's bound (carod/sandbox/diskquota.py: a btrfs image with a quota
group per sandbox) a job cannot put more than its limit on the node's disk,
whether it asked for a limit or not, and however it hides the data; a job
that leaves too many files is Held before its results are walked; a job that
never ends is ended by the node's default wall-clock limit. After each, the
node serves the seed job, and carod restarts cleanly.

The host must offer the kernel's bound (root, loop devices, btrfs with simple
quotas, mkfs.btrfs): these tests run the nodes with ``disk_quota = required``,
so a host without it fails them rather than passing on the fallback.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from carod import config as configuration
from carod.sandbox import diskquota
from carod.units import MIB
from tests.helpers import (
    CAROD,
    SEED,
    Reply,
    RunningNode,
    Submitter,
    job_sandboxes,
    processes_with,
    q,
    raw_zip,
    sandbox_of,
    seed_runs,
    start_daemon,
    start_node,
    write_config,
)

#: A small image keeps the tests' sparse files small; the limits below fit it many times.
IMAGE_MIB = 2048


DISK = {"disk_quota": "required", "disk_image_mib": IMAGE_MIB, "check_interval_s": 0.2}


PY = "/usr/bin/python3"


def sh(script: str, **attrs: Any) -> dict[str, Any]:
    return {"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'"), "Out": q("out"), "Err": q("err"), **attrs}


def script_job(source: str, **attrs: Any) -> tuple[dict[str, Any], bytes]:
    """A Python job: the script travels in the input zip."""
    return {"Cmd": q(PY), "Arguments": q("attack.py"), "Out": q("out"), "Err": q("err"), **attrs}, raw_zip(
        ("attack.py", source.encode(), 0o100644)
    )


def held_mib(reply: Reply) -> float:
    found = re.search(r"the sandbox held ([0-9.]+) MiB", reply.headers["HoldReason"])
    assert found is not None, reply.headers
    return float(found.group(1))


def image_allocated_bytes(node: RunningNode) -> int:
    """What the sandboxes' image takes on the state directory's disk now."""
    return os.stat(node.base / "state" / diskquota.IMAGE_NAME).st_blocks * 512


async def until(predicate: Any, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.05)


@pytest.fixture
async def disk_node(queue: str, base: Path) -> AsyncIterator[RunningNode]:
    """A node whose sandboxes must be bounded by the kernel, with a 64 MiB default per job."""
    running = await start_node(queue, base, node={"kill_grace_s": 1}, sandbox={**DISK, "default_disk_mib": 64})
    assert running.server.quota is not None
    yield running
    await running.stop()


async def test_a_job_without_request_disk_is_cut_at_the_node_default(
    queue: str, base: Path, submitter: Submitter
) -> None:
    """3 GB in seconds onto the journal's disk, before: now the kernel stops the write at 64 MiB."""
    # No periodic check during the run: the kernel stops the write, the check at the end holds the job.
    disk_node = await start_node(queue, base, sandbox={**DISK, "default_disk_mib": 64, "check_interval_s": 3600})
    try:
        await _cut_at_the_node_default(disk_node, submitter)
    finally:
        await disk_node.stop()


async def _cut_at_the_node_default(disk_node: RunningNode, submitter: Submitter) -> None:
    before = image_allocated_bytes(disk_node)
    tag = os.urandom(6).hex()
    # Once the sandbox is full nothing more can be written in it (not even an error message, not by root):
    # dd's exit status becomes the job's; its cmdline (the file name, spelt in two halves in
    # the shell's own cmdline) tells the test when dd is done.
    script = (
        "touch stay; "
        f'dd if=/dev/zero of=big-"{tag[:6]}""{tag[6:]}" bs=1M count=3000 2>/dev/null; rc=$?; '
        "while [ -e stay ]; do sleep 0.05; done; exit $rc"
    )
    mid = await submitter.send(sh(script))
    await submitter.wait_running(mid)
    box = await sandbox_of(disk_node.base, mid)
    big = box / f"big-{tag}"
    await until(lambda: big.exists() and not processes_with(tag))
    # Seen from the host while the job still holds it: the file was cut by the kernel at the limit...
    assert big.stat().st_size <= 64 * MIB
    # ...and the state directory's disk got no more than that (plus the image's own metadata).
    assert image_allocated_bytes(disk_node) - before <= 64 * MIB + 16 * MIB
    (box / "stay").unlink()  # (even root cannot create a file there now)
    final = (await submitter.wait_final(mid, 60))[-1]
    assert final.status == 5, final.headers
    assert final.headers["HoldReasonCode"] == 34
    assert final.headers["ExitCode"] == 1  # dd failed: "Disk quota exceeded"
    reason = final.headers["HoldReason"]
    assert "disk limit of 64.0 MiB (the node's default for a job without RequestDisk)" in reason, reason
    assert held_mib(final) <= 64.0
    await seed_runs(submitter)


ORPHANS = """
import os, sys, time
held, error = 0, ""
fds = []
for i in range(20):
    fd = os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600)
    os.unlink(f"f{i}")
    fds.append(fd)
    try:
        for _ in range(45):
            os.write(fd, bytes(1 << 20))
    except OSError as exc:
        error = exc.strerror
        break
    held += 1
print("held", held, "error", error, flush=True)
open("reported", "w").close()
time.sleep(120)
"""


async def test_unlinked_open_files_count_and_are_stopped(disk_node: RunningNode, submitter: Submitter) -> None:
    """20 x 45 MiB unlinked but open against RequestDisk = 50 MiB: no longer invisible to the limit."""
    headers, body = script_job(ORPHANS, RequestDisk=50 * 1024)
    done = await submitter.run(headers, body=body, timeout_s=60)
    final = done[-1]
    assert final.status == 5, final.headers
    assert final.headers["HoldReasonCode"] == 34
    assert "disk limit of 50.0 MiB (RequestDisk = 51200 KiB)" in final.headers["HoldReason"]
    assert 45.0 <= held_mib(final) <= 50.0  # counted although no name points at it, and not one byte more
    await seed_runs(submitter)


FAST_WRITER = """
import os, threading
def write(n):
    try:
        with open(f"w{n}", "wb") as f:
            while True:
                f.write(bytes(4 << 20))
    except OSError:
        pass
threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
for t in threads: t.start()
for t in threads: t.join()
import time; time.sleep(120)
"""


async def test_a_fast_writer_cannot_overshoot(queue: str, base: Path, submitter: Submitter) -> None:
    """Four writers at full speed with a slow periodic check: the kernel, not the check, bounds them."""
    node = await start_node(queue, base, sandbox={**DISK, "check_interval_s": 2})
    try:
        headers, body = script_job(FAST_WRITER, RequestDisk=100 * 1024)
        final = (await submitter.run(headers, body=body, timeout_s=60))[-1]
        assert final.status == 5 and final.headers["HoldReasonCode"] == 34, final.headers
        assert "disk limit of 100.0 MiB" in final.headers["HoldReason"]
        assert held_mib(final) <= 100.0  # 461 MiB against 100 MiB at a 1 s check, before
        await seed_runs(submitter)
    finally:
        await node.stop()


async def test_a_file_cut_by_the_file_size_limit_is_held(disk_node: RunningNode, submitter: Submitter) -> None:
    """A write past RequestDisk in one file (a sparse seek: no blocks, so only RLIMIT_FSIZE sees it) -> SIGXFSZ."""
    job = {"Cmd": q("/bin/dd"), "Arguments": q("if=/dev/zero of=big bs=1 count=1 seek=20971520"), "RequestDisk": 10240}
    final = (await submitter.run(job, timeout_s=60))[-1]
    assert final.status == 5, final.headers  # was Exited
    assert final.headers["HoldReasonCode"] == 34
    assert "disk limit of 10.0 MiB (RequestDisk = 10240 KiB) (a file hit the size limit)" in final.headers["HoldReason"]
    await seed_runs(submitter)


async def test_a_job_cannot_leave_its_quota_through_a_subvolume(disk_node: RunningNode, submitter: Submitter) -> None:
    """A btrfs subvolume or snapshot the job makes inside its sandbox stays inside its limit."""
    source = """
import fcntl, os
args = bytearray(4096); args[8:13] = b"inner"
try:  # under bubblewrap the seccomp filter refuses btrfs ioctls: then a plain directory
    fcntl.ioctl(os.open(".", os.O_RDONLY), (1 << 30) | (4096 << 16) | (0x94 << 8) | 14, args)
    print("made a subvolume", flush=True)
except PermissionError:
    os.mkdir("inner")
with open("inner/big", "wb") as f:
    for _ in range(200):
        f.write(bytes(1 << 20))
"""
    headers, body = script_job(source, RequestDisk=20 * 1024)
    final = (await submitter.run(headers, body=body, timeout_s=60))[-1]
    assert final.status == 5 and final.headers["HoldReasonCode"] == 34, final.headers
    assert held_mib(final) <= 20.0
    await seed_runs(submitter)


async def test_many_files_are_held_before_the_results_are_walked(queue: str, base: Path, submitter: Submitter) -> None:
    """200,000 files made a 40 s result collection: now the walk stops at [node] max_result_files."""
    node = await start_node(queue, base, sandbox={**DISK, "default_disk_mib": 512})
    try:
        job = sh("mkdir d && cd d && seq -f f%g 200000 | xargs touch; echo rc=$?")
        final = (await submitter.run(job, timeout_s=120))[-1]
        assert final.status == 5, final.headers
        assert final.headers["HoldReasonCode"] == 33
        assert (
            "the job left more than 10000 files and directories; this node's limit is 10000 ([node] max_result_files)"
            in final.headers["HoldReason"]
        )
        await seed_runs(submitter)
    finally:
        await node.stop()


def test_jobs_have_a_wall_clock_limit_by_default(base: Path, queue: str) -> None:
    """Two `sleep 100000` jobs no longer fill a node for ever: a day unless the config says otherwise."""
    assert configuration.parse("[broker]\nurl = amqp://x/\n").sandbox.max_job_duration_s == 86400
    done = subprocess.run(
        [*CAROD, "check-config", str(write_config(base, queue))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "max_job_duration_s = 86400.0" in done.stdout.split("[sandbox]", 1)[1]


async def test_a_node_limit_holds_a_sleeping_job(queue: str, base: Path, submitter: Submitter) -> None:
    node = await start_node(queue, base, sandbox={**DISK, "max_job_duration_s": 1})
    try:
        final = (await submitter.run(sh("sleep 100000"), timeout_s=30))[-1]
        assert final.status == 5 and final.headers["HoldReasonCode"] == 47, final.headers
        assert "wall-clock limit of 1 s ([sandbox] max_job_duration_s)" in final.headers["HoldReason"]
        await seed_runs(submitter)
    finally:
        await node.stop()


def mounted_on(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


async def test_carod_restarts_cleanly_over_what_a_killed_run_left(queue: str, base: Path, submitter: Submitter) -> None:
    """A crashed carod leaves its image mounted with a 1,200-level tree in it: the next start copes."""
    config = write_config(base, queue, sandbox=DISK)
    try:
        await _restarts(config, base, submitter)
    finally:  # whatever failed, no mount is left behind
        diskquota.unmount_all(base / "sandboxes")


async def _restarts(config: Path, base: Path, submitter: Submitter) -> None:
    image = base / "state" / diskquota.IMAGE_NAME
    deep = "/".join(["d"] * 1200)
    first = await start_daemon(config)
    try:
        await seed_runs(submitter)
        # (after the crash, its redelivery runs again on the next carod and is stopped with it)
        mid = await submitter.send(sh(f"mkdir -p {deep} && head -c 1000000 /dev/zero > {deep}/x; exec sleep 600"))
        await submitter.wait_running(mid)
        box = await sandbox_of(base, mid)
        await until(lambda: (box / deep / "x").exists())
    finally:
        await first.stop(signal.SIGKILL)
    assert mounted_on(base / "sandboxes")  # the old image, with the deep tree in it
    second = await start_daemon(config)
    try:
        assert not box.exists()  # a fresh file system: the deep tree went with the old one
        await seed_runs(submitter)
    finally:
        assert await second.stop() == 0
    assert not mounted_on(base / "sandboxes")  # a clean stop detaches the image...
    assert not image.exists()  # ...and deletes it
    third = await start_daemon(config)
    try:
        await seed_runs(submitter)
    finally:
        assert await third.stop() == 0


async def test_a_host_that_cannot_bound_the_disk(queue: str, base: Path, submitter: Submitter) -> None:
    """sandbox_root is already some other file system: required -> exit 78 naming the key; auto -> a warning."""
    root = base / "sandboxes"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g", "tmpfs", str(root)], check=True)
    try:
        daemon = await start_daemon(write_config(base, queue, sandbox={"disk_quota": "required"}), ready=None)
        code = await asyncio.wait_for(daemon.proc.wait(), 60)
        text = (await daemon.proc.stderr.read()).decode()  # type: ignore[union-attr]
        assert code == 78, text
        assert (
            "[sandbox] disk_quota = required" in text and "another file system (tmpfs tmpfs), not carod's image" in text
        ), text
        daemon = await start_daemon(write_config(base, queue, sandbox={"disk_quota": "auto"}), ready=" ready: node=")
        try:
            await seed_runs(submitter)
        finally:
            assert await daemon.stop() == 0
        text = "".join(daemon.log)
        assert "WARNING" in text and "sandbox: no kernel bound on each job's disk" in text, text
        assert mounted_on(root)  # the operator's file system is left alone
    finally:
        subprocess.run(["umount", str(root)], check=False)


async def test_a_small_request_disk_is_not_full_while_empty(disk_node: RunningNode, submitter: Submitter) -> None:
    """HTCondor ads often say RequestDisk = DiskUsage (tens of KiB): such a job runs and Exits."""
    for kib in (64, 512, 1024, 2048):
        final = (await submitter.run({**SEED, "RequestDisk": kib}))[-1]
        assert final.status == 4 and final.headers["ExitCode"] == 0, (kib, final.headers)
        assert final.zip_read("job.out") == b"Hello Grid!\n"


SUBVOLUME_READ_ONLY = """
import fcntl, os, struct
args = bytearray(4096); args[8:13] = b"inner"
try:
    fcntl.ioctl(os.open(".", os.O_RDONLY), (1 << 30) | (4096 << 16) | (0x94 << 8) | 14, args)
except OSError as exc:
    print("create", exc.errno)
else:  # made: try to make it read-only, which would keep it (and its data) past the job
    fd = os.open("inner", os.O_RDONLY)
    try:
        fcntl.ioctl(fd, (1 << 30) | (8 << 16) | (0x94 << 8) | 26, struct.pack("Q", 2))
        print("read-only")
    except OSError as exc:
        print("setflags", exc.errno)
"""


async def test_a_job_cannot_keep_a_read_only_subvolume_past_its_end(
    disk_node: RunningNode, submitter: Submitter
) -> None:
    """A nested subvolume set read-only could not be removed with the sandbox: btrfs ioctls are refused."""
    if disk_node.server.layers is None or disk_node.server.layers.seccomp is None:
        pytest.skip("no bubblewrap seccomp filter on this host")
    headers, body = script_job(SUBVOLUME_READ_ONLY, RequestDisk=20 * 1024)
    final = (await submitter.run(headers, body=body, timeout_s=60))[-1]
    assert final.status == 4, final.headers
    assert final.zip_read("out") == b"create 1\n"  # EPERM
    await seed_runs(submitter)
    await until(lambda: not job_sandboxes(disk_node.base))
