"""The carod command as an operator and a submitter use it: real processes, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import BROKER_URL, CAROD, Daemon, Submitter, q, queue_depth, start_daemon, write_config


@pytest.fixture
async def daemon(base: Path, queue: str) -> AsyncIterator[Daemon]:
    d = await start_daemon(write_config(base, queue))
    yield d
    if d.proc.returncode is None:
        await d.stop()  # SIGTERM: carod removes its cgroup parent on the way out


def run(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CAROD, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "CAROD_BROKER_URL": BROKER_URL},
    )


def test_bad_config_names_the_key(base: Path) -> None:
    bad = base / "bad.conf"
    bad.write_text("[node]\nslots = many\n")
    result = run("--config", str(bad))
    assert result.returncode == 78
    assert "[node] slots" in result.stderr
    bad.write_text("[node]\nslotz = 2\n")
    result = run("check-config", str(bad))
    assert result.returncode == 78
    assert "[node] slotz: unknown key" in result.stderr


def test_missing_config_file(base: Path) -> None:
    result = run("--config", str(base / "nope.conf"))
    assert result.returncode == 78
    assert "nope.conf" in result.stderr


def test_machine_ad_prints_classad(base: Path, queue: str) -> None:
    config = write_config(base, queue, machine={"HasFoo": "TRUE", "Memory": "4096"})
    result = run("machine-ad", "--config", str(config))
    assert result.returncode == 0, result.stderr
    ad = dict(line.split(" = ", 1) for line in result.stdout.splitlines())
    for name in ("Arch", "OpSys", "OpSysAndVer", "Cpus", "Disk", "Name", "Machine", "Start"):
        assert name in ad
    assert ad["OpSys"] == '"LINUX"'
    assert ad["HasFoo"] == "true"
    assert ad["Memory"] == "4096"
    assert int(ad["Disk"]) > 0


def test_check_config_prints_effective_settings(base: Path, queue: str) -> None:
    result = run("check-config", str(write_config(base, queue)))
    assert result.returncode == 0, result.stderr
    assert f"queue = {queue}" in result.stdout
    assert "guest:***@" in result.stdout
    assert "# machine ad" in result.stdout


def test_unreachable_broker_exits_69(base: Path, queue: str) -> None:
    config = write_config(base, queue, broker={"url": "amqp://guest:guest@127.0.0.1:1/", "connect_timeout_s": 2})
    result = subprocess.run([*CAROD, "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 69
    assert "cannot connect to the broker" in result.stderr


def test_unknown_job_user_exits_67(base: Path, queue: str) -> None:
    result = run("--config", str(write_config(base, queue, node={"job_user": "no-such-user-xyz"})))
    assert result.returncode == 67
    assert "no-such-user-xyz" in result.stderr


async def test_submit_seed_job_and_exit_codes(daemon: Daemon, queue: str, base: Path) -> None:
    out = base / "results"
    seed = await asyncio.to_thread(
        run,
        "submit",
        "--queue",
        queue,
        "-a",
        'Out="job.out"',
        "-a",
        'Err="job.err"',
        "-o",
        str(out),
        "--timeout",
        "30",
        "/bin/echo",
        "Hello Grid!",
    )
    assert seed.returncode == 0, seed.stdout + seed.stderr
    assert "Running on" in seed.stdout
    assert "Exited with exit code 0" in seed.stdout
    assert (out / "job.out").read_text() == "Hello Grid!\n"
    assert (base / "results.zip").exists()

    failing = await asyncio.to_thread(
        run, "submit", "--queue", queue, "-o", str(base / "r2"), "/bin/sh", "-c", "exit 3"
    )
    assert failing.returncode == 3
    held = await asyncio.to_thread(run, "submit", "--queue", queue, "-o", str(base / "r3"), "/no/such/cmd")
    assert held.returncode == 125
    assert "Held: " in held.stdout and "does not exist" in held.stdout


async def test_submit_json_and_input_files(daemon: Daemon, queue: str, base: Path) -> None:
    script = base / "hello.sh"
    script.write_text('#!/bin/sh\necho "from input: $(cat data.txt)" > answer\n')
    script.chmod(0o755)
    (base / "data.txt").write_text("42")
    result = await asyncio.to_thread(
        run,
        "submit",
        "--queue",
        queue,
        "--json",
        "-i",
        str(script),
        "-i",
        str(base / "data.txt"),
        "-o",
        str(base / "out"),
        "hello.sh",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events] == ["submitted", "reply", "reply", "results"]
    assert events[1]["JobStatus"] == 2 and events[2]["JobState"] == "Exited"
    assert (base / "out" / "answer").read_text() == "from input: 42\n"


async def test_sigterm_with_no_jobs_exits_zero(daemon: Daemon) -> None:
    assert await daemon.stop() == 0
    assert any("stopped" in line for line in daemon.log)


async def test_sigterm_lets_a_short_job_finish(base: Path, queue: str) -> None:
    daemon = await start_daemon(write_config(base, queue, node={"drain_timeout_s": 20}))
    sub = await Submitter.open(queue)
    try:
        mid = await sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("1")})
        await daemon.wait_for_line("state=running")
        daemon.proc.send_signal(signal.SIGTERM)
        replies = await sub.wait_final(mid)
        assert [r.status for r in replies] == [2, 4]
        assert await daemon.stop() == 0
    finally:
        await sub.close()


async def test_sigterm_past_drain_time_requeues_the_job(base: Path, queue: str) -> None:
    daemon = await start_daemon(write_config(base, queue, node={"drain_timeout_s": 0.5, "kill_grace_s": 1}))
    sub = await Submitter.open(queue)
    try:
        mid = await sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("60")})
        await daemon.wait_for_line("state=running")
        assert await daemon.stop() == 0
        got = sub.replies[mid]
        assert [r.status for r in got] == [2, 1]
        assert "shutting down" in got[-1].headers["LastVacateReason"]
        assert await queue_depth(queue) == 1  # back in the queue for another node
    finally:
        await sub.close()


async def test_second_sigint_forces_exit_and_job_is_not_lost(base: Path, queue: str) -> None:
    daemon = await start_daemon(write_config(base, queue, node={"drain_timeout_s": 60}))
    sub = await Submitter.open(queue)
    try:
        await sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("60")})
        await daemon.wait_for_line("state=running")
        daemon.proc.send_signal(signal.SIGINT)
        await daemon.wait_for_line("shutting down")
        assert await daemon.stop(signal.SIGINT) == 0
        assert await queue_depth(queue) == 1
    finally:
        await sub.close()


def test_prefetch_above_detected_slots_is_refused(base: Path, queue: str) -> None:
    result = run("--config", str(write_config(base, queue, node={"slots": 0}, broker={"prefetch": 4096})))
    assert result.returncode == 78
    assert "[broker] prefetch" in result.stderr


async def test_sighup_reloads_machine_ad_and_start_without_touching_running_jobs(base: Path, queue: str) -> None:
    config = write_config(base, queue, machine={"HasFoo": "FALSE"}, broker={"max_offers": 10000})
    daemon = await start_daemon(config)
    sub = await Submitter.open(queue)
    try:
        long_job = await sub.send({"Cmd": q("/bin/sleep"), "Arguments": q("2")})
        await daemon.wait_for_line("state=running")
        foo_job = await sub.send({"Cmd": q("/bin/true"), "Requirements": "HasFoo"})
        await daemon.wait_for_line("state=declined")
        config.write_text(config.read_text().replace("HasFoo = FALSE", "HasFoo = TRUE"))
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_for_line("SIGHUP: reloaded")
        assert [r.status for r in await sub.wait_final(foo_job)] == [2, 4]
        assert [r.status for r in await sub.wait_final(long_job)] == [2, 4]
        config.write_text(config.read_text().replace("[node]", "[node]\nslotz = 3"))
        daemon.proc.send_signal(signal.SIGHUP)
        line = await daemon.wait_for_line("config not reloaded")
        assert "[node] slotz" in line
        assert (await sub.run({"Cmd": q("/bin/true"), "Requirements": "HasFoo"}))[-1].status == 4
        assert await daemon.stop() == 0
    finally:
        await sub.close()


def test_unusable_state_dir_exits_73(base: Path, queue: str) -> None:
    blocker = base / "file"
    blocker.write_text("not a directory")
    result = run("--config", str(write_config(base, queue, node={"state_dir": blocker / "state"})))
    assert result.returncode == 73
    assert "[node] state_dir" in result.stderr
