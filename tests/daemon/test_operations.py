"""What an operator sees of a running daemon: metrics, logs and the command line (q, rm, submit --follow)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    BROKER_URL,
    CAROD,
    Submitter,
    needs_ctl,
    q,
    queue_depth,
    rabbitmqctl,
    start_daemon,
    start_node,
    wait_consumed,
    write_config,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_are_scraped_over_http(base: Path, queue: str, submitter: Submitter) -> None:
    port = free_port()
    daemon = await start_daemon(write_config(base, queue, metrics={"port": port}))
    try:
        assert (await submitter.run({"Cmd": q("/bin/echo"), "Arguments": q("hi")}))[-1].status == 4
        held = await submitter.run({"Cmd": q("/no/such/program")})
        assert held[-1].status == 5 and held[-1].headers["HoldReasonCode"] == 6
        m = await asyncio.to_thread(scrape, port)
    finally:
        assert await daemon.stop() == 0
    assert m["carod_jobs_received_total", ()] == 2
    assert m["carod_jobs_started_total", ()] == 1
    assert m["carod_jobs_completed_total", ()] == 1
    assert m["carod_jobs_held_total", (("code", "failed_to_create_process"),)] == 1
    assert m["carod_job_start_latency_seconds_count", ()] == 1
    assert 0 < m["carod_job_start_latency_seconds_sum", ()] < 10
    assert m["carod_job_run_seconds_count", ()] == 1
    assert m["carod_slots", ()] == 2 and m["carod_slots_busy", ()] == 0
    assert m["carod_cpus_busy", ()] == 0 and m["carod_memory_busy_mib", ()] == 0
    assert m["carod_outbox_depth", ()] == 0
    assert m["carod_broker_connected", ()] == 1 and m["carod_draining", ()] == 0
    assert m["carod_broker_reconnects_total", ()] == 0
    assert any("metrics: http://127.0.0.1:" in line for line in daemon.log)


async def test_metrics_port_taken_is_a_config_error(base: Path, queue: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *CAROD,
            "--config",
            str(write_config(base, queue, metrics={"port": port})),
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "CAROD_BROKER_URL": BROKER_URL},
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 78
    assert f"[metrics] port: cannot listen on 127.0.0.1:{port}" in err.decode()


async def test_log_level_from_sighup_and_json_lines(base: Path, queue: str, submitter: Submitter) -> None:
    config = write_config(base, queue, node={"log_level": "WARNING", "log_format": "json"})
    daemon = await start_daemon(config, ready=None)  # WARNING: no "ready" line
    try:
        await wait_consumed(queue)
        quiet = await submitter.send({"Cmd": q("/bin/true")})
        await submitter.wait_final(quiet)
        config.write_text(config.read_text().replace("log_level = WARNING", "log_level = INFO"))
        daemon.proc.send_signal(signal.SIGHUP)
        await daemon.wait_for_line("SIGHUP: reloaded")
        loud = await submitter.send({"Cmd": q("/bin/echo"), "Arguments": q("hi")})
        await submitter.wait_final(loud)
        await daemon.wait_for_line('"job_state": "exited"')
    finally:
        assert await daemon.stop() == 0
    entries = [json.loads(line) for line in "".join(daemon.log).splitlines() if line.strip()]
    jobs = [e for e in entries if "job_state" in e]
    assert not [e for e in jobs if e["message_id"] == quiet]  # WARNING: no job lines
    states = [e["job_state"] for e in jobs if e["message_id"] == loud]
    assert states == ["received", "running", "exited"]
    exited = next(e for e in jobs if e["job_state"] == "exited")
    assert exited["exit_code"] == 0 and exited["level"] == "INFO" and exited["elapsed_s"] > 0


async def carod(*args: str, timeout_s: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CAROD,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CAROD_BROKER_URL": BROKER_URL},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_submit_follow_q_and_rm_from_the_command_line(base: Path, queue: str) -> None:
    config = write_config(base, queue, node={"stream_interval_s": 0.05})
    daemon = await start_daemon(config)
    try:
        # --follow prints the job's output as it comes; --json one object per event.
        code, out, err = await carod(
            "submit", "--queue", queue, "--json", "--follow", "-o", str(base / "res"),
            "/bin/sh", "-c", "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three",
        )  # fmt: skip
        assert code == 0, err
        events = [json.loads(line) for line in out.splitlines()]
        output = [(e["stream"], e["data"]) for e in events if e["event"] == "output"]
        assert "".join(d for s, d in output if s == "stdout") == "one\nthree\n"
        assert "".join(d for s, d in output if s == "stderr") == "two\n"
        kinds = [e["event"] for e in events]
        assert kinds.index("output") < max(i for i, e in enumerate(events) if e.get("JobStatus") == 4)
        assert (base / "res" / "_condor_stdout").read_text() == "one\nthree\n"

        # A long job: carod q lists it, carod rm removes it, the submitter sees Removed.
        submit = await asyncio.create_subprocess_exec(
            *CAROD, "submit", "--queue", queue, "--json", "/bin/sleep", "300",
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "CAROD_BROKER_URL": BROKER_URL},
        )  # fmt: skip
        assert submit.stdout is not None
        mid = json.loads(await submit.stdout.readline())["message_id"]
        while json.loads(await asyncio.wait_for(submit.stdout.readline(), 30)).get("JobStatus") != 2:
            pass
        code, out, err = await carod("q", "--queue", queue)
        assert code == 0, err
        line = next(line for line in out.splitlines() if line.startswith(f" {mid} "))
        assert line.endswith(" R   128.0 /bin/sleep") and " 0+00:00:0" in line
        assert out.splitlines()[-1] == "1 jobs; 0 idle, 1 running, 0 held"
        code, out, err = await carod("q", "--queue", queue, "--json")
        assert [json.loads(x)["message_id"] for x in out.splitlines()] == [mid]

        code, out, err = await carod("rm", "--reason", "testing rm", mid)
        assert code == 0, err
        assert out.strip().startswith(f"{mid}: removed on ") and "(running)" in out
        rest, _ = await asyncio.wait_for(submit.communicate(), 30)
        assert submit.returncode == 125  # not completed: Held or Removed
        final = json.loads(rest.decode().splitlines()[-1])
        assert final["JobStatus"] == 3 and "testing rm" in final["RemoveReason"]

        code, out, err = await carod("rm", "--wait", "0.5", "no-such-job")
        assert code == 1 and "no node has it now" in err
    finally:
        assert await daemon.stop() == 0
    assert await queue_depth(queue) == 0


async def test_check_config_names_new_keys(base: Path) -> None:
    bad = base / "bad.conf"
    bad.write_text("[metrics]\nport = 70000\n")
    code, _, err = await carod("check-config", str(bad))
    assert code == 78 and "[metrics] port" in err
    bad.write_text("[node]\nstream_rate_kib_s = 0\n")
    code, _, err = await carod("check-config", str(bad))
    assert code == 78 and "[node] stream_rate_kib_s" in err
    good = base / "good.conf"
    good.write_text("[metrics]\nport = 9100\n")
    code, out, err = await carod("check-config", str(good))
    assert code == 0, err
    assert "[metrics]\nport = 9100\naddress = 127.0.0.1\n" in out and "update_interval_s = 30.0" in out


async def test_a_scrape_fails_while_the_event_loop_is_stuck(queue: str, base: Path) -> None:
    port = free_port()
    running = await start_node(queue, base, metrics={"port": port})
    try:
        running.server.metrics.scrape_timeout_s = 0.3
        assert (await asyncio.to_thread(scrape, port))["carod_broker_connected", ()] == 1
        # Block carod's loop (this test's own) while a thread scrapes: 503, not a hang, not a traceback.
        codes: list[int] = []
        scraper = threading.Thread(target=lambda: codes.append(status_of(port)))
        scraper.start()  # the loop is blocked from here until the scrape has its answer
        scraper.join(timeout=30)
        assert codes == [503]
        assert (await asyncio.to_thread(scrape, port))["carod_slots", ()] == 2  # and it answers again
    finally:
        await running.stop()


def status_of(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@needs_ctl
async def test_reconnects_are_counted(base: Path, queue: str) -> None:
    port = free_port()
    daemon = await start_daemon(write_config(base, queue, metrics={"port": port}))
    try:
        await asyncio.to_thread(rabbitmqctl, "close_all_connections", "carod metrics test")
        await daemon.wait_for_line("reconnected to the broker")
        durable = await Submitter.open(queue)
        try:  # it consumes again, and says so
            assert (await durable.run({"Cmd": q("/bin/true")}))[-1].status == 4
        finally:
            await durable.close()
        m = await asyncio.to_thread(scrape, port)
    finally:
        assert await daemon.stop() == 0
    assert m["carod_broker_reconnects_total", ()] >= 1
    assert m["carod_broker_connected", ()] == 1
