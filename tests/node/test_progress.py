"""carod.node.progress: what a running job's updates and live output read and send, within their budget
(no broker)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from carod.config import NodeConfig
from carod.node.progress import Bucket, Progress, Publish, Tail
from carod.wire import replies
from carod.wire.classads import Scalar


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
