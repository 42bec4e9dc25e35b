"""The walkthrough's first half: a service as a job, found with chirp, held, released and removed.

The seed's ``qpidd.sh`` runs as it is written (bash syntax: ``function``, ``trap ... SIGTERM``,
``kill %1``, ``wait %1``), with only the broker swapped for a few lines of Python that
listen on an ephemeral port and print it, and the attribute named ``ServiceEndpoint``.
Everything is done the way a person would: ``carod q``, ``carod hold``, ``carod release``
and ``carod rm -a`` run as commands with ``--config`` pointing at the node's config.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import uuid
import zipfile
from io import BytesIO
from pathlib import Path
from typing import Any

import aio_pika
import classad2

from carod.wire.replies import STREAM_HEADER
from tests.helpers import CAROD, Reply, Submitter, processes_with, q, start_node, unique, write_config

#: The seed's qpidd.sh with ``#!/bin/bash`` and qpidd swapped for SERVICE (a Python file in the job's input).
QPIDD_SH = """#!/bin/bash

# the service lives in the job's directory,
# condor_chirp in /usr/libexec/condor
export PATH=$PATH:/usr/sbin:/usr/libexec/condor

# When we get SIGTERM, which Condor will send when
# we are kicked, kill off the service.
function term {
    rm -f port.out
    kill %1
}

# Spawn the service, and make sure we can shut it down cleanly.
rm -f port.out
trap term SIGTERM
# the service will print the port to stdout, capture it
python3 SERVICE \\
      1> port.out &

# We might have to wait for the port on stdout
while [ ! -s port.out ]; do sleep 1; done
PORT=$(cat port.out)
rm -f port.out

# Record the port number where everyone can see it
condor_chirp set_job_attr ServiceEndpoint \\"$HOSTNAME:$PORT\\"

# Nothing more to do, just wait on the service
wait %1
"""

#: The small TCP service: listens on port 0, prints the port, greets each client, says when SIGTERM stops it.
SERVICE_PY = """import signal, socket, sys
server = socket.socket()
server.bind(("", 0))
server.listen()
port = server.getsockname()[1]
print(port, flush=True)

def stop(signum, frame):
    print(f"service on port {port} stopped by SIGTERM", file=sys.stderr, flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
while True:
    client, _ = server.accept()
    client.sendall(f"service on port {port}\\n".encode())
    client.close()
"""


def job_zip(service: str) -> bytes:
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, text, mode in (
            ("qpidd.sh", QPIDD_SH.replace("SERVICE", service), 0o755),
            (service, SERVICE_PY, 0o644),
        ):
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            archive.writestr(info, text)
    return buf.getvalue()


def carod(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A client command as a person types it: ``carod CMD --config FILE ...``."""
    return subprocess.run(
        [*CAROD, args[0], "--config", str(config), *args[1:]], capture_output=True, text=True, timeout=60
    )


async def greet(endpoint: str) -> str:
    """What the service at HOST:PORT says to a client outside the sandbox."""
    host, _, port = endpoint.rpartition(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
    try:
        return (await asyncio.wait_for(reader.readline(), 5)).decode()
    finally:
        writer.close()


async def refused(endpoint: str) -> bool:
    """The endpoint does not answer: the connection is refused, or closed without a word."""
    try:
        return await greet(endpoint) == ""
    except OSError:
        return True


def endpoint_of(replies: list[Reply]) -> list[str]:
    """The ServiceEndpoint values of a job's JobStatus 2 updates, in order (headers carry ClassAd text)."""
    return [
        str(classad2.ExprTree(str(r.headers["ServiceEndpoint"])).eval())
        for r in replies
        if r.status == 2 and "ServiceEndpoint" in r.headers
    ]


async def wait_for(condition, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not (found := condition()):
            await asyncio.sleep(0.05)
        return found


async def test_a_service_as_a_job_as_the_walkthrough_runs_it(base: Path, queue: str) -> None:
    settings: dict[str, Any] = {
        "node": {"slots": 4, "kill_grace_s": 5},
        "machine": {"Cpus": "4"},  # three services at once on one node, as in the walkthrough
        "sandbox": {"network": "services"},
        "pool": {"exchange": unique("pool"), "advertise_interval_s": 0.5},
    }
    config = write_config(base, queue, **settings)  # what the carod commands read (--config)
    node = await start_node(queue, base, **settings)
    submitter = await Submitter.open(queue)
    service = f"service_{uuid.uuid4().hex[:10]}.py"
    try:
        ids = []
        for _ in range(3):
            mid = str(uuid.uuid4())
            headers: dict[str, aio_pika.abc.FieldValue] = {
                "Cmd": q("qpidd.sh"),
                "Err": q("qpidd.log"),
                "KillSig": q("SIGTERM"),
                "WantIOProxy": True,
                "StreamErr": True,
                "RequestMemory": 64,
            }
            message = aio_pika.Message(
                job_zip(service),
                headers=headers,
                message_id=mid,
                reply_to=submitter.reply_queue.name,
                user_id="guest",  # the broker checks it: the job's Owner
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await submitter.channel.default_exchange.publish(message, queue)
            ids.append(mid)

        # Each service chirps its endpoint: a JobStatus 2 update carrying it reaches the submitter.
        for mid in ids:
            await wait_for(lambda mid=mid: endpoint_of(submitter.replies.get(mid, [])))
        by_job = {mid: endpoint_of(submitter.replies[mid])[-1] for mid in ids}

        # carod q -format lists the three endpoints, distinct, and each answers a client on the host.
        async def listed() -> list[str]:
            shown = await asyncio.to_thread(
                carod, config, "q", "-format", "service running at %s\\n", "ServiceEndpoint"
            )
            assert shown.returncode == 0, shown.stderr
            return re.findall(r"^service running at (\S+)$", shown.stdout, re.M)

        lines = await wait_for_async(listed, lambda found: len(found) == 3)
        assert sorted(lines) == sorted(by_job.values())
        assert len(set(lines)) == 3
        host = socket.gethostname()
        for endpoint in by_job.values():
            assert endpoint.startswith(f"{host}:"), endpoint
            port = endpoint.rpartition(":")[2]
            assert await greet(endpoint) == f"service on port {port}\n"

        # carod hold one: Held with code 1, the reason and who asked; the trap ran; the endpoint is gone; q shows H.
        held = ids[0]
        hold = await asyncio.to_thread(carod, config, "hold", held, "--reason", "moving it")
        assert hold.returncode == 0, hold.stdout + hold.stderr
        replies = await submitter.wait_final(held, 30)
        final = replies[-1]
        assert final.status == 5
        assert final.headers["HoldReasonCode"] == 1
        assert "moving it" in final.headers["HoldReason"] and "guest" in final.headers["HoldReason"]
        stderr = b"".join(r.body for r in replies if r.headers.get(STREAM_HEADER) == "stderr")
        port = by_job[held].rpartition(":")[2]
        assert f"service on port {port} stopped by SIGTERM".encode() in stderr
        assert await refused(by_job[held])

        async def q_lines() -> str:
            shown = await asyncio.to_thread(carod, config, "q")
            assert shown.returncode == 0, shown.stderr
            return shown.stdout

        table = await wait_for_async(q_lines, lambda text: "1 held" in text)
        row = next(line for line in table.splitlines() if held[:8] in line)
        assert re.search(r"\sH\s", row), row
        assert "3 jobs; 0 idle, 2 running, 1 held" in table

        # carod release: Idle, then Running again with a new endpoint, in an update and in carod q.
        count_before = len(submitter.replies[held])
        release = await asyncio.to_thread(carod, config, "release", held)
        assert release.returncode == 0, release.stdout + release.stderr
        await wait_for(lambda: endpoint_of(submitter.replies[held][count_before:]))
        after = submitter.replies[held][count_before:]
        statuses = [r.status for r in after if "JobStatus" in r.headers]
        assert statuses[0] == 1 and 2 in statuses, statuses
        new_endpoint = endpoint_of(after)[-1]
        assert await greet(new_endpoint) == f"service on port {new_endpoint.rpartition(':')[2]}\n"
        lines = await wait_for_async(listed, lambda found: new_endpoint in found and len(found) == 3)
        assert set(lines) == {new_endpoint, by_job[ids[1]], by_job[ids[2]]}

        # carod rm -a: all three Removed; carod q shows none; no process is left.
        removal = await asyncio.to_thread(carod, config, "rm", "-a")
        assert removal.returncode == 0, removal.stdout + removal.stderr
        for mid in ids:
            await wait_for(lambda mid=mid: [r for r in submitter.replies[mid] if r.status == 3])
        table = await wait_for_async(q_lines, lambda text: "0 jobs;" in text)
        assert "0 jobs; 0 idle, 0 running, 0 held" in table
        await wait_for(lambda: not processes_with(service), 15)
        for endpoint in [*by_job.values(), new_endpoint]:
            assert await refused(endpoint)
    finally:
        await submitter.close()
        await node.stop()
    assert processes_with(service) == []


async def wait_for_async(probe, done, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    """Call ``probe`` until ``done(result)``; the last result."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = await probe()
            if done(result):
                return result
            await asyncio.sleep(0.2)
