"""Test helpers: a raw AMQP submitter and an in-process carod node.

The submitter talks to the broker with aio-pika directly, not through
carod.client, so tests see exactly what a third-party client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import classad2
import pytest
from aio_pika.abc import AbstractIncomingMessage

from carod import config as configuration
from carod.node.server import Server
from carod.unzip import Owner
from carod.wire import adverts
from carod.wire.jobad import JobSpec

BROKER_URL = os.environ.get(
    "CAROD_TEST_BROKER_URL", os.environ.get("CAROD_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/")
)
FINAL_STATUSES = (3, 4, 5)
CAROD = [sys.executable, "-m", "carod"]


def unique(prefix: str) -> str:
    return f"test-{prefix}-{uuid.uuid4().hex[:10]}"


def q(text: str) -> str:
    """A ClassAd string literal, as MRG Grid clients put it in a header."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: The seed job: what the attack tests run afterwards, to show that the node still serves.
SEED = {"Cmd": q("/bin/echo"), "Arguments": q("Hello Grid!"), "Out": q("job.out")}


async def seed_runs(submitter: Submitter, timeout_s: float = 30) -> None:
    """The seed job is answered Exited 0 with its output."""
    final = (await submitter.run(SEED, timeout_s=timeout_s))[-1]
    assert final.status == 4 and final.headers["ExitCode"] == 0, final.headers
    assert final.zip_read("job.out") == b"Hello Grid!\n"


@dataclass
class Reply:
    headers: dict[str, Any]
    body: bytes
    correlation_id: str | None
    message_id: str | None

    @property
    def status(self) -> int:
        return int(self.headers.get("JobStatus", 0))  # 0: a result part (carod.parts)

    def zip_names(self) -> list[str]:
        with zipfile.ZipFile(io.BytesIO(self.body)) as z:
            return sorted(z.namelist())

    def zip_read(self, name: str) -> bytes:
        with zipfile.ZipFile(io.BytesIO(self.body)) as z:
            return z.read(name)


@dataclass
class Submitter:
    """Publishes job messages and collects replies on its own exclusive queue."""

    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    reply_queue: aio_pika.abc.AbstractQueue
    job_queue: str
    replies: dict[str | None, list[Reply]] = field(default_factory=lambda: defaultdict(list))
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    #: (message_id, JobStatus) of every reply, in order of arrival
    order: list[tuple[str | None, int]] = field(default_factory=list)

    durable: bool = False

    @classmethod
    async def open(cls, job_queue: str, *, durable: bool = False, url: str = BROKER_URL) -> Submitter:
        """``durable``: a robust connection and a durable reply queue that survive broker faults."""
        if durable:
            connection: aio_pika.abc.AbstractConnection = await aio_pika.connect_robust(url, reconnect_interval=0.5)
        else:
            connection = await aio_pika.connect(url)
        channel = await connection.channel(publisher_confirms=True)
        reply_queue = await channel.declare_queue(
            unique("replies"), durable=durable, exclusive=not durable, auto_delete=not durable
        )
        self = cls(connection, channel, reply_queue, job_queue, durable=durable)
        await reply_queue.consume(self._on_reply, no_ack=True)
        return self

    async def sync(self, timeout_s: float = 20.0) -> None:
        """Return once every reply published to our queue before now has been received."""
        token = f"sync-{uuid.uuid4().hex}"
        await self.channel.default_exchange.publish(
            aio_pika.Message(b"", headers={"JobStatus": 0}, correlation_id=token), self.reply_queue.name
        )

        async def arrived() -> None:
            while token not in self.replies:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(arrived(), timeout_s)

    def finals(self, message_id: str | None) -> list[Reply]:
        return [r for r in self.replies.get(message_id, []) if r.status in FINAL_STATUSES]

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        reply = Reply(dict(message.headers or {}), message.body, message.correlation_id, message.message_id)
        self.replies[message.correlation_id].append(reply)
        if "JobStatus" in reply.headers:
            self.order.append((message.correlation_id, reply.status))
        self.arrived.set()

    async def send(
        self,
        headers: dict[str, Any],
        *,
        body: bytes = b"",
        message_id: str | None = "auto",
        reply_to: str | None = "auto",
        routing_key: str | None = None,
        exchange: str = "",
        user_id: str | None = None,
    ) -> str | None:
        """``user_id``: the message's user_id property (the broker refuses any but the connection's user, guest)."""
        mid = str(uuid.uuid4()) if message_id == "auto" else message_id
        rt = self.reply_queue.name if reply_to == "auto" else reply_to
        message = aio_pika.Message(
            body,
            headers=headers,
            message_id=mid,
            reply_to=rt,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=user_id,
        )
        ex = self.channel.default_exchange if not exchange else await self.channel.get_exchange(exchange)
        await ex.publish(message, routing_key or self.job_queue)
        return mid

    async def wait_final(self, message_id: str | None, timeout_s: float = 20.0) -> list[Reply]:
        """All replies for a job, ending with its final one."""

        async def final() -> list[Reply]:
            while True:
                got = self.replies.get(message_id, [])
                if got and got[-1].status in FINAL_STATUSES:
                    return list(got)
                self.arrived.clear()
                await self.arrived.wait()

        return await asyncio.wait_for(final(), timeout_s)

    async def wait_reply(
        self, message_id: str | None, status: int, *, after: int = 0, timeout_s: float = 20.0
    ) -> Reply:
        """The first reply of the job with this JobStatus among its replies from index ``after`` on."""

        async def reply() -> Reply:
            while True:
                for got in self.replies.get(message_id, [])[after:]:
                    if got.status == status:
                        return got
                self.arrived.clear()
                await self.arrived.wait()

        return await asyncio.wait_for(reply(), timeout_s)

    async def wait_running(self, message_id: str | None, timeout_s: float = 20.0) -> None:
        """Until the job's Running (JobStatus 2) reply has arrived."""

        async def running() -> None:
            while not any(r.status == 2 for r in self.replies.get(message_id, [])):
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(running(), timeout_s)

    async def run(self, headers: dict[str, Any], *, body: bytes = b"", timeout_s: float = 20.0) -> list[Reply]:
        mid = await self.send(headers, body=body)
        return await self.wait_final(mid, timeout_s)

    async def close(self) -> None:
        if self.durable:
            await self.channel.queue_delete(self.reply_queue.name)
        await self.connection.close()


def config_text(
    queue: str,
    base: Path,
    *,
    node: dict[str, Any] | None = None,
    broker: dict[str, Any] | None = None,
    machine: dict[str, str] | None = None,
    sandbox: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> str:
    b = {"url": BROKER_URL, "queue": queue, "binding_key": f"{queue}-key", "unmatched_delay_s": 0.05}
    b.update(broker or {})
    n = {
        "name": f"node-{uuid.uuid4().hex[:6]}",
        "slots": 2,
        "sandbox_root": base / "sandboxes",
        "state_dir": base / "state",
        "drain_timeout_s": 10,
        "kill_grace_s": 2,
    }
    n.update(node or {})
    lines = ["[broker]", *(f"{k} = {v}" for k, v in b.items()), "[node]", *(f"{k} = {v}" for k, v in n.items())]
    if sandbox:
        lines += ["[sandbox]", *(f"{k} = {v}" for k, v in sandbox.items())]
    if pool:
        lines += ["[pool]", *(f"{k} = {v}" for k, v in pool.items())]
    if metrics:
        lines += ["[metrics]", *(f"{k} = {v}" for k, v in metrics.items())]
    if machine:
        lines += ["[machine]", *(f"{k} = {v}" for k, v in machine.items())]
    return "\n".join(lines) + "\n"


@dataclass
class RunningNode:
    server: Server
    task: asyncio.Task[None]
    name: str
    base: Path

    async def stop(self) -> None:
        if not self.task.done():
            self.server.handle_exit()
        await self.task


async def start_node(queue: str, base: Path, **kwargs: Any) -> RunningNode:
    config = configuration.parse(config_text(queue, base, **kwargs), source="test", environ={})
    server = Server(config, handle_signals=False)
    task = asyncio.create_task(server.serve())
    started = asyncio.create_task(server.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises the start-up error
    return RunningNode(server, task, config.node_name, base)


async def delete_queues(*names: str) -> None:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


async def queue_depth(name: str) -> int:
    connection = await aio_pika.connect(BROKER_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


async def wait_consumed(name: str, timeout_s: float = 30) -> None:
    """Until queue ``name`` exists and has a consumer (a node that logs nothing at start is ready then)."""
    connection = await aio_pika.connect(BROKER_URL)
    async with connection, asyncio.timeout(timeout_s):
        while True:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
                if queue.declaration_result.consumer_count:
                    return
                await channel.close()
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass  # not declared yet; the channel is closed by the broker
            await asyncio.sleep(0.05)


def write_config(base: Path, queue: str, **kwargs: object) -> Path:
    path = base / "carod.conf"
    path.write_text(config_text(queue, base, **kwargs))  # type: ignore[arg-type]
    return path


class Daemon:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log: list[str] = []

    async def wait_for_line(self, needle: str, timeout_s: float = 15) -> str:
        async def read() -> str:
            assert self.proc.stderr is not None
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"carod exited before logging {needle!r}:\n" + "".join(self.log))
                line = raw.decode()
                self.log.append(line)
                if needle in line:
                    return line

        return await asyncio.wait_for(read(), timeout_s)

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        rest = await asyncio.wait_for(self.proc.stderr.read(), timeout_s)  # type: ignore[union-attr]
        self.log.append(rest.decode())
        return await self.proc.wait()


async def start_daemon(config: Path, env: dict[str, str] | None = None, *, ready: str | None = "ready") -> Daemon:
    """carod in a process of its own; returned once it logs ``ready`` (None: at once)."""
    proc = await asyncio.create_subprocess_exec(
        *CAROD,
        "--config",
        str(config),
        stderr=subprocess.PIPE,
        env={**os.environ, "CAROD_BROKER_URL": BROKER_URL, **(env or {})},
    )
    daemon = Daemon(proc)
    if ready is not None:
        try:
            await daemon.wait_for_line(ready)
        except BaseException:
            proc.kill()  # never leave a daemon that did not start behind
            await proc.wait()
            raise
    return daemon


def journaled_sandboxes(base: Path) -> dict[str, Path]:
    """message_id -> the sandbox the journal of the node in ``base`` says the job runs (or ran) in.

    With sandboxes started ahead (``[sandbox] prestart``), a job's sandbox is
    named ``warm.*``, not after its message_id, and unused ones sit beside it:
    the journal is how an operator, and a test, tells which is whose.
    """
    path = base / "state" / "journal.sqlite3"
    if not path.exists():
        return {}
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = connection.execute("SELECT message_id, sandbox FROM jobs WHERE sandbox IS NOT NULL").fetchall()
    finally:
        connection.close()
    return {mid: Path(box) for mid, box in rows}


async def sandbox_of(base: Path, message_id: str, timeout_s: float = 30.0) -> Path:
    """The sandbox of a job that has started on the node in ``base`` (from its journal)."""
    async with asyncio.timeout(timeout_s):
        while (box := journaled_sandboxes(base).get(message_id)) is None:
            await asyncio.sleep(0.02)
    return box


def job_sandboxes(base: Path) -> list[Path]:
    """The sandboxes under ``base`` that belong to jobs (not those started ahead that no job took yet)."""
    used = set(journaled_sandboxes(base).values())
    return [p for p in (base / "sandboxes").iterdir() if p in used]


def processes_with(marker: str) -> list[int]:
    """PIDs whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def raw_zip(*entries: tuple[str, bytes, int], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of (name, data, st_mode) entries, names taken verbatim (unsafe ones included)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(buf, "w", compression=compression) as archive:
            for name, data, mode in entries:
                info = zipfile.ZipInfo(name)
                info.external_attr = mode << 16
                info.compress_type = compression
                archive.writestr(info, data)
    return buf.getvalue()


RABBITMQCTL = shutil.which("rabbitmqctl") or (
    "/usr/sbin/rabbitmqctl" if os.path.exists("/usr/sbin/rabbitmqctl") else None
)
needs_ctl = pytest.mark.skipif(RABBITMQCTL is None, reason="rabbitmqctl is not installed: cannot inject broker faults")


def rabbitmqctl(*args: str) -> None:
    assert RABBITMQCTL is not None
    subprocess.run([RABBITMQCTL, *args], check=True, capture_output=True, timeout=120)


def rabbit_env(key: str) -> str:
    """A setting of the broker's rabbit application, as Erlang prints it ({ok,N} or undefined)."""
    if RABBITMQCTL is None:
        raise RuntimeError("rabbitmqctl is not installed")
    return subprocess.run(
        [RABBITMQCTL, "eval", f"application:get_env(rabbit, {key})."],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()


class NotifySocket:
    """What systemd listens on: a datagram socket, read by a thread that timestamps each message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        return list(self.messages)

    async def wait_for(self, key: str, timeout_s: float = 20) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for _, fields in self.drain():
                if key in fields:
                    return fields
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {key} notification; got {[m for _, m in self.messages]}")

    def close(self) -> None:
        self._stop.set()
        self._reader.join()
        self.sock.close()


def node_ad(name: str, *, cpus: int, total_cpus: int, memory: int, **extra: object) -> str:
    ad = classad2.ClassAd()
    ad.update({"Name": name, "Cpus": cpus, "TotalCpus": total_cpus, "Memory": memory, "TotalMemory": memory})
    ad.update({"Disk": 1000, "TotalDisk": 1000, "LoadAvg": 0.5, "Start": classad2.ExprTree("TRUE")})
    ad.update(extra)
    return str(ad)


def advert(
    name: str, state: str = adverts.RUNNING, *, queue: str = "grid", sent: float = 100.0, **ad: int
) -> adverts.Advert:
    text = node_ad(name, **{"cpus": 2, "total_cpus": 2, "memory": 1024, **ad})
    job = adverts.JobInfo("job-1", "alice", "/bin/sleep", 90.0, 1, 128)
    return adverts.Advert(name, queue, state, sent, 5.0, text, (job,), {"other": 99.0})


@dataclass
class Dirs:
    """``base`` holds the sandbox ``box``; anything else in ``base`` escaped the box."""

    base: Path
    box: Path

    def outside(self) -> list[str]:
        """Every path under ``base`` that is not the box, on the way to it, or inside it."""
        found = []
        for root, dirnames, filenames in os.walk(self.base):
            for name in dirnames + filenames:
                path = Path(root) / name
                if path != self.box and path not in self.box.parents and self.box not in path.parents:
                    found.append(str(path.relative_to(self.base)))
        return sorted(found)

    def inside(self) -> list[str]:
        found = []
        for root, dirnames, filenames in os.walk(self.box):
            found += [str((Path(root) / name).relative_to(self.box)) for name in dirnames + filenames]
        return sorted(found)


# ---------------------------------------------------------------- costly ClassAds and forged adverts (issue 14)


def strcat_doublings(levels: int, width: int = 60_000) -> dict[str, Any]:
    """The reported attack: A0 a long literal, A<n> = strcat(A<n-1>, A<n-1>), Requirements reads the last one."""
    ad: dict[str, Any] = {"Cmd": q("/bin/echo"), "A0": q("x" * width)}
    for i in range(1, levels + 1):
        ad[f"A{i}"] = f"strcat(A{i - 1}, A{i - 1})"
    ad["Requirements"] = f"size(A{levels}) > 0"
    return ad


def sum_doublings(levels: int) -> dict[str, Any]:
    """Exponential time with no function at all: A<n> = A<n-1> + A<n-1> (evaluation does not memoise)."""
    ad: dict[str, Any] = {"Cmd": q("/bin/echo"), "A0": 1}
    for i in range(1, levels + 1):
        ad[f"A{i}"] = f"A{i - 1} + A{i - 1}"
    ad["Requirements"] = f"A{levels} > 0"
    return ad


def forged(node: str, queue: str, ad_text: str) -> bytes:
    return json.dumps(
        {"v": 1, "node": node, "queue": queue, "state": "Running", "sent": time.time(), "period_s": 5, "ad": ad_text}
    ).encode()


def machine_text(**extra: str) -> str:
    attrs = {"Name": q("forged"), "Cpus": "64", "TotalCpus": "64", "Memory": "1000000", "TotalMemory": "1000000"}
    attrs.update({"Disk": "1000000000", "TotalDisk": "1000000000", "Start": "TRUE", "HasGPU": "TRUE", **extra})
    return "[" + "; ".join(f"{k} = {v}" for k, v in attrs.items()) + "]"


def amqp10_app_properties(values: Mapping[str, object]) -> bytearray:
    """An AMQP 1.0 application-properties section (string keys), as RabbitMQ 3.x puts it in
    ``x-amqp-1.0-app-properties``; a bytearray, which pamqp sends as a byte-array header."""
    from proton import Data

    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(0x74)
    data.put_map()
    data.enter()
    for key, value in values.items():
        data.put_string(key)
        data.put_object(value)
    data.exit()
    data.exit()
    return bytearray(data.encode())


#: Files the sandbox tests make belong to whoever runs them (root in CI).
OWNER = Owner(os.getuid(), os.getgid())


def plain_spec(
    *,
    stdin: str | None = None,
    stdout: str | None = None,
    stderr: str | None = None,
    transfer_output: tuple[str, ...] | None = None,
) -> JobSpec:
    """A JobSpec for ``/bin/true`` with the given stdio and TransferOutput (the file-level sandbox tests)."""
    return JobSpec(
        cmd="/bin/true",
        arguments=(),
        environment=(),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        transfer_output=transfer_output,
        kill_sig=15,
    )


@dataclass(frozen=True)
class Users:
    """Two broker users of a test's own (the ``users`` fixture of tests/daemon/conftest.py)."""

    alice: str
    eve: str


def url_of(user: str) -> str:
    """BROKER_URL as ``user`` (whose password is ``pw-<user>``)."""
    return BROKER_URL.replace("guest:guest@", f"{user}:pw-{user}@")


@contextlib.contextmanager
def broker_users() -> Iterator[Users]:
    """Two broker users with every permission on /, created with rabbitmqctl and deleted after."""
    tag = uuid.uuid4().hex[:8]
    made = Users(f"test-alice-{tag}", f"test-eve-{tag}")
    created = []
    try:
        for name in (made.alice, made.eve):
            rabbitmqctl("add_user", name, f"pw-{name}")
            created.append(name)
            rabbitmqctl("set_permissions", "-p", "/", name, ".*", ".*", ".*")
        yield made
    finally:
        for name in created:
            rabbitmqctl("delete_user", name)
