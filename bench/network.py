"""What a job's network costs per sandbox, measured (docs/performance.md, issue 17).

    .venv/bin/python -m bench.network [--runs 20]

As root, with slirp4netns installed. For each policy that attaches
slirp4netns (carod.sandbox.network): the time to attach it to a fresh
network namespace (as carod does while a sandbox is started ahead) and to
end it (as at a job's end), p50 and max; then the time of one TCP
connect+echo+close to "another host" (a network namespace behind a veth
pair) from the host's namespace and through slirp4netns. Not part of the tests.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from carod.sandbox import network

SLIRP = network.Tools("/usr/bin/slirp4netns", "/usr/bin/unshare", "/usr/bin/nsenter", services=False)
OTHER_NS, HOST_IF, OTHER_IF = "carod-bench-net", "cvhbench", "cvobench"
HOST_ADDR, OTHER_ADDR, PORT = "10.213.251.1", "10.213.251.2", 9000

CLIENT = f"""
import socket, statistics, time
times = []
for _ in range(300):
    t = time.perf_counter()
    with socket.create_connection(({OTHER_ADDR!r}, {PORT})) as s:
        s.sendall(b"x"); s.recv(10)
    times.append((time.perf_counter() - t) * 1e3)
times.sort()
print(f"p50 {{statistics.median(times):.2f}} ms, p90 {{times[len(times) * 9 // 10]:.2f}} ms")
"""
SERVER = f"""
import socket
s = socket.create_server(({OTHER_ADDR!r}, {PORT}))
print("up", flush=True)
while True:
    c, _ = s.accept(); c.sendall(c.recv(10)); c.close()
"""


def namespace() -> subprocess.Popen[bytes]:
    """A stand-in for bubblewrap's chain: its child is in a new network namespace and has a child."""
    return subprocess.Popen(
        ["unshare", "--net", "--fork", "--pid", "--kill-child", "--", "sh", "-c", "ip link set lo up; sleep 600"]
    )


def attach_cost(tools: network.Tools, per_job: int, runs: int) -> str:
    blocks = network.PortBlocks(61000, 65535, per_job) if tools.services else None
    up, down = [], []
    for _ in range(runs):
        chain = namespace()
        try:
            start = time.perf_counter()
            attached = network.attach(tools, chain.pid, blocks)
            ready = time.perf_counter()
            attached.stop()
            down.append((time.perf_counter() - ready) * 1e3)
            up.append((ready - start) * 1e3)
        finally:
            chain.kill()
            chain.wait()
    return (
        f"attach p50 {statistics.median(up):.1f} ms (max {max(up):.1f}), "
        f"end p50 {statistics.median(down):.1f} ms (max {max(down):.1f})"
    )


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def latency() -> None:
    run("ip", "netns", "add", OTHER_NS)
    server = None
    try:
        run("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", OTHER_IF)
        run("ip", "link", "set", OTHER_IF, "netns", OTHER_NS)
        run("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", HOST_IF)
        run("ip", "link", "set", HOST_IF, "up")
        run("ip", "-n", OTHER_NS, "addr", "add", f"{OTHER_ADDR}/24", "dev", OTHER_IF)
        run("ip", "-n", OTHER_NS, "link", "set", OTHER_IF, "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", OTHER_NS, sys.executable, "-c", SERVER], stdout=subprocess.PIPE
        )
        assert server.stdout is not None
        server.stdout.readline()
        host = subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True, check=True)
        print(f"  connect+echo+close from the host's namespace: {host.stdout.strip()}")
        chain = namespace()
        attached = network.attach(SLIRP, chain.pid, None)
        try:
            child = Path(f"/proc/{chain.pid}/task/{chain.pid}/children").read_text().split()[0]
            inside = subprocess.run(
                ["nsenter", f"--net=/proc/{child}/ns/net", sys.executable, "-c", CLIENT],
                capture_output=True,
                text=True,
                check=True,
            )
            print(f"  connect+echo+close through slirp4netns:       {inside.stdout.strip()}")
        finally:
            attached.stop()
            chain.kill()
            chain.wait()
    finally:
        if server is not None:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", OTHER_NS], capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    print(f"outbound:               {attach_cost(SLIRP, 64, args.runs)}")
    for per_job in (16, 64, 256):
        tools = network.Tools(SLIRP.slirp4netns, SLIRP.unshare, SLIRP.nsenter, services=True)
        print(f"services, {per_job:3d} ports:  {attach_cost(tools, per_job, args.runs)}")
    latency()


if __name__ == "__main__":
    main()
