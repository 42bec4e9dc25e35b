"""While a job runs on a real carod: periodic JobStatus 2 updates, live output (StreamOut/StreamErr)
and removal (carod rm)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from carod.client import remove
from carod.wire import replies
from tests.helpers import BROKER_URL, RunningNode, Submitter, q, queue_depth, start_node


@pytest.fixture
async def lively(queue: str, base: Path) -> AsyncIterator[RunningNode]:
    """A node sending updates every 0.2 s and looking for output every 0.05 s."""
    running = await start_node(queue, base, node={"update_interval_s": 0.2, "stream_interval_s": 0.05})
    yield running
    await running.stop()


async def test_periodic_updates_while_the_job_runs(lively: RunningNode, submitter: Submitter) -> None:
    # Burns CPU for a moment, then sleeps: the updates show the CPU time and the wall time growing.
    script = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1"
    got = await submitter.run({"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'")})
    updates = [r for r in got if r.status == 2 and "RemoteWallClockTime" in r.headers]
    assert len(updates) >= 3, [r.headers for r in got]
    walls = [float(r.headers["RemoteWallClockTime"]) for r in updates]
    assert walls == sorted(walls) and walls[-1] > walls[0]
    assert float(updates[-1].headers["RemoteUserCpu"]) + float(updates[-1].headers["RemoteSysCpu"]) > 0
    for update in updates:
        assert update.headers["JobStatus"] == 2 and update.headers["ResidentSetSize"] >= 0
        assert update.headers["NumPids"] >= 1 and update.headers["JobPid"] == got[0].headers["JobPid"]
    sequences = [int(r.headers["Sequence"]) for r in got]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert got[-1].status == 4 and got[-1].headers["ExitCode"] == 0


async def test_no_updates_when_turned_off(queue: str, base: Path, submitter: Submitter) -> None:
    running = await start_node(queue, base, node={"update_interval_s": 0})
    try:
        got = await submitter.run({"Cmd": q("/bin/sleep"), "Arguments": q("0.5")})
    finally:
        await running.stop()
    assert [r.status for r in got] == [2, 4]


async def test_live_output_arrives_in_order_before_the_final_reply(lively: RunningNode, submitter: Submitter) -> None:
    script = "for i in 1 2 3 4; do echo out$i; echo err$i >&2; sleep 0.3; done"
    mid = await submitter.send(
        {
            "Cmd": q("/bin/sh"),
            "Arguments": q(f"-c '{script}'"),
            "Out": q("job.out"),
            "StreamOut": "TRUE",
            "StreamErr": "TRUE",
        }
    )
    got = await submitter.wait_final(mid)
    chunks = [r for r in got if replies.STREAM_HEADER in r.headers]
    final_at = next(i for i, r in enumerate(got) if r.status == 4)
    assert chunks and all(got.index(c) < final_at for c in chunks)
    # More than one chunk per stream: it came while the job ran, not all at the end.
    for stream, text in (("stdout", "out"), ("stderr", "err")):
        mine = [c for c in chunks if c.headers[replies.STREAM_HEADER] == stream]
        assert len(mine) >= 2, [c.body for c in mine]
        offsets = [int(c.headers[replies.OFFSET_HEADER]) for c in mine]
        assert offsets == sorted(offsets) and offsets[0] == 0
        assert b"".join(c.body for c in mine) == "".join(f"{text}{i}\n" for i in range(1, 5)).encode()
        assert all(int(c.headers[replies.SKIPPED_HEADER]) == 0 for c in mine)
    # The files are in the result zip as well; stderr without Err went to HTCondor's _condor_stderr.
    assert got[-1].zip_read("job.out") == b"out1\nout2\nout3\nout4\n"
    assert got[-1].zip_read("_condor_stderr") == b"err1\nerr2\nerr3\nerr4\n"


async def test_live_output_is_bounded_in_rate(queue: str, base: Path, submitter: Submitter) -> None:
    # 3 MB written at once, 64 KiB/s allowed: the middle is skipped, the end is sent, the zip has it all.
    running = await start_node(
        queue, base, node={"stream_interval_s": 0.05, "stream_chunk_kib": 16, "stream_rate_kib_s": 64}
    )
    try:
        script = "head -c 3000000 /dev/zero | tr '\\\\0' a; echo END; sleep 0.5"
        mid = await submitter.send(
            {"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'"), "Out": q("big.out"), "StreamOut": "TRUE"}
        )
        got = await submitter.wait_final(mid, timeout_s=60)
    finally:
        await running.stop()
    chunks = [r for r in got if replies.STREAM_HEADER in r.headers]
    sent = sum(len(c.body) for c in chunks)
    skipped = sum(int(c.headers[replies.SKIPPED_HEADER]) for c in chunks)
    assert all(len(c.body) <= 16 * 1024 for c in chunks)
    assert sent + skipped == 3000004 and skipped > 0
    assert sent <= 64 * 1024 * 12  # ten seconds of lag at most, plus the first second and the last chunk
    assert chunks[-1].body.endswith(b"aEND\n")
    assert len(got[-1].zip_read("big.out")) == 3000004


async def test_stream_out_must_be_a_boolean(node: RunningNode, submitter: Submitter) -> None:
    got = await submitter.run({"Cmd": q("/bin/true"), "StreamOut": q("yes")})
    assert got[-1].status == 5
    assert "StreamOut" in got[-1].headers["HoldReason"] and "TRUE or FALSE" in got[-1].headers["HoldReason"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"
    except FileNotFoundError:
        return False


async def test_rm_kills_a_running_job_answers_removed_and_acks(
    node: RunningNode, submitter: Submitter, queue: str
) -> None:
    # Published as the broker user the removal comes from (guest): its owner (docs/protocol.md).
    mid = await submitter.send({"Cmd": q("/bin/sleep"), "Arguments": q("300")}, user_id="guest")
    assert mid is not None
    await submitter.wait_running(mid)
    pid = int(submitter.replies[mid][0].headers["JobPid"])
    found = await remove(BROKER_URL, [mid], reason="wrong input", by="alice@host", wait_s=10)
    assert [(a.node, a.state) for a in found[mid]] == [(node.name, "running")]
    got = await submitter.wait_final(mid, timeout_s=15)
    final = got[-1]
    assert final.status == 3 and final.headers["JobState"] == '"Removed"'
    assert final.headers["RemoveReason"] == '"removed by alice@host (broker user guest) via carod rm: wrong input"'
    assert final.headers["ExitBySignal"] == "TRUE" and final.headers["ExitSignal"] == 15
    assert not _alive(pid)
    assert await queue_depth(queue) == 0  # acknowledged: it never runs again
    assert (await submitter.run({"Cmd": q("/bin/true")}))[-1].status == 4
    assert len(submitter.finals(mid)) == 1


async def test_rm_before_the_job_arrives_answers_it_removed_on_arrival(
    node: RunningNode, submitter: Submitter, queue: str
) -> None:
    mid = "rm-early-" + os.urandom(4).hex()
    found = await remove(BROKER_URL, [mid], reason="changed my mind", wait_s=0.5)
    assert found == {mid: []}  # nobody has it yet
    await submitter.send({"Cmd": q("/bin/echo"), "Arguments": q("never")}, message_id=mid, user_id="guest")
    got = await submitter.wait_final(mid)
    assert [r.status for r in got] == [3]
    assert "changed my mind" in got[-1].headers["RemoveReason"]
    assert await queue_depth(queue) == 0


async def test_rm_of_a_job_waiting_for_resources(queue: str, base: Path, submitter: Submitter) -> None:
    running = await start_node(queue, base, node={"slots": 1})
    try:
        first = await submitter.send({"Cmd": q("/bin/sleep"), "Arguments": q("300")}, user_id="guest")
        await submitter.wait_running(first)
        second = await submitter.send({"Cmd": q("/bin/echo"), "Arguments": q("hi")}, user_id="guest")
        assert first is not None and second is not None
        # The second waits in the queue (prefetch follows free slots) or on the node: either way it is removed.
        found = await remove(BROKER_URL, [second, first], wait_s=3)
        assert [a.state for a in found[first]] == ["running"]
        for mid in (first, second):
            got = await submitter.wait_final(mid, timeout_s=15)
            assert got[-1].status == 3, got[-1].headers
    finally:
        await running.stop()
    assert await queue_depth(queue) == 0
