"""Runs INSIDE the test VM (tests/vm): carod's own unit under systemd 252 with cgroup v2.

The guest's carod-vm-entry.service runs guest/run, which runs this with the copy of carod and its
libraries (/opt/carod, a read-only disk) on PYTHONPATH. It plays the submitter (jobs through the host's broker, the
guest's only way out) and the operator (systemctl start, reload, SIGSTOP, stop), and writes what
it saw to out/results.json after every scenario; the host's tests (tests/vm/test_systemd_cgroup2.py)
assert on that file. It asserts nothing itself: a scenario that goes wrong is recorded as it went.

Standard library and aio_pika only (no pytest, no tests.helpers in the guest).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

SHARE = Path(os.environ.get("CAROD_VM_SHARE", "/mnt/carod"))
OUT = SHARE / "out"
PARAMS: dict[str, Any] = json.loads((SHARE / "params.json").read_text())
CONFIG = Path("/etc/carod/carod.conf")
CGROOT = Path("/sys/fs/cgroup")
FINAL = (3, 4, 5)
NOBODY = 65534

results: dict[str, Any] = {"started": time.time()}


def record(scenario: str, **facts: Any) -> None:
    """Add facts to a scenario and rewrite results.json (synced: the guest may be cut off after)."""
    results.setdefault(scenario, {}).update(facts)
    tmp = OUT / "results.json.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, OUT / "results.json")


def say(text: str) -> None:
    print(f"[driver {time.monotonic():8.1f}] {text}", flush=True)


def q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sh_job(script: str, **attrs: Any) -> dict[str, Any]:
    return {"Cmd": q("/bin/sh"), "Arguments": q(f"-c '{script}'"), "Out": q("out"), "Err": q("err"), **attrs}


def config_text(reload_mark: int) -> str:
    p = PARAMS
    return f"""[broker]
url = {p["broker_url"]}
queue = {p["queue"]}
binding_key = {p["queue"]}-key
unmatched_delay_s = 0.5
[node]
name = vm-node
slots = 2
drain_timeout_s = 40
kill_grace_s = 5
[sandbox]
max_job_pids = {p["max_job_pids"]}
disk_quota = none
check_interval_s = 1
[pool]
exchange = {p["exchange"]}
[machine]
VmReload = {reload_mark}
"""


async def run(*args: str, timeout_s: float = 300) -> tuple[int, str]:
    """A command's exit status and output (stdout and stderr), without blocking the loop."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    return proc.returncode or 0, out.decode(errors="replace")


async def show(*props: str) -> dict[str, str]:
    _, out = await run("systemctl", "show", "carod.service", *(f"--property={p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


async def journal(grep: str = "") -> list[str]:
    _, out = await run("journalctl", "--no-pager", "-o", "cat", "-u", "carod.service")
    return [line for line in out.splitlines() if grep in line]


def read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def procs_with(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and str(os.getpid()) != entry.name:
                pids.append(int(entry.name))
    return pids


def uid_of(pid: int) -> int | None:
    status = read(Path(f"/proc/{pid}/status")) or ""
    found = re.search(r"^Uid:\s+(\d+)", status, re.M)
    return int(found.group(1)) if found else None


def cgroup_of(pid: int) -> str | None:
    text = read(Path(f"/proc/{pid}/cgroup")) or ""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def procs_of_uid(uid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and uid_of(int(p.name)) == uid]


def procs_in_tree(top: Path) -> dict[str, list[str]]:
    """Every non-empty cgroup.procs under ``top`` (a cgroup directory)."""
    found: dict[str, list[str]] = {}
    if not top.is_dir():
        return found
    for directory, _, files in os.walk(top):
        if "cgroup.procs" in files:
            procs = (read(Path(directory) / "cgroup.procs") or "").split()
            if procs:
                found[str(Path(directory).relative_to(CGROOT))] = procs
    return found


class Submitter:
    """Jobs to the node's queue; every reply, on an exclusive queue of its own."""

    def __init__(self) -> None:
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.arrived = asyncio.Event()

    async def open(self) -> None:
        self.connection = await aio_pika.connect(PARAMS["broker_url"], timeout=30)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.reply_queue = await self.channel.declare_queue(
            f"test-vm-replies-{uuid.uuid4().hex[:10]}", exclusive=True, auto_delete=True
        )
        await self.reply_queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        headers = {k: v for k, v in (message.headers or {}).items() if isinstance(v, int | float | str | bool)}
        headers["_at"] = time.monotonic()
        self.replies.setdefault(message.correlation_id or "", []).append(headers)
        self.arrived.set()

    async def send(self, headers: dict[str, Any]) -> str:
        mid = str(uuid.uuid4())
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                b"",
                headers=headers,
                message_id=mid,
                reply_to=self.reply_queue.name,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            PARAMS["queue"],
        )
        return mid

    def statuses(self, mid: str) -> list[int]:
        return [int(r.get("JobStatus", 0)) for r in self.replies.get(mid, [])]

    def final(self, mid: str) -> dict[str, Any] | None:
        finals = [r for r in self.replies.get(mid, []) if int(r.get("JobStatus", 0)) in FINAL]
        return finals[-1] if finals else None

    async def wait(self, mid: str, statuses: tuple[int, ...], timeout_s: float) -> bool:
        """Until a reply with one of ``statuses`` came for ``mid``; False after ``timeout_s``."""

        async def arrived() -> None:
            while not any(s in statuses for s in self.statuses(mid)):
                self.arrived.clear()
                await self.arrived.wait()

        try:
            await asyncio.wait_for(arrived(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def consumers(self) -> int:
        queue = await self.channel.declare_queue(PARAMS["queue"], passive=True)
        result = queue.declaration_result
        return int(result.consumer_count or 0)

    async def close(self) -> None:
        await self.connection.close()


async def wait_for_procs(marker: str, timeout_s: float = 60, comm: str | None = None) -> list[int]:
    """PIDs whose command line has ``marker`` (and whose name is ``comm``), once there are some."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [p for p in procs_with(marker) if comm is None or read(Path(f"/proc/{p}/comm")) == comm]
        if pids:
            return pids
        await asyncio.sleep(0.1)
    return []


async def reachable(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port opens within a few seconds."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def environment() -> None:
    _, fs = await run("stat", "-fc", "%T", str(CGROOT))
    _, version = await run("systemctl", "--version")
    # The forward to the host's broker, and what restrict=on must refuse: the host itself through
    # QEMU's gateway (its broker and ssh ports), and anything beyond.
    targets = [("10.0.2.100", int(PARAMS["broker_port"])), ("10.0.2.2", 5672), ("10.0.2.2", 22), ("1.1.1.1", 443)]
    # The boot is not finished (this runs in a unit of it): systemd-analyze cannot say yet.
    _, boot = await run("journalctl", "-b", "-o", "short-monotonic", "--no-pager", "-t", "systemd")
    (OUT / "boot.txt").write_text(boot)
    opened = await asyncio.gather(*(reachable(host, port) for host, port in targets))
    record(
        "environment",
        cgroup_fs=fs.strip(),
        controllers=(read(CGROOT / "cgroup.controllers") or "").split(),
        systemd=version.splitlines()[0] if version else "",
        kernel=os.uname().release,
        pid1=read(Path("/proc/1/comm")),
        uptime_s=float((read(Path("/proc/uptime")) or "0").split()[0]),
        reachable={f"{host}:{port}": ok for (host, port), ok in zip(targets, opened, strict=True)},
        dropins=(await show("DropInPaths"))["DropInPaths"],
    )


async def ready(sub: Submitter) -> dict[str, str]:
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    CONFIG.write_text(config_text(1))
    began = time.monotonic()
    code, out = await run("systemctl", "start", "carod.service")
    took = time.monotonic() - began
    # Type=notify: start returns once carod said READY=1. It must consume by then.
    consumers = await sub.consumers()
    state = await show("ActiveState", "SubState", "StatusText", "MainPID", "ControlGroup", "NRestarts", "WatchdogUSec")
    service = CGROOT / state["ControlGroup"].lstrip("/")
    record(
        "ready",
        start_rc=code,
        start_output=out,
        start_s=round(took, 1),
        consumers_at_ready=consumers,
        show=state,
        service_cgroup=state["ControlGroup"],
        service_subtree_control=(read(service / "cgroup.subtree_control") or "").split(),
        service_children=sorted(p.name for p in service.iterdir() if p.is_dir()) if service.is_dir() else [],
        carod_cgroup=cgroup_of(int(state["MainPID"])) if state["MainPID"] != "0" else None,
        startup_log=[line for line in await journal() if "cgroup" in line or "ready" in line.lower()][-10:],
    )
    return state


async def reload(sub: Submitter, main_pid: str) -> None:
    # A job only the reloaded machine ad matches: declined (and parked) until the reload.
    job = {"Cmd": q("/bin/echo"), "Arguments": q("reloaded"), "Out": q("out"), "Requirements": "TARGET.VmReload == 2"}
    mid = await sub.send(job)
    await asyncio.sleep(5)
    before = sub.statuses(mid)
    CONFIG.write_text(config_text(2))
    code, out = await run("systemctl", "reload", "carod.service")
    ran = await sub.wait(mid, FINAL, 300)
    record(
        "reload",
        mid=mid,
        statuses_before_reload=before,
        reload_rc=code,
        reload_output=out,
        final=sub.final(mid),
        finished=ran,
        main_pid_before=main_pid,
        main_pid_after=(await show("MainPID"))["MainPID"],
        log=await journal("SIGHUP"),
    )


async def limits(sub: Submitter, service_cgroup: str) -> None:
    # A job's cgroup, its limits, its user, seen from outside while it runs.
    marker = "7.25"
    mid = await sub.send(sh_job(f"sleep {marker}", RequestMemory=100, RequestCpus=1))
    running = await sub.wait(mid, (2, *FINAL), 180)
    pids = await wait_for_procs(f"sleep {marker}", comm="sleep")
    facts: dict[str, Any] = {"mid": mid, "running": running, "pids": pids}
    if pids:
        group = cgroup_of(pids[0]) or ""
        path = CGROOT / group.lstrip("/")
        facts.update(
            cgroup=group,
            uid=uid_of(pids[0]),
            under_service=group.startswith(service_cgroup + "/"),
            memory_max=read(path / "memory.max"),
            pids_max=read(path / "pids.max"),
            cpu_max=read(path / "cpu.max"),
            controllers=(read(path / "cgroup.controllers") or "").split(),
            parent_subtree_control=(read(path.parent / "cgroup.subtree_control") or "").split(),
        )
    await sub.wait(mid, FINAL, 300)
    facts["final"] = sub.final(mid)
    record("job_cgroup", **facts)

    # Over its RequestMemory: the kernel's OOM killer in the job's cgroup, Held with code 34.
    say("memory hog")
    hog = sh_job('python3 -c "s = b\\"x\\" * (300 << 20); print(len(s))"', RequestMemory=64)
    mid = await sub.send(hog)
    await sub.wait(mid, FINAL, 300)
    _, dmesg = await run("dmesg")
    record(
        "memory",
        mid=mid,
        final=sub.final(mid),
        oom_in_kernel_log=[line for line in dmesg.splitlines() if "oom" in line.lower()][-4:],
    )

    # A fork bomb: pids.max stops it in its cgroup; the wall-clock limit ends it; the node goes on.
    say("fork bomb")
    bomb = sh_job("f() { f | f & }; f; sleep 60 # vmbomb", AllowedExecuteDuration=20)
    mid = await sub.send(bomb)
    pids = await wait_for_procs("vmbomb", 60)
    bomb_group = cgroup_of(pids[0]) if pids else None
    path = CGROOT / (bomb_group or "/nonexistent").lstrip("/")
    peak_current = 0
    peak_bomb = 0
    pids_events = None
    pids_max = read(path / "pids.max")
    deadline = time.monotonic() + 300
    while sub.final(mid) is None and time.monotonic() < deadline:
        current = read(path / "pids.current")
        if current is not None:
            peak_current = max(peak_current, int(current))
            pids_events = read(path / "pids.events") or pids_events
        peak_bomb = max(peak_bomb, len(procs_with("vmbomb")))
        await asyncio.sleep(0.5)
    await asyncio.sleep(1)  # carod's kill is done before its final reply; this only lets /proc settle
    record(
        "fork_bomb",
        mid=mid,
        cgroup=bomb_group,
        under_service=bool(bomb_group and bomb_group.startswith(service_cgroup + "/")),
        pids_max=pids_max,
        peak_pids_current=peak_current,
        peak_bomb_processes=peak_bomb,
        pids_events=pids_events,
        final=sub.final(mid),
        bomb_left=procs_with("vmbomb"),
        bomb_cgroup_procs=read(path / "cgroup.procs"),
    )
    mid = await sub.send({"Cmd": q("/bin/echo"), "Arguments": q("still here"), "Out": q("out")})
    await sub.wait(mid, FINAL, 300)
    record("after_bomb", mid=mid, final=sub.final(mid))


async def watchdog(sub: Submitter) -> None:
    """A carod whose loop is stuck (SIGSTOP) with a job running: systemd's watchdog restarts it."""
    marker = "12.5"
    mid = await sub.send(sh_job(f"sleep {marker}"))
    await sub.wait(mid, (2, *FINAL), 180)
    job_pids = await wait_for_procs(f"sleep {marker}", comm="sleep")
    before = await show("MainPID", "NRestarts")
    stopped_at = time.monotonic()
    os.kill(int(before["MainPID"]), 19)  # SIGSTOP: the event loop, and its WATCHDOG=1, stop
    restarted_after = None
    state: dict[str, str] = {}
    while time.monotonic() - stopped_at < 480:  # WatchdogSec, RestartSec, and a start that is slow here
        state = await show("MainPID", "NRestarts", "ActiveState", "SubState")
        if state["NRestarts"] != before["NRestarts"] and state["ActiveState"] == "active":
            restarted_after = round(time.monotonic() - stopped_at, 1)
            break
        await asyncio.sleep(1)
    finished = await sub.wait(mid, FINAL, 300)
    record(
        "watchdog",
        mid=mid,
        before=before,
        after=state,
        restarted_after_s=restarted_after,
        old_job_pids=job_pids,
        old_job_pids_alive=[p for p in job_pids if Path(f"/proc/{p}").exists() and uid_of(p) == NOBODY],
        finished=finished,
        statuses=sub.statuses(mid),
        final=sub.final(mid),
        log=[line for line in await journal() if "atchdog" in line or "recover" in line.lower()][-12:],
    )


async def drain(sub: Submitter) -> None:
    """``systemctl stop`` with a job running: it finishes and is answered before carod exits."""
    marker = "9.5"
    mid = await sub.send(sh_job(f"sleep {marker}"))
    await sub.wait(mid, (2, *FINAL), 180)
    state = await show("ControlGroup", "MainPID")
    service = CGROOT / state["ControlGroup"].lstrip("/")
    began, began_epoch = time.monotonic(), time.time()
    code, out = await run("systemctl", "stop", "carod.service")
    stopped = time.monotonic()
    await sub.wait(mid, FINAL, 60)
    final = sub.final(mid)
    after = await show("ActiveState", "SubState", "Result", "MainPID", "ControlGroup")
    record(
        "drain",
        mid=mid,
        stop_rc=code,
        stop_output=out,
        stop_s=round(stopped - began, 1),
        stop_began_epoch=began_epoch,
        final=final,
        final_before_stop_returned=bool(final and final["_at"] <= stopped),
        after=after,
        service_cgroup=str(service),
        service_cgroup_exists=service.exists(),
        procs_left_in_service_cgroup=procs_in_tree(service),
        nobody_left=procs_of_uid(NOBODY),
        carod_left=procs_with("-m carod"),
        log=(await journal("shutting down"))[-6:],
    )


async def main() -> int:
    OUT.mkdir(exist_ok=True)
    await environment()
    sub = Submitter()
    await sub.open()
    unit: dict[str, str] = {}

    async def start() -> None:
        unit.update(await ready(sub))

    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("ready", start),
        ("reload", lambda: reload(sub, unit.get("MainPID", "0"))),
        ("limits", lambda: limits(sub, unit.get("ControlGroup", "/nonexistent"))),
        ("watchdog", lambda: watchdog(sub)),
        ("drain", lambda: drain(sub)),
    ]
    try:
        for name, step in steps:
            say(name)
            began = time.monotonic()
            try:
                await step()
            except Exception:
                record(name, error=traceback.format_exc())
                say(traceback.format_exc())
            record("times", **{f"{name}_s": round(time.monotonic() - began, 1)})
        await asyncio.sleep(3)  # a late duplicate of a final reply would have arrived by now
        record("replies", finals={mid: sum(s in FINAL for s in sub.statuses(mid)) for mid in sub.replies})
    finally:
        await sub.close()
        (OUT / "journal.txt").write_text("\n".join(await journal()) + "\n")
    record("done", ok=True, finished=time.time())
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
