"""While a job runs: periodic JobStatus 2 updates, live output (StreamOut/StreamErr) and removal (carod rm)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from carod.client import remove
from carod.config import NodeConfig
from carod.node.progress import Bucket, Progress, Publish, Tail
from carod.wire import control, replies
from carod.wire.classads import Scalar
from tests.helpers import BROKER_URL, RunningNode, Submitter, q, queue_depth, start_node

# ---------------------------------------------------------------- pure: what to read and send


def test_tail_sends_new_output_in_chunks_within_the_budget() -> None:
    tail = Tail(chunk_bytes=10)
    reads = tail.plan(25, 100, lag_limit=1000)
    assert [(r.offset, r.length, r.skipped) for r in reads] == [(0, 10, 0), (10, 10, 0), (20, 5, 0)]
    assert tail.plan(25, 100, lag_limit=1000) == []  # nothing new
    reads = tail.plan(60, 12, lag_limit=1000)  # the budget runs out: the rest waits
    assert [(r.offset, r.length) for r in reads] == [(25, 10), (35, 2)]
    assert tail.offset == 37


def test_tail_skips_the_middle_when_too_far_behind() -> None:
    tail = Tail(chunk_bytes=10)
    reads = tail.plan(1000, 15, lag_limit=30)
    # 1000 pending, at most 30 kept: 970 skipped, said once, on the first chunk after the gap
    assert [(r.offset, r.length, r.skipped) for r in reads] == [(970, 10, 970), (980, 5, 0)]


def test_tail_last_pass_shows_the_end() -> None:
    tail = Tail(chunk_bytes=10)
    reads = tail.plan(100, 10, lag_limit=1000, last=True)
    assert [(r.offset, r.length, r.skipped) for r in reads] == [(90, 10, 90)]


def test_tail_restarts_when_the_file_is_truncated() -> None:
    tail = Tail(chunk_bytes=10, offset=50)
    reads = tail.plan(5, 100, lag_limit=1000)
    assert [(r.offset, r.length) for r in reads] == [(0, 5)]


def test_tail_reports_a_skip_made_when_the_budget_was_spent() -> None:
    tail = Tail(chunk_bytes=10)
    assert tail.plan(5000, 0, lag_limit=1000) == []  # skipped 4000, nothing sent yet
    reads = tail.plan(5000, 10, lag_limit=1000)
    assert [(r.offset, r.length, r.skipped) for r in reads] == [(4000, 10, 4000)]


def _progress(streams: dict[str, int], publish: Publish, *, finish_timeout_s: float = 5.0) -> Progress:
    async def send(reply: replies.Reply) -> bool:
        return True

    config = NodeConfig(update_interval_s=0, stream_interval_s=0.01)
    return Progress(
        config,
        None,  # type: ignore[arg-type]  # never asked for usage with update_interval_s = 0
        streams,
        update=lambda usage: pytest.fail("no updates asked for"),
        send=send,
        publish=publish,
        label="t",
        finish_timeout_s=finish_timeout_s,
    )


async def test_progress_gives_up_a_stream_but_leaves_it_to_its_owner_to_close(base: Path) -> None:
    (base / "out").write_bytes(b"x" * 100)
    fd = os.open(base / "out", os.O_RDONLY)
    streams = {"stdout": fd}
    sent: list[int] = []

    async def refuse(headers: dict[str, Scalar], body: bytes) -> bool:
        sent.append(len(body))
        return False  # nobody can receive it

    progress = _progress(streams, refuse)
    progress.start()
    await progress.finish()
    assert sent == [100] and progress.streams == {}
    assert streams == {"stdout": fd}  # still listed for Executor.end to close
    os.close(fd)


async def test_progress_never_holds_up_or_breaks_the_jobs_answer(base: Path) -> None:
    (base / "out").write_bytes(b"x")
    fd = os.open(base / "out", os.O_RDONLY)
    try:

        async def hang(headers: dict[str, Scalar], body: bytes) -> bool:
            await asyncio.Event().wait()  # a broker that never confirms
            return True

        async def broken(headers: dict[str, Scalar], body: bytes) -> bool:
            raise RuntimeError("a bug")

        hanging = _progress({"stdout": fd}, hang, finish_timeout_s=0.2)
        hanging.start()
        await asyncio.wait_for(hanging.finish(), 5)  # returns after its own timeout, not never
        failing = _progress({"stdout": fd}, broken)
        failing.start()
        await failing.finish()  # logged, not raised
    finally:
        os.close(fd)


def test_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = Bucket(rate=100.0, capacity=150.0, tokens=0.0, at=10.0)
    assert bucket.take_all(10.5) == 50
    bucket.spend(50)
    assert bucket.take_all(20.0) == 150


def test_update_and_removed_replies() -> None:
    usage = replies.Usage(wall_s=3.5, user_cpu_s=1.25, sys_cpu_s=0.5, memory_kib=2048, peak_memory_kib=4096, pids=3)
    update = replies.update(sequence=3, node="n1", start_date=1000.0, pid=42, usage=usage, run_count=1)
    h = update.headers
    assert (h["JobStatus"], h["JobState"], h["Sequence"], h["EnteredCurrentStatus"]) == (2, '"Running"', 3, 1000)
    assert (h["RemoteWallClockTime"], h["RemoteUserCpu"], h["RemoteSysCpu"]) == (3.5, 1.25, 0.5)
    assert (h["ResidentSetSize"], h["ImageSize"], h["NumPids"], h["JobPid"]) == (2048, 4096, 3, 42)
    removed = replies.removed(sequence=4, node="n1", now=2000.0, reason="by alice", info=None, run_count=1)
    assert removed.final and removed.headers["JobStatus"] == 3
    assert removed.headers["JobState"] == '"Removed"' and removed.headers["RemoveReason"] == '"by alice"'


def test_control_messages_round_trip_and_bad_ones_are_named() -> None:
    request = control.Request("rm", "job-1", "wrong input", "alice@host")
    assert control.decode_request(control.encode_request(request)) == request
    assert request.remove_reason() == "removed by alice@host via carod rm: wrong input"
    answer = control.Answer("n1", "job-1", "running")
    assert control.decode_answer(control.encode_answer(answer)) == answer
    for body, why in (
        (b"nope", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"v": 1, "action": "explode", "message_id": "x"}', "unknown action"),
        (b'{"v": 1, "action": "rm"}', "no message_id"),
        (b'{"v": 2, "action": "rm", "message_id": "x"}', "unknown version"),
    ):
        with pytest.raises(control.ControlError, match=why):
            control.decode_request(body)


# ---------------------------------------------------------------- on a node


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
    mid = await submitter.send({"Cmd": q("/bin/sleep"), "Arguments": q("300")})
    assert mid is not None
    await submitter.wait_running(mid)
    pid = int(submitter.replies[mid][0].headers["JobPid"])
    found = await remove(BROKER_URL, [mid], reason="wrong input", by="alice@host", wait_s=10)
    assert [(a.node, a.state) for a in found[mid]] == [(node.name, "running")]
    got = await submitter.wait_final(mid, timeout_s=15)
    final = got[-1]
    assert final.status == 3 and final.headers["JobState"] == '"Removed"'
    assert final.headers["RemoveReason"] == '"removed by alice@host via carod rm: wrong input"'
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
    await submitter.send({"Cmd": q("/bin/echo"), "Arguments": q("never")}, message_id=mid)
    got = await submitter.wait_final(mid)
    assert [r.status for r in got] == [3]
    assert "changed my mind" in got[-1].headers["RemoveReason"]
    assert await queue_depth(queue) == 0


async def test_rm_of_a_job_waiting_for_resources(queue: str, base: Path, submitter: Submitter) -> None:
    running = await start_node(queue, base, node={"slots": 1})
    try:
        first = await submitter.send({"Cmd": q("/bin/sleep"), "Arguments": q("300")})
        await submitter.wait_running(first)
        second = await submitter.send({"Cmd": q("/bin/echo"), "Arguments": q("hi")})
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
