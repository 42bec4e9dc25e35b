"""Soak: 1,000+ jobs through two carod processes while faults are injected at random.

Two daemons (separate state and sandbox directories, one job queue) run short
jobs; a driver meanwhile kills one of them (-9 or SIGTERM) and restarts it,
closes every broker connection, or stops and restarts the broker's app. At
the end every job must have exactly one final reply at its submitter and none
may be lost. Jobs that ran more than once (a job interrupted on one node may
run again there or on the other node) are counted and reported, not asserted:
at-least-once execution is the contract, exactly-once answering is.

Each job records every start (its pid and its sandbox, which names the node)
in a world-writable ``runs`` directory, as in test_reliability.py.

Knobs (environment): ``CAROD_SOAK_SEED`` replays a fault schedule,
``CAROD_SOAK_JOBS`` changes the job count (default 1000), ``CAROD_SOAK_REPORT``
is a path where the JSON report is copied (it is always written to the test's
base directory, which is removed afterwards), ``CAROD_SOAK_KEEP`` a directory
where the carod logs, journals and start records are copied.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.helpers import BROKER_URL, CAROD, Reply, Submitter, q, write_config

RABBITMQCTL = shutil.which("rabbitmqctl") or (
    "/usr/sbin/rabbitmqctl" if os.path.exists("/usr/sbin/rabbitmqctl") else None
)

NODES = ("n1", "n2")
FAULT_KINDS = ("kill9_restart", "close_all_connections", "broker_stop_start", "sigterm_restart")
MAX_FAULTS = 20
FAULT_WINDOW_S = 8 * 60  # no fault is injected after this
ANSWER_DEADLINE_S = 10 * 60  # every final reply must have arrived by then
JOB_SECONDS = 0.2


def rabbitmqctl(*args: str) -> None:
    assert RABBITMQCTL is not None
    subprocess.run([RABBITMQCTL, *args], check=True, capture_output=True, timeout=120)


@dataclass
class BrokerGuard:
    """Set while a ``stop_app`` may be in force; teardown then restarts the app."""

    maybe_stopped: bool = False


@pytest.fixture
def broker_guard() -> Iterator[BrokerGuard]:
    guard = BrokerGuard()
    yield guard
    if guard.maybe_stopped:
        rabbitmqctl("start_app")


# ---------------------------------------------------------------- carod processes


@dataclass
class Carod:
    """A carod process whose stderr goes to a file (never a pipe nobody drains)."""

    name: str
    config: Path
    log_path: Path
    proc: asyncio.subprocess.Process

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 90) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


async def start_carod(name: str, config: Path, log_path: Path, timeout_s: float = 30) -> Carod:
    """Start carod on ``config``, appending its output to ``log_path``; return once it logs ready."""
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as log:
        log.write(f"==== soak: starting carod {name} at {time.strftime('%H:%M:%S')} ====\n".encode())
        log.flush()
        proc = await asyncio.create_subprocess_exec(
            *CAROD,
            "--config",
            str(config),
            stdout=log,
            stderr=log,
            env={**os.environ, "CAROD_BROKER_URL": BROKER_URL},
        )
    daemon = Carod(name, config, log_path, proc)
    deadline = time.monotonic() + timeout_s
    while True:
        with log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        if " ready: " in text:
            return daemon
        if proc.returncode is not None or time.monotonic() > deadline:
            await daemon.kill()
            raise AssertionError(f"carod {name} did not become ready (exit {proc.returncode}):\n{text}")
        await asyncio.sleep(0.05)


async def broker_answers(timeout_s: float = 60) -> None:
    """Return once a fresh AMQP connection succeeds (after start_app)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connection = await aio_pika.connect(BROKER_URL, timeout=5)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        else:
            await connection.close()
            return


# ---------------------------------------------------------------- jobs


def counting_job(runs: Path, seconds: float) -> tuple[dict[str, object], str]:
    """A job that records each start (pid and sandbox, i.e. node) and then sleeps."""
    marker = f"soak-{uuid.uuid4().hex}"
    script = f"echo $$ $PWD >> {runs}/{marker}; sleep {seconds}"
    return {"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'")}, marker


def start_records(runs: Path, marker: str) -> list[str]:
    """The node (n1/n2/?) of every recorded start of a job."""
    path = runs / marker
    if not path.exists():
        return []
    nodes = []
    for line in path.read_text().splitlines():
        where = line.split(maxsplit=1)[1] if " " in line else ""
        nodes.append(next((n for n in NODES if f"/{n}/" in where), "?"))
    return nodes


def reply_summary(reply: Reply) -> dict[str, Any]:
    keys = ("JobStatus", "JobRunCount", "RemoteHost", "ExitCode", "HoldReason", "HoldReasonCode", "Sequence")
    return {k: reply.headers.get(k) for k in keys if k in reply.headers}


def held_for_restarts(reply: Reply) -> bool:
    reason = str(reply.headers.get("HoldReason", ""))
    return reply.status == 5 and "the job was started" in reason and "max_attempts" in reason


def log_lines(logs: dict[str, Path], needle: str) -> list[str]:
    found = []
    for name, path in logs.items():
        if path.exists():
            found += [f"[{name}] {line}" for line in path.read_text(errors="replace").splitlines() if needle in line]
    return found


# ---------------------------------------------------------------- the soak


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(RABBITMQCTL is None, reason="rabbitmqctl is not installed: cannot inject broker faults")
async def test_soak_two_nodes_random_faults_every_job_answered_once(
    base: Path, queue: str, broker_guard: BrokerGuard, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("CAROD_SOAK_SEED") or random.SystemRandom().randrange(2**32))
    n_jobs = int(os.environ.get("CAROD_SOAK_JOBS") or 1000)
    rng = random.Random(seed)  # noqa: S311 - a replayable fault schedule, not cryptography
    with capsys.disabled():
        print(f"\nsoak: seed={seed} jobs={n_jobs} (replay with CAROD_SOAK_SEED={seed})", flush=True)

    runs = base / "runs"
    runs.mkdir()
    os.chmod(runs, 0o1777)  # noqa: S103 - jobs (as nobody) record their starts here
    configs: dict[str, Path] = {}
    logs: dict[str, Path] = {}
    for name in NODES:
        home = base / name
        home.mkdir()
        os.chmod(home, 0o711)  # noqa: S103 - the job user must traverse it to its sandbox
        configs[name] = write_config(
            home,
            queue,
            node={"slots": 2, "name": f"soak-{name}-{uuid.uuid4().hex[:6]}"},
            sandbox={"isolation": "none"},  # jobs record their starts outside their sandbox
        )
        logs[name] = base / f"{name}.log"

    t0 = time.monotonic()
    faults: list[dict[str, Any]] = []
    problems: list[str] = []  # carod misbehaviour seen by the driver (e.g. SIGTERM exit != 0)
    daemons: dict[str, Carod] = {}
    sub = await Submitter.open(queue, durable=True)
    try:
        for name in NODES:  # they declare the job queue, so they start before anything is sent
            daemons[name] = await start_carod(name, configs[name], logs[name])

        jobs: dict[str, str] = {}  # message_id -> marker
        for _ in range(n_jobs):
            headers, marker = counting_job(runs, JOB_SECONDS)
            mid = await sub.send(headers)
            assert mid is not None
            jobs[mid] = marker
        submitted_s = time.monotonic() - t0
        waiting = set(jobs)

        def all_answered() -> bool:
            waiting.difference_update([mid for mid in waiting if sub.finals(mid)])
            return not waiting

        async def restart(name: str) -> None:
            daemons[name] = await start_carod(name, configs[name], logs[name])

        async def inject(kind: str, name: str) -> str:
            daemon = daemons[name]
            if kind == "kill9_restart":
                await daemon.kill()
                await restart(name)
                return f"{name} killed (-9) and restarted"
            if kind == "sigterm_restart":
                rc = await daemon.stop(signal.SIGTERM)
                if rc != 0:
                    problems.append(f"{name}: SIGTERM exit code {rc} (expected 0)")
                await restart(name)
                return f"{name} SIGTERM exit {rc}, restarted"
            if kind == "close_all_connections":
                await asyncio.to_thread(rabbitmqctl, "close_all_connections", "carod soak fault")
                return "all connections closed"
            broker_guard.maybe_stopped = True
            try:
                await asyncio.to_thread(rabbitmqctl, "stop_app")
                await asyncio.sleep(1.0)
            finally:
                await asyncio.to_thread(rabbitmqctl, "start_app")
                broker_guard.maybe_stopped = False
            await broker_answers()
            return "broker app stopped ~1s and started"

        async def drive_faults() -> None:
            while len(faults) < MAX_FAULTS and time.monotonic() - t0 < FAULT_WINDOW_S:
                await asyncio.sleep(rng.uniform(1.5, 4.0))
                if all_answered():
                    return
                kind, name = rng.choice(FAULT_KINDS), rng.choice(NODES)
                at = time.monotonic() - t0
                fault: dict[str, Any] = {
                    "at_s": round(at, 2),
                    "wall": time.strftime("%H:%M:%S"),
                    "kind": kind,
                    "answered_before": n_jobs - len(waiting),
                }
                faults.append(fault)
                fault["what"] = await inject(kind, name)
                fault["took_s"] = round(time.monotonic() - t0 - at, 2)
                for node in NODES:  # mark the fault in both logs, to line evidence up
                    with logs[node].open("a") as log:
                        log.write(f"==== soak fault #{len(faults)} at {fault['wall']}: {fault['what']} ====\n")

        await drive_faults()
        faults_done_s = time.monotonic() - t0
        while not all_answered() and time.monotonic() - t0 < ANSWER_DEADLINE_S:
            await asyncio.sleep(0.2)  # polling for completion; every check is exact
        answered_s = time.monotonic() - t0

        codes = await asyncio.gather(*(daemons[name].stop(signal.SIGTERM) for name in NODES))
        for name, rc in zip(NODES, codes, strict=True):
            if rc != 0:
                problems.append(f"{name}: final SIGTERM exit code {rc} (expected 0)")
        await sub.sync(timeout_s=60)
        elapsed_s = time.monotonic() - t0

        # ------------------------------------------------------------ verdict
        violations: list[str] = []
        evidence: dict[str, Any] = {}
        held: list[dict[str, Any]] = []
        run_nodes: dict[str, list[str]] = {}
        for mid, marker in jobs.items():
            finals = sub.finals(mid)
            run_nodes[mid] = start_records(runs, marker)
            bad = None
            if not finals:
                bad = "lost: no final reply"
            elif len(finals) > 1:
                bad = f"{len(finals)} final replies"
            elif finals[0].status == 4:
                if finals[0].headers.get("ExitCode") != 0:
                    bad = f"Completed with ExitCode {finals[0].headers.get('ExitCode')}"
            elif held_for_restarts(finals[0]):
                held.append({"message_id": mid, "reply": reply_summary(finals[0])})
            else:
                bad = f"unexpected final reply {reply_summary(finals[0])}"
            if bad is not None:
                violations.append(f"{mid}: {bad}")
                evidence[mid] = {
                    "problem": bad,
                    "replies": [reply_summary(r) for r in sub.replies.get(mid, [])],
                    "starts_on": run_nodes[mid],
                    "log": log_lines(logs, mid)[:40],
                }

        executions = {mid: len(nodes) for mid, nodes in run_nodes.items()}
        duplicated = {mid: nodes for mid, nodes in run_nodes.items() if len(nodes) > 1}
        cross_node = [mid for mid, nodes in duplicated.items() if len(set(nodes)) > 1]
        never_ran = [mid for mid, n in executions.items() if n == 0]
        for mid in never_ran:
            finals = sub.finals(mid)
            if finals and finals[0].status == 4:
                violations.append(f"{mid}: Completed but its command never recorded a start")
        internal_errors = len(log_lines(logs, "internal error"))
        # carod's own ERROR lines (aio-pika logs tracebacks of every forced connection close: noise)
        error_lines = log_lines(logs, " ERROR carod") + log_lines(logs, " CRITICAL carod")
        report = {
            "seed": seed,
            "jobs": n_jobs,
            "answered_once": sum(1 for mid in jobs if len(sub.finals(mid)) == 1),
            "completed": sum(1 for mid in jobs if [r.status for r in sub.finals(mid)] == [4]),
            "held_started_too_many_times": held,
            "lost": [mid for mid in jobs if not sub.finals(mid)],
            "multiple_finals": {mid: len(sub.finals(mid)) for mid in jobs if len(sub.finals(mid)) > 1},
            "faults_total": len(faults),
            "faults_by_kind": dict(Counter(f["kind"] for f in faults)),
            "faults": faults,
            "executions_total": sum(executions.values()),
            "duplicate_executions": {
                "jobs_started_more_than_once": len(duplicated),
                "extra_runs": sum(len(nodes) - 1 for nodes in duplicated.values()),
                "jobs_run_on_both_nodes": len(cross_node),
                "max_starts_of_one_job": max(executions.values(), default=0),
                "examples": dict(list(duplicated.items())[:10]),
            },
            "executions_by_node": dict(Counter(node for nodes in run_nodes.values() for node in nodes)),
            "carod_log_internal_errors": internal_errors,
            "carod_log_error_lines": error_lines[:20],
            "problems": problems,
            "violations": violations,
            "evidence": dict(list(evidence.items())[:10]),
            "timing_s": {
                "submitted": round(submitted_s, 1),
                "faults_done": round(faults_done_s, 1),
                "all_answered": round(answered_s, 1),
                "total": round(elapsed_s, 1),
            },
        }
        text = json.dumps(report, indent=2, default=str)
        (base / "soak-report.json").write_text(text)
        if os.environ.get("CAROD_SOAK_REPORT"):
            Path(os.environ["CAROD_SOAK_REPORT"]).write_text(text)
        dup = report["duplicate_executions"]
        with capsys.disabled():
            print(
                f"soak: seed={seed} jobs={n_jobs} answered_once={report['answered_once']} "
                f"completed={report['completed']} held(started too many times)={len(held)} "
                f"lost={len(report['lost'])} multiple_finals={len(report['multiple_finals'])}\n"
                f"soak: faults={len(faults)} by kind {report['faults_by_kind']}\n"
                f"soak: duplicate executions: {dup['jobs_started_more_than_once']} job(s) started more than once "
                f"({dup['extra_runs']} extra run(s), {dup['jobs_run_on_both_nodes']} on both nodes); "
                f"executions by node {report['executions_by_node']}\n"
                f"soak: carod logged {internal_errors} internal error(s), {len(error_lines)} ERROR line(s); "
                f"problems {problems}\n"
                f"soak: timing {report['timing_s']}",
                flush=True,
            )
            if violations or problems:
                print(f"soak: full report:\n{text}", flush=True)

        assert not problems, "carod misbehaved under faults:\n" + "\n".join(problems)
        assert not violations, (
            f"{len(violations)} job(s) not answered exactly once and successfully (seed {seed}):\n"
            + "\n".join(violations[:50])
            + "\nevidence:\n"
            + json.dumps(report["evidence"], indent=2, default=str)
            + "\nfaults:\n"
            + json.dumps(faults, indent=2)
        )
    finally:
        if broker_guard.maybe_stopped:
            await asyncio.to_thread(rabbitmqctl, "start_app")
            broker_guard.maybe_stopped = False
            await broker_answers()
        for daemon in daemons.values():
            # SIGTERM, so that carod removes its cgroup parent directories on the way out
            try:
                await daemon.stop(timeout_s=60)
            except TimeoutError:
                await daemon.kill()
        await sub.close()
        if os.environ.get("CAROD_SOAK_KEEP"):  # logs, journals and start records, for a post-mortem
            shutil.copytree(
                base, os.environ["CAROD_SOAK_KEEP"], dirs_exist_ok=True, ignore=shutil.ignore_patterns("sandboxes")
            )
