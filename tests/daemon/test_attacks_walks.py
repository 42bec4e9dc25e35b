"""Issue 14, walks over trees a job made: each attack against a real carod.

Without the kernel's disk bound (``[sandbox] disk_quota = none``) carod
measures a running job's sandbox by walking it (carod.tree.usage_bytes): a
link swapped between a directory and a FIFO made that walk open the FIFO as
root and block for good (no reply, no wall-clock limit, no SIGTERM), and a
1,200-level tree made it raise RecursionError. The result walk re-opened
every path from the top (an 8,000-level tree: 80 s of root CPU) and a
65,536-byte name made zipfile fail (an internal error, a requeue); the input
unpack re-made every parent of every entry (9,000 entries 100 levels deep:
20 s). After each, the node serves the seed job. The file functions are tested
directly, without a broker, in tests/sandbox/test_results.py, test_limits.py, test_execute.py
and tests/test_unzip.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from carod.holdcodes import HoldCode
from carod.wire import safezip
from tests.helpers import Daemon, RunningNode, Submitter, q, raw_zip, seed_runs, start_daemon, start_node, write_config

#: The sandbox is measured by walking it, five times a second.
FALLBACK = {"disk_quota": "none", "check_interval_s": 0.2}


PY = "/usr/bin/python3"


def script_job(source: str, **attrs: Any) -> tuple[dict[str, Any], bytes]:
    """A Python job: the script travels in the input zip."""
    return {"Cmd": q(PY), "Arguments": q("attack.py"), "Out": q("out"), "Err": q("err"), **attrs}, raw_zip(
        ("attack.py", source.encode(), 0o100644)
    )


@pytest.fixture
async def walk_node(queue: str, base: Path) -> AsyncIterator[RunningNode]:
    running = await start_node(queue, base, node={"kill_grace_s": 1}, sandbox=FALLBACK)
    assert running.server.quota is None  # the walk, not the kernel, measures the disk
    yield running
    await running.stop()


SWAPPER = """
import os, time
os.mkdir("d")
os.mkfifo("f")
os.symlink("d", "t")
for i in range(100):
    os.symlink("t", f"l{i}")
end = time.monotonic() + 15
swaps = 0
while time.monotonic() < end:
    for target in ("f", "d"):
        os.symlink(target, "t.new")
        os.replace("t.new", "t")
    swaps += 1
print("swaps", swaps, flush=True)
"""


async def test_a_link_swapped_to_a_fifo_does_not_wedge_the_disk_check(
    queue: str, base: Path, submitter: Submitter
) -> None:
    """100 links to a link swapped between a directory and a FIFO for 15 s, measured 5 times a second.

    Before, carod's disk check followed a link into the FIFO and blocked in
    open() for good: no reply, AllowedExecuteDuration never fired, SIGTERM
    did not stop carod. Now the job ends as it would anywhere, and carod stops.
    """
    daemon = await start_daemon(write_config(base, queue, node={"kill_grace_s": 1}, sandbox=FALLBACK))
    try:
        await _swapped_link(submitter)
        assert await daemon.stop() == 0
    finally:
        await _never_left_running(daemon)
    assert "no kernel bound on each job's disk" in "".join(daemon.log)  # it was the fallback walk


async def _swapped_link(submitter: Submitter) -> None:
    headers, body = script_job(SWAPPER, RequestDisk=100 * 1024, AllowedExecuteDuration=60)
    final = (await submitter.run(headers, body=body, timeout_s=90))[-1]
    assert final.status == 4, final.headers
    assert final.headers["ExitCode"] == 0
    assert re.fullmatch(rb"swaps [0-9]+\n", final.zip_read("out")), final.zip_read("out")
    # The 100 links, the swapped link and the FIFO: never taken (the reply lists the first 100).
    assert final.headers["SkippedOutputCount"] == 102, final.headers
    await seed_runs(submitter)


async def _never_left_running(daemon: Daemon) -> None:
    if daemon.proc.returncode is None:
        daemon.proc.kill()  # a wedged carod only goes with SIGKILL
        await daemon.proc.wait()


DEEP_AND_FULL = """
import os, time
for _ in range(1200):
    os.mkdir("d")
    os.chdir("d")
for i in range(4):  # each under RLIMIT_FSIZE (the limit); with the directories, over it
    with open(f"bottom{i}", "wb") as f:
        f.write(os.urandom(2 << 20))
        os.fsync(f.fileno())
print("written", flush=True)
time.sleep(60)
"""


async def test_a_1200_level_tree_is_measured(walk_node: RunningNode, submitter: Submitter) -> None:
    """os.fwalk raised RecursionError at 1,200 levels (internal error, requeue): now the bottom file counts."""
    headers, body = script_job(DEEP_AND_FULL, RequestDisk=10 * 1024)
    final = (await submitter.run(headers, body=body, timeout_s=60))[-1]
    assert final.status == 5, final.headers
    assert final.headers["HoldReasonCode"] == HoldCode.JOB_OUT_OF_RESOURCES
    reason = final.headers["HoldReason"]
    found = re.search(r"disk limit of 10\.0 MiB \(RequestDisk = 10240 KiB\); the sandbox held ([0-9.]+) MiB", reason)
    assert found is not None, reason
    # Past 10 MiB: the 1,200 directories take under 5 MiB, so the files at the bottom were counted.
    assert float(found.group(1)) > 10.0, reason
    await seed_runs(submitter)


def deep_job(levels: int, name: str) -> tuple[dict[str, Any], bytes]:
    source = f"""
import os
with open("top.txt", "w") as f:
    f.write("top")
for _ in range({levels}):
    os.mkdir({name!r})
    os.chdir({name!r})
with open("bottom.txt", "w") as f:
    f.write("bottom")
"""
    return script_job(source)


def deep_note(final_headers: dict[str, Any]) -> str:
    skipped = final_headers["SkippedOutput"].removeprefix('"').removesuffix('"')  # a ClassAd string
    assert final_headers["SkippedOutputCount"] == 1, final_headers
    assert skipped.endswith(f" (deeper than {safezip.MAX_DEPTH} levels)"), skipped
    return str(skipped)


async def test_an_8000_level_result_tree_is_answered(walk_node: RunningNode, submitter: Submitter) -> None:
    """Re-opening every path from the top cost 80 s of root CPU at 8,000 levels: the walk now stops at 100."""
    headers, body = deep_job(8000, "d")
    final = (await submitter.run(headers, body=body, timeout_s=120))[-1]
    assert final.status == 4 and final.headers["ExitCode"] == 0, final.headers
    assert final.zip_names() == ["attack.py", "err", "out", "top.txt"]
    assert deep_note(final.headers) == "/".join(["d"] * (safezip.MAX_DEPTH + 1)) + " (deeper than 100 levels)"
    await seed_runs(submitter)


async def test_a_result_name_past_the_zip_format_is_answered(walk_node: RunningNode, submitter: Submitter) -> None:
    """300 nested 255-character names: a 76,800-byte name made zipfile raise struct.error (internal error)."""
    headers, body = deep_job(300, "x" * 255)
    final = (await submitter.run(headers, body=body, timeout_s=60))[-1]
    assert final.status == 4 and final.headers["ExitCode"] == 0, final.headers
    assert final.zip_names() == ["attack.py", "err", "out", "top.txt"]
    note = deep_note(final.headers)
    assert note.startswith("x" * 100) and "..." in note and len(note) < 400, note  # shortened, not 25 KB
    await seed_runs(submitter)


async def test_a_deep_input_zip_with_many_entries_is_unpacked(walk_node: RunningNode, submitter: Submitter) -> None:
    """9,000 entries named d/d/...(100 levels)/N: each parent was re-made for every entry (20 s of root CPU)."""
    parent = "/".join(["d"] * safezip.MAX_DEPTH)
    body = raw_zip(*((f"{parent}/{n}", b"", 0o100644) for n in range(9000)))
    job = {
        "Cmd": q("/bin/sh"),
        "Arguments": q(f"-c 'ls {parent} | wc -l'"),
        "Out": q("out"),
        "TransferOutput": q("out"),
    }
    final = (await submitter.run(job, body=body, timeout_s=120))[-1]
    assert final.status == 4 and final.headers["ExitCode"] == 0, final.headers
    assert final.zip_read("out").strip() == b"9000"
    await seed_runs(submitter)


async def test_many_files_are_held_before_the_walk_grows(walk_node: RunningNode, submitter: Submitter) -> None:
    """50,000 empty files (the attack used 200,000), walked by the disk check while the job runs.

    The result walk stops at [node] max_result_files (10,000) before it holds
    the rest: 200,000 files took 270 MB of carod's memory and 10 s before.
    """
    job = {
        "Cmd": q("/bin/sh"),
        "Arguments": q("-c 'mkdir d && cd d && seq -f f%g 50000 | xargs touch'"),
        "RequestDisk": 512 * 1024,
        "RequestMemory": 1024,  # the kernel charges the inodes to the job
    }
    final = (await submitter.run(job, timeout_s=180))[-1]
    assert final.status == 5, final.headers
    assert final.headers["HoldReasonCode"] == HoldCode.MAX_TRANSFER_OUTPUT_SIZE_EXCEEDED, final.headers
    assert "this node's limit is 10000 ([node] max_result_files)" in final.headers["HoldReason"]
    await seed_runs(submitter)
