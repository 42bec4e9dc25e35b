"""[sandbox] network through a real carod (issue 17): what a job reaches, and who reaches it.

"Another host" is a network namespace of the test's own, joined to the host
by a veth pair with addresses of its own (10.213.N.0/24), deleted at the
end. The node's loopback has the broker on 127.0.0.1:5672. Each policy is
asked the same questions by a job: can it connect to the broker, and to a
listener on the other host? With ``services``, jobs listen on port 0 and
the test connects to ``$HOSTNAME:$PORT`` from the host and to the node's
address on the veth from the other host.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from carod.errors import StartupError
from tests.helpers import RunningNode, Submitter, processes_with, q, raw_zip, sandbox_of, start_node

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and veth pairs need root")

IP = "/usr/sbin/ip" if os.path.exists("/usr/sbin/ip") else "ip"
BROKER = ("127.0.0.1", 5672)
OTHER_PORT = 8713

#: What a job runs: tries each host:port given, prints "NAME ok" or "NAME failed: why".
PROBE = b"""
import socket, sys
for target in sys.argv[1:]:
    name, _, where = target.partition("=")
    host, _, port = where.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.settimeout(1)
            try:
                said = s.recv(64).decode(errors="replace").strip()
            except TimeoutError:
                said = ""  # connected: the broker waits for the client to speak first
            print(name, "ok", said, flush=True)
    except OSError as exc:
        print(name, "failed:", exc, flush=True)
"""

#: A service job as the walkthrough's: a small TCP server on port 0, its endpoint "$HOSTNAME:$PORT"
#: written where the test reads it, serving until killed (the job then ends) or told to stop.
SERVICE = b"""#!/bin/bash
/usr/bin/python3 -u -c '
import socket, sys
s = socket.socket()
s.bind(("", 0))
s.listen()
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    if c.recv(16).startswith(b"stop"):
        c.sendall(b"bye")
        break
    c.sendall(b"service")
    c.close()
' > port &
until [ -s port ]; do sleep 0.05; done
PORT=$(head -1 port)
echo "$HOSTNAME:$PORT" > endpoint.tmp && mv endpoint.tmp endpoint
wait %1
"""


@dataclass
class OtherHost:
    """A network namespace playing another machine: ``address`` is its, ``node_address`` the node's side."""

    name: str
    address: str
    node_address: str

    def run(self, *argv: str, timeout_s: float = 20) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [IP, "netns", "exec", self.name, *argv], capture_output=True, text=True, timeout=timeout_s, check=False
        )

    def connect(self, host: str, port: int, send: bytes = b"hi") -> str:
        """Connect from the other host; what it answered, or 'failed: why'."""
        script = (
            "import socket, sys\n"
            "try:\n"
            f"    s = socket.create_connection(({host!r}, {port}), timeout=3); s.settimeout(3)\n"
            f"    s.sendall({send!r}); print('ok', s.recv(64).decode())\n"
            "except OSError as exc:\n"
            "    print('failed:', exc)\n"
        )
        return self.run(sys.executable, "-c", script).stdout.strip()


def _ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def other_host() -> Iterator[OtherHost]:
    tag = uuid.uuid4().hex[:6]
    net = 1 + int(tag, 16) % 250
    name, host_if, other_if = f"carod-t-{tag}", f"cvh{tag}", f"cvo{tag}"
    other = OtherHost(name, f"10.213.{net}.2", f"10.213.{net}.1")
    _ip("netns", "add", name)
    listener: subprocess.Popen[bytes] | None = None
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", other_if)
        _ip("link", "set", other_if, "netns", name)
        _ip("addr", "add", f"{other.node_address}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{other.address}/24", "dev", other_if)
        _ip("-n", name, "link", "set", other_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        # A service of the other host: answers "other-host" to every connection.
        server = (
            "import socket\n"
            f"s = socket.create_server(({other.address!r}, {OTHER_PORT}))\n"
            "print('listening', flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept(); c.sendall(b'other-host'); c.close()\n"
        )
        listener = subprocess.Popen(
            [IP, "netns", "exec", name, sys.executable, "-c", server], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert listener.stdout is not None and listener.stdout.readline() == b"listening\n"
        yield other
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
            if listener.stdout is not None:
                listener.stdout.close()
        subprocess.run([IP, "link", "del", host_if], capture_output=True, check=False)
        subprocess.run([IP, "netns", "del", name], capture_output=True, check=False)


async def policy_node(queue: str, base: Path, network: str, **sandbox: Any) -> RunningNode:
    # Three slots whatever the machine (a job asks for one CPU); stopping the node kills what still runs.
    return await start_node(
        queue,
        base,
        node={"slots": 3, "drain_timeout_s": 1},
        machine={"Cpus": "3"},
        sandbox={"network": network, **sandbox},
    )


def probe_job(other: OtherHost) -> tuple[dict[str, Any], bytes]:
    targets = [f"broker={BROKER[0]}:{BROKER[1]}", f"other={other.address}:{OTHER_PORT}"]
    headers = {"Cmd": q("/usr/bin/python3"), "Arguments": q(" ".join(["probe.py", *targets])), "Out": q("out")}
    return headers, raw_zip(("probe.py", PROBE, 0o100644))


async def reachability(submitter: Submitter, other: OtherHost) -> dict[str, str]:
    headers, body = probe_job(other)
    final = (await submitter.run(headers, body=body, timeout_s=60))[-1]
    assert final.status == 4, final.headers
    lines = final.zip_read("out").decode().splitlines()
    return {line.split()[0]: line.split(maxsplit=1)[1] for line in lines}


def no_slirp_left() -> None:
    assert [pid for pid in processes_with("slirp4netns") if pid != os.getpid()] == []


@pytest.mark.parametrize(
    ("policy", "broker", "other"),
    [
        ("none", False, False),
        ("outbound", False, True),
        ("services", False, True),
        # The honest fourth choice: the node's own namespace, loopback services included.
        ("host", True, True),
    ],
)
async def test_what_a_job_reaches_under_each_policy(
    queue: str, base: Path, submitter: Submitter, other_host: OtherHost, policy: str, broker: bool, other: bool
) -> None:
    node = await policy_node(queue, base, policy)
    try:
        assert node.server.node is not None
        assert node.server.node.machine_ad.eval("NetworkPolicy") == policy
        seen = await reachability(submitter, other_host)
        assert seen["broker"].startswith("ok") is broker, seen
        assert seen["other"].startswith("ok other-host") is other, seen
        if not broker:
            assert "refused" in seen["broker"] or "unreachable" in seen["broker"], seen
    finally:
        await node.stop()
    no_slirp_left()


async def test_old_yes_and_no_still_mean_host_and_none(queue: str, base: Path) -> None:
    node = await start_node(queue, base, sandbox={"network": "no"})
    try:
        assert node.server.layers is not None and node.server.layers.network == "none"
        assert node.server.node is not None and node.server.node.machine_ad.eval("NetworkPolicy") == "none"
    finally:
        await node.stop()


def connect(host: str, port: int, send: bytes = b"hi") -> str:
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.settimeout(3)
            s.sendall(send)
            return "ok " + s.recv(64).decode()
    except OSError as exc:
        return f"failed: {exc}"


async def endpoint_of(base: Path, message_id: str | None, timeout_s: float = 30) -> tuple[str, int]:
    assert message_id is not None
    box = await sandbox_of(base, message_id, timeout_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not (box / "endpoint").exists():
        assert loop.time() < deadline, "the service job never wrote its endpoint"
        await asyncio.sleep(0.05)
    host, _, port = (box / "endpoint").read_text().strip().rpartition(":")
    return host, int(port)


async def test_three_services_on_one_node_reached_from_the_host_and_another_host(
    queue: str, base: Path, submitter: Submitter, other_host: OtherHost
) -> None:
    node = await policy_node(queue, base, "services")
    try:
        headers = {"Cmd": q("service.sh"), "Out": q("out"), "Err": q("err")}
        body = raw_zip(("service.sh", SERVICE, 0o100755))
        ids = [await submitter.send(headers, body=body) for _ in range(3)]
        endpoints = [await endpoint_of(base, mid) for mid in ids]
        assert len({port for _, port in endpoints}) == 3, endpoints
        for host, port in endpoints:
            assert host == socket.gethostname()
            assert await asyncio.to_thread(connect, host, port) == "ok service"
            assert await asyncio.to_thread(other_host.connect, other_host.node_address, port) == "ok service"
        # A job ends (its server stops): its endpoint stops answering, the others go on.
        host, port = endpoints[0]
        assert await asyncio.to_thread(connect, host, port, b"stop") == "ok bye"
        final = (await submitter.wait_final(ids[0], 30))[-1]
        assert final.status == 4, final.headers
        assert (await asyncio.to_thread(connect, host, port)).startswith("failed: [Errno 111]")
        assert await asyncio.to_thread(connect, *endpoints[1]) == "ok service"
        # Killed by the node (carod rm, hold, a limit): the same.
        await node.stop()  # the drain ends them; every sandbox's slirp4netns with them
        for host, port in endpoints[1:]:
            assert (await asyncio.to_thread(connect, host, port)).startswith("failed: [Errno 111]")
    finally:
        await node.stop()
    no_slirp_left()


async def test_a_service_killed_by_its_limit_stops_answering(
    queue: str, base: Path, submitter: Submitter, other_host: OtherHost
) -> None:
    node = await policy_node(queue, base, "services")
    try:
        headers = {"Cmd": q("service.sh"), "Out": q("out"), "AllowedExecuteDuration": 3}
        mid = await submitter.send(headers, body=raw_zip(("service.sh", SERVICE, 0o100755)))
        host, port = await endpoint_of(base, mid)
        assert await asyncio.to_thread(other_host.connect, other_host.node_address, port) == "ok service"
        final = (await submitter.wait_final(mid, 30))[-1]
        assert final.status == 5 and final.headers["HoldReasonCode"] == 47, final.headers
        assert (await asyncio.to_thread(connect, host, port)).startswith("failed: [Errno 111]")
        assert other_host.connect(other_host.node_address, port).startswith("failed: [Errno 111]")
    finally:
        await node.stop()
    no_slirp_left()


async def test_services_without_slirp4netns_refuse_to_start(
    queue: str, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("carod.sandbox.network._ROOT_PATH", "/nonexistent")
    with pytest.raises(StartupError) as caught:
        await start_node(queue, base, sandbox={"network": "services"})
    assert caught.value.exit_code == 78
    assert "[sandbox] network = services: slirp4netns is not installed" in str(caught.value)


async def test_without_prestart_each_job_still_gets_its_network(
    queue: str, base: Path, submitter: Submitter, other_host: OtherHost
) -> None:
    """prestart = no: the sandbox (and its slirp4netns) is made when the job comes, and ended with it."""
    node = await policy_node(queue, base, "services", prestart="no")
    try:
        seen = await reachability(submitter, other_host)
        assert seen["broker"].startswith("failed") and seen["other"].startswith("ok other-host"), seen
        no_slirp_left()  # nothing waits ahead: the job's own ended with it
        headers = {"Cmd": q("service.sh"), "Out": q("out")}
        mid = await submitter.send(headers, body=raw_zip(("service.sh", SERVICE, 0o100755)))
        host, port = await endpoint_of(base, mid)
        assert await asyncio.to_thread(connect, host, port, b"stop") == "ok bye"
        assert (await submitter.wait_final(mid, 30))[-1].status == 4
    finally:
        await node.stop()
    no_slirp_left()
