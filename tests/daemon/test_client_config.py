"""The client tools as a person types them on a node: `carod q`, `status`, `rm`, `submit` read the node's config.

A real node (its own process) on a queue and pool exchange of the test's own; the
commands get no URL, queue or exchange on the command line (and no CAROD_BROKER_URL):
only the config file, by --config or $CAROD_CONFIG. Flags still override it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import BROKER_URL, CAROD, Daemon, start_daemon, write_config

#: The environment without anything that could point the tools at the broker but the config.
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("CAROD_")}


def carod(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CAROD, *args], capture_output=True, text=True, timeout=60, env={**CLEAN_ENV, **(env or {})})


@pytest.fixture
async def node(base: Path, queue: str, exchange: str) -> AsyncIterator[tuple[Daemon, Path]]:
    config = write_config(base, queue, node={"slots": 1}, pool={"exchange": exchange, "advertise_interval_s": 0.2})
    daemon = await start_daemon(config)
    yield daemon, config
    assert await daemon.stop() == 0


async def submit(*args: str, env: dict[str, str] | None = None) -> tuple[asyncio.subprocess.Process, str]:
    """`carod submit ARGS --json /bin/sleep 300`, running until its job is answered; returns it and the job's id."""
    proc = await asyncio.create_subprocess_exec(
        *CAROD, "submit", *args, "--json", "/bin/sleep", "300",
        stdout=asyncio.subprocess.PIPE, env={**CLEAN_ENV, **(env or {})},
    )  # fmt: skip
    assert proc.stdout is not None
    first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
    return proc, first["message_id"]


async def until_running(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while json.loads(await asyncio.wait_for(proc.stdout.readline(), 30)).get("JobStatus") != 2:
        pass


async def test_q_status_rm_and_submit_take_the_node_config(node: tuple[Daemon, Path], base: Path) -> None:
    _, config = node
    cfg = ("--config", str(config))
    running, mid = await submit(*cfg, "-a", 'Owner="alice"')  # a claim: the broker user (guest) owns it
    await until_running(running)
    waiting, queued = await submit(env={"CAROD_CONFIG": str(config)})  # one slot: this one waits in the queue

    status = await asyncio.to_thread(carod, "status", *cfg)
    assert status.returncode == 0, status.stderr
    assert "1 node(s) answering" in status.stdout and "1 job(s) running" in status.stdout

    q = await asyncio.to_thread(carod, "q", *cfg)
    assert q.returncode == 0, q.stderr
    lines = q.stdout.splitlines()
    assert lines[0].split() == ["ID", "OWNER", "SUBMITTED", "RUN_TIME", "ST", "SIZE", "CMD"]
    row = next(line for line in lines if line.startswith(f" {mid}"))
    assert row.split()[1] == "guest" and row.split()[-3:] == ["R", "128.0", "/bin/sleep"]
    assert row.split()[-4].startswith("0+00:00:")
    assert lines[-1] == "2 jobs; 1 idle, 1 running, 0 held"  # the waiting one counted from the queue

    q = await asyncio.to_thread(carod, "q", env={"CAROD_CONFIG": str(config)})
    assert q.stdout.splitlines()[-1] == "2 jobs; 1 idle, 1 running, 0 held", q.stderr

    af = await asyncio.to_thread(carod, "q", *cfg, "-af", "Owner", "Cmd", "JobStatus", "MessageId", "Missing")
    assert (af.returncode, af.stdout) == (0, f"guest /bin/sleep 2 {mid} undefined\n"), af.stderr
    fmt = await asyncio.to_thread(
        carod, "q", *cfg, "-format", "%s runs ", "Cmd", "-format", "as %s\\n", "Owner", "-format", "%d\\n", "Missing"
    )
    assert (fmt.returncode, fmt.stdout) == (0, "/bin/sleep runs as guest\n"), fmt.stderr
    none = await asyncio.to_thread(carod, "q", *cfg, "-af", "Owner", "-constraint", 'Owner == "bob"')
    assert (none.returncode, none.stdout) == (0, ""), none.stderr
    some = await asyncio.to_thread(
        carod, "q", *cfg, "-af", "Owner", "-constraint", "JobStatus == 2 && RequestCpus >= 1"
    )
    assert some.stdout == "guest\n", some.stderr
    as_json = await asyncio.to_thread(carod, "q", *cfg, "--json")
    [job] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert job["message_id"] == mid and job["ad"]["Owner"] == "guest" and job["ad"]["JobStatus"] == 2

    removed = await asyncio.to_thread(carod, "rm", *cfg, mid)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith(f"{mid}: removed on ")
    await asyncio.wait_for(running.wait(), 30)
    assert running.returncode == 125  # Removed
    await until_running(waiting)  # the slot is free: the queued job runs
    removed = await asyncio.to_thread(carod, "rm", "--config", str(config), queued)
    assert removed.returncode == 0, removed.stderr
    await asyncio.wait_for(waiting.wait(), 30)
    q = await asyncio.to_thread(carod, "q", *cfg)
    assert q.stdout.splitlines()[-1] == "0 jobs; 0 idle, 0 running, 0 held"


async def test_flags_override_the_config(base: Path, queue: str, exchange: str) -> None:
    config = write_config(base, queue, pool={"exchange": exchange})
    daemon = await start_daemon(config)
    try:
        # A config whose broker URL is wrong: the tools follow it, and --url overrides it.
        broken = base / "client.conf"
        broken.write_text(config.read_text().replace(BROKER_URL, "amqp://guest:guest@127.0.0.1:1/"))
        result = await asyncio.to_thread(carod, "status", "--config", str(broken), "--wait", "0.5")
        assert result.returncode == 69 and "cannot connect to the broker" in result.stderr
        result = await asyncio.to_thread(carod, "status", "--config", str(broken), "--url", BROKER_URL)
        assert result.returncode == 0 and "1 node(s) answering" in result.stdout, result.stderr
        # --pool-exchange and --queue override the config's too: no node there.
        result = await asyncio.to_thread(carod, "status", "--config", str(config), "--queue", "other", "--wait", "0.5")
        assert result.returncode == 0 and "0 node(s) answering" in result.stdout, result.stderr
        # CAROD_BROKER_URL overrides the file, as it does for the daemon.
        result = await asyncio.to_thread(carod, "status", "--config", str(broken), env={"CAROD_BROKER_URL": BROKER_URL})
        assert result.returncode == 0 and "1 node(s) answering" in result.stdout, result.stderr
        # Given before the subcommand, as for the daemon.
        result = await asyncio.to_thread(carod, "--config", str(config), "q", "-af", "Cmd")
        assert (result.returncode, result.stdout) == (0, ""), result.stderr
    finally:
        assert await daemon.stop() == 0


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_missing_config_is_an_error_naming_it(base: Path, how: str) -> None:
    missing = str(base / "nope.conf")
    for command, *rest in (["q"], ["status"], ["rm", "some-id"], ["submit", "/bin/true"]):
        if how == "flag":
            result = carod(command, "--config", missing, *rest)
        else:
            result = carod(command, *rest, env={"CAROD_CONFIG": missing})
        assert result.returncode == 78, (command, result.stderr)
        assert "nope.conf" in result.stderr and "cannot read the config file" in result.stderr


def test_a_bad_q_argument_is_refused_before_asking_the_pool(base: Path) -> None:
    unreachable = {"CAROD_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"}
    result = carod("q", "-constraint", "JobStatus ==", env=unreachable)
    assert result.returncode == 2 and "-constraint 'JobStatus =='" in result.stderr
    result = carod("q", "-af", "Owner", "-format", "%s", "Owner", env=unreachable)
    assert result.returncode == 2 and "not allowed with" in result.stderr


async def test_idle_counts_the_jobs_parked_in_the_delay_queue(base: Path, queue: str, exchange: str) -> None:
    config = write_config(base, queue, broker={"unmatched_delay_s": 60}, pool={"exchange": exchange})
    daemon = await start_daemon(config)
    proc = None
    try:
        proc, _ = await submit("--config", str(config), "-a", "Requirements=FALSE")
        await daemon.wait_for_line("state=declined")  # parked in <queue>.unmatched for 60 s
        q = await asyncio.to_thread(carod, "q", "--config", str(config))
        assert q.returncode == 0, q.stderr
        assert q.stdout.splitlines()[-1] == "1 jobs; 1 idle, 0 running, 0 held"
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert await daemon.stop() == 0
