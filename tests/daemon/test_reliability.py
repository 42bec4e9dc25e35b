"""Faults injected for real: carod killed, connections closed, the broker stopped.

Each job records every start in a file outside its sandbox, so the tests can
count executions; every submitter uses a durable reply queue and a robust
connection, as a submitter that must not lose answers would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import (
    Daemon,
    Submitter,
    needs_ctl,
    q,
    rabbit_env,
    rabbitmqctl,
    start_daemon,
    write_config,
)

#: These jobs record their starts in a shared directory outside their sandbox,
#: which bubblewrap would (rightly) forbid: the journal, not the sandbox, is under test.
OPEN = {"isolation": "none"}


@pytest.fixture
def runs(base: Path) -> Path:
    path = base / "runs"
    path.mkdir()
    os.chmod(path, 0o1777)  # noqa: S103 - jobs (as nobody) record their starts here
    return path


def counting_job(runs: Path, seconds: float) -> dict[str, object]:
    """A job that records each start, then sleeps; the marker finds its processes."""
    marker = f"carod-test-{uuid.uuid4().hex}"
    script = f'echo $$ >> {runs}/{marker}; exec sh -c "sleep {seconds}" {marker}'
    return {"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'"), "_marker": marker}


async def submit_counting(sub: Submitter, runs: Path, seconds: float, n: int) -> dict[str, str]:
    """Submit n counting jobs; returns message_id -> marker."""
    jobs = {}
    for _ in range(n):
        job = counting_job(runs, seconds)
        marker = str(job.pop("_marker"))
        mid = await sub.send(job)
        assert mid is not None
        jobs[mid] = marker
    return jobs


def starts(runs: Path, marker: str) -> int:
    path = runs / marker
    return len(path.read_text().split()) if path.exists() else 0


def alive(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and b"sleep" not in cmdline.split(b"\0")[0]:
                found.append(int(entry.name))
    return found


@pytest.fixture
async def durable_sub(queue: str) -> AsyncIterator[Submitter]:
    sub = await Submitter.open(queue, durable=True)
    yield sub
    await sub.close()


async def finish(daemon: Daemon, sub: Submitter, jobs: dict[str, str], timeout_s: float = 90) -> None:
    """Wait for every final reply, stop carod cleanly, and make sure nothing else is on its way."""
    for mid in jobs:
        await sub.wait_final(mid, timeout_s)
    assert await daemon.stop() == 0
    await sub.sync()


async def test_kill9_then_restart_each_job_answered_once(
    base: Path, queue: str, runs: Path, durable_sub: Submitter
) -> None:
    config = write_config(base, queue, node={"slots": 2}, sandbox=OPEN)
    daemon = await start_daemon(config)
    jobs = await submit_counting(durable_sub, runs, 2, 3)  # two run, one waits in the queue
    await daemon.wait_for_line("state=running")
    await daemon.wait_for_line("state=running")
    daemon.proc.kill()
    await daemon.proc.wait()

    daemon = await start_daemon(config)
    await finish(daemon, durable_sub, jobs)
    run_counts = []
    for mid, marker in jobs.items():
        finals = durable_sub.finals(mid)
        assert len(finals) == 1, f"{mid}: {len(finals)} final replies"
        assert finals[0].status == 4 and finals[0].headers["ExitCode"] == 0
        run_count = finals[0].headers["JobRunCount"]
        assert starts(runs, marker) == run_count  # the re-run is counted, and only the re-run
        run_counts.append(run_count)
        assert alive(marker) == []  # the first run's orphans were killed at restart
    assert sorted(run_counts) == [1, 2, 2]
    assert any("recovered: 2 interrupted job(s)" in line for line in daemon.log)


@needs_ctl
async def test_connections_closed_jobs_keep_running_and_answer_once(
    base: Path, queue: str, runs: Path, durable_sub: Submitter
) -> None:
    daemon = await start_daemon(write_config(base, queue, node={"slots": 2}, sandbox=OPEN))
    jobs = await submit_counting(durable_sub, runs, 3, 2)
    await daemon.wait_for_line("state=running")
    await daemon.wait_for_line("state=running")
    await asyncio.to_thread(rabbitmqctl, "close_all_connections", "carod fault-injection test")
    await finish(daemon, durable_sub, jobs)
    for mid, marker in jobs.items():
        finals = durable_sub.finals(mid)
        assert len(finals) == 1
        assert finals[0].status == 4 and finals[0].headers["ExitCode"] == 0
        assert finals[0].headers["JobRunCount"] == 1
        assert starts(runs, marker) == 1  # not killed, not run twice
    assert any("state=adopted" in line for line in daemon.log)


@needs_ctl
async def test_broker_stopped_while_jobs_run_and_finish(
    base: Path, queue: str, runs: Path, durable_sub: Submitter
) -> None:
    daemon = await start_daemon(write_config(base, queue, node={"slots": 2}, sandbox=OPEN))
    jobs = await submit_counting(durable_sub, runs, 2, 2)
    await daemon.wait_for_line("state=running")
    await daemon.wait_for_line("state=running")
    await asyncio.to_thread(rabbitmqctl, "stop_app")
    try:
        # both jobs end while the broker is away: their answers must wait, not vanish
        await daemon.wait_for_line("state=exited", timeout_s=30)
        await daemon.wait_for_line("state=exited", timeout_s=30)
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
    await finish(daemon, durable_sub, jobs, timeout_s=120)
    for mid, marker in jobs.items():
        finals = durable_sub.finals(mid)
        assert len(finals) == 1
        assert finals[0].status == 4
        assert starts(runs, marker) == 1


async def test_sigterm_requeued_job_runs_again_with_next_run_count(
    base: Path, queue: str, runs: Path, durable_sub: Submitter
) -> None:
    config = write_config(base, queue, node={"drain_timeout_s": 0.5, "kill_grace_s": 1}, sandbox=OPEN)
    daemon = await start_daemon(config)
    jobs = await submit_counting(durable_sub, runs, 2, 1)
    await daemon.wait_for_line("state=running")
    assert await daemon.stop(signal.SIGTERM) == 0
    daemon = await start_daemon(config)
    await finish(daemon, durable_sub, jobs)
    ((mid, marker),) = jobs.items()
    statuses = [r.status for r in durable_sub.replies[mid]]
    assert statuses == [2, 1, 2, 4]
    assert durable_sub.finals(mid)[0].headers["JobRunCount"] == 2
    assert starts(runs, marker) == 2


def consumer_timeout_ms() -> str:
    """The broker's current consumer_timeout, as Erlang prints it ({ok,N} or undefined)."""
    return rabbit_env("consumer_timeout")


def restore_consumer_timeout(original: str) -> None:
    if original.startswith("{ok,"):
        value = original[len("{ok,") : -1]
        rabbitmqctl("eval", f"application:set_env(rabbit, consumer_timeout, {value}).")
    else:
        rabbitmqctl("eval", "application:unset_env(rabbit, consumer_timeout).")


@needs_ctl
@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_consumer_timeout_costs_only_a_redelivery(
    base: Path, queue: str, runs: Path, durable_sub: Submitter
) -> None:
    """RabbitMQ closes the consuming channel of a delivery unacked past consumer_timeout
    (checked once a minute on 3.10). The job goes on; its redelivery is adopted and it
    is answered once. The broker setting is restored afterwards."""
    original = await asyncio.to_thread(consumer_timeout_ms)
    await asyncio.to_thread(rabbitmqctl, "eval", "application:set_env(rabbit, consumer_timeout, 2000).")
    try:
        daemon = await start_daemon(write_config(base, queue, node={"slots": 1}, sandbox=OPEN))
        jobs = await submit_counting(durable_sub, runs, 75, 1)
        await daemon.wait_for_line("state=running")
        await daemon.wait_for_line("state=adopted", timeout_s=150)
        await finish(daemon, durable_sub, jobs, timeout_s=200)
    finally:
        await asyncio.to_thread(restore_consumer_timeout, original)
    assert await asyncio.to_thread(consumer_timeout_ms) == original
    ((mid, marker),) = jobs.items()
    finals = durable_sub.finals(mid)
    assert len(finals) == 1
    assert finals[0].status == 4 and finals[0].headers["JobRunCount"] == 1
    assert starts(runs, marker) == 1


async def test_journal_failure_passes_job_on_then_holds(queue: str, base: Path, submitter: Submitter) -> None:
    """A node whose journal cannot be written (e.g. its disk filled up after start)
    hands jobs to other nodes; when none can take it, the job is Held, not looped."""
    from carod.edges.journal import JournalError
    from tests.helpers import start_node

    node = await start_node(queue, base, broker={"max_offers": 3, "unmatched_delay_s": 0.05})
    try:
        assert node.server.node is not None

        async def broken(message_id: str, reply_to: str | None = None) -> object:
            raise JournalError("journal write failed: database or disk is full")

        node.server.node.journal.receive = broken  # type: ignore[method-assign]
        replies = await submitter.run({"Cmd": q("/bin/true")})
        assert [r.status for r in replies] == [5]
        reason = replies[0].headers["HoldReason"]
        assert "no node could record the job after 3 offers" in reason
        assert "disk is full" in reason
    finally:
        await node.stop()
