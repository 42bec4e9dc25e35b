"""A private three-node RabbitMQ cluster for the tests, from Debian's rabbitmq-server (issue 19).

Nothing of the machine's own RabbitMQ is used or touched: each node has its own
name (``carodtest<token>-<i>@localhost``), AMQP and distribution ports below the
ephemeral range, data and log directories under the test's folder, an empty
plugin list (no management or Prometheus listener), and the nodes and their CLI
calls talk through an epmd of their own on a port of their own
(``ERL_EPMD_PORT``), so the machine's epmd never lists them. The nodes form the
cluster at boot (peer discovery ``classic_config``). :meth:`RabbitCluster.close`
stops every node, kills what is left of them (their process groups), stops the
private epmd and removes the folder; :meth:`RabbitCluster.leftovers` says what
would still be there.

The broker runs as root here (the test suite runs as root), with HOME set to the
folder holding the cluster's own Erlang cookie.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
SERVER = RABBITMQ_BIN / "rabbitmq-server"
CTL = RABBITMQ_BIN / "rabbitmqctl"
#: The Erlang runtime's epmd (the package's; on PATH only for the rabbitmq user's scripts).
EPMD = shutil.which("epmd") or next(iter(sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None)
#: Ports are chosen below the kernel's ephemeral range (32768-60999): an outgoing connection
#: (e.g. the rabbitmqctl CLI's own distribution port) may hold any port inside it.
PORT_RANGE = (20000, 32000)
BOOT_TIMEOUT_S = 120.0


def available() -> str | None:
    """Why the cluster cannot run here (None: it can)."""
    if not SERVER.exists() or not CTL.exists():
        return "Debian's rabbitmq-server is not installed (/usr/lib/rabbitmq/bin)"
    if EPMD is None:
        return "epmd (Erlang) is not installed"
    if os.geteuid() != 0:
        return "the broker nodes run as root (scripts/test runs the suite as root)"
    return None


def _free_ports(count: int) -> list[int]:
    """``count`` consecutive TCP ports on 127.0.0.1 that nothing listens on or holds."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        start = rng.randrange(*PORT_RANGE)
        ports = list(range(start, start + count))
        try:
            for port in ports:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return ports
    raise RuntimeError(f"no {count} free consecutive ports in {PORT_RANGE}")


def _answers(port: int) -> bool:
    """An AMQP 0-9-1 listener on ``port`` answers a protocol header with Connection.Start."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(1) == b"\x01"
    except OSError:
        return False


@dataclass
class BrokerNode:
    index: int
    name: str
    port: int
    dist_port: int
    home: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def address(self) -> str:
        """As carod reports it (carod.config.broker_address)."""
        return f"amqp://127.0.0.1:{self.port}/"


@dataclass
class RabbitCluster:
    base: Path
    size: int = 3
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: list[BrokerNode] = field(default_factory=list)
    epmd_port: int = 0
    #: seconds each step took (start, restarts), for the test's report
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ports = _free_ports(2 * self.size + 1)
        self.epmd_port = ports[-1]
        (self.base / "home").mkdir(parents=True, exist_ok=True)
        cookie = self.base / "home" / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (self.base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        (self.base / "enabled_plugins").write_text("[].\n")
        names = [f"carodtest{self.token}-{i}@localhost" for i in range(1, self.size + 1)]
        for i, name in enumerate(names):
            home = self.base / f"node{i + 1}"
            (home / "log").mkdir(parents=True)
            (home / "mnesia").mkdir()
            peers = "".join(f"cluster_formation.classic_config.nodes.{j} = {n}\n" for j, n in enumerate(names, 1))
            (home / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = 127.0.0.1:{ports[i]}\n"
                "loopback_users = none\n"
                "log.console = false\n"
                "log.file.level = info\n"
                "cluster_formation.peer_discovery_backend = classic_config\n" + peers
            )
            self.nodes.append(BrokerNode(i + 1, name, ports[i], ports[self.size + i], home))

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def by_address(self, address: str) -> BrokerNode:
        return next(node for node in self.nodes if node.address == address)

    def by_name(self, name: str) -> BrokerNode:
        return next(node for node in self.nodes if node.name == name)

    # ------------------------------------------------------------ environment

    def _erlang_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.base / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _node_env(self, node: BrokerNode) -> dict[str, str]:
        return {
            **self._erlang_env(),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.home / "log"),
            "RABBITMQ_CONFIG_FILE": str(node.home / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(node.home / "pid"),
            # one scheduler each (this machine may have two CPUs), distribution on loopback only
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+S 1:1 +A 4 -kernel inet_dist_use_interface {127,0,0,1}",
        }

    def ctl(self, node: BrokerNode, *args: str, timeout_s: float = 60) -> str:
        """rabbitmqctl against one node of the cluster (never the machine's own broker)."""
        done = subprocess.run(
            [str(CTL), "-n", node.name, *args],
            env=self._erlang_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {node.name} {' '.join(args)}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    # ------------------------------------------------------------ nodes

    def start(self) -> None:
        """Start every node and return once all answer AMQP and run as one cluster."""
        t0 = time.monotonic()
        for node in self.nodes:
            self.start_node(node, wait=False)
        for node in self.nodes:
            self._wait_answers(node)
        running = self.running_nodes(self.nodes[0])
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise RuntimeError(f"the cluster did not form: running nodes {running}")
        self.timings["cluster_start_s"] = round(time.monotonic() - t0, 1)

    def start_node(self, node: BrokerNode, *, wait: bool = True) -> None:
        t0 = time.monotonic()
        with (node.home / "stdout.log").open("ab") as out:
            node.proc = subprocess.Popen(
                [str(SERVER)],
                env=self._node_env(node),
                cwd=node.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: close() kills what is left of it
            )
        if wait:
            self._wait_answers(node)
            self.timings[f"node{node.index}_restart_s"] = round(time.monotonic() - t0, 1)

    def _wait_answers(self, node: BrokerNode) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not _answers(node.port):
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"broker node {node.name} exited {node.proc.returncode}: {self.log_tail(node)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"broker node {node.name} did not answer within {BOOT_TIMEOUT_S}s")
            time.sleep(0.1)

    def stop_node(self, node: BrokerNode) -> None:
        """Stop the node's whole Erlang VM with SIGTERM (as systemd stops the service) and wait until it is gone.

        The server script passes SIGTERM on to the VM, which shuts RabbitMQ down (connections closed,
        the node leaves its quorums); a signal starts that at once, where ``rabbitmqctl stop`` would
        first spend seconds starting a CLI VM.
        """
        t0 = time.monotonic()
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
        self._reap(node, timeout_s=60)
        self.timings.setdefault("node_stop_s", round(time.monotonic() - t0, 1))

    def _reap(self, node: BrokerNode, timeout_s: float) -> None:
        if node.proc is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout_s)
        _kill_group(node.proc.pid)
        node.proc.wait(10)
        node.proc = None

    def running_nodes(self, via: BrokerNode) -> list[str]:
        out = self.ctl(via, "eval", "rabbit_mnesia:cluster_nodes(running).")
        return re.findall(r"'([^']+)'", out)

    def queue_members(self, via: BrokerNode, queue: str) -> dict[str, str]:
        """A queue's type, leader, members and online members (as rabbitmqctl prints them)."""
        out = self.ctl(via, "list_queues", "-q", "--no-table-headers", "name", "type", "leader", "members", "online")
        for line in out.splitlines():
            parts = line.split("\t")
            if parts and parts[0] == queue:
                return dict(zip(("name", "type", "leader", "members", "online"), parts, strict=False))
        raise RuntimeError(f"no queue {queue!r} on the cluster: {out}")

    def log_tail(self, node: BrokerNode, lines: int = 20) -> str:
        text = ""
        for path in [node.home / "stdout.log", *sorted((node.home / "log").glob("*.log"))]:
            if path.exists():
                text += f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    # ------------------------------------------------------------ the end

    def close(self) -> None:
        """Stop every node, then whatever is left: their processes, the private epmd, the folder."""
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:  # the nodes stop at once
            list(pool.map(self._stop_for_good, self.nodes))
        for pid in self.processes():  # e.g. a node started by hand, or one whose group was left
            _kill(pid)
        if EPMD is not None:
            subprocess.run(
                [str(EPMD), "-port", str(self.epmd_port), "-kill"],
                capture_output=True,
                timeout=10,
                check=False,
            )
        for pid in self.processes():
            _kill(pid)
        shutil.rmtree(self.base, ignore_errors=True)

    def _stop_for_good(self, node: BrokerNode) -> None:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
        self._reap(node, timeout_s=30)  # then killed

    def processes(self) -> list[int]:
        """Processes of this cluster still alive: its nodes (by name), its epmd (by port), its CLI calls."""
        markers = [n.name.split("@")[0].encode() for n in self.nodes] + [
            f"-port {self.epmd_port}".encode(),
            f"ERL_EPMD_PORT={self.epmd_port}".encode(),
            str(self.base).encode(),
        ]
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if any(m in cmdline for m in markers) or f"ERL_EPMD_PORT={self.epmd_port}\0".encode() in environ:
                found.append(int(entry.name))
        return found

    def leftovers(self) -> list[str]:
        """What would show that the cluster is not all gone (empty when it is)."""
        left = [f"process {pid}: {_cmdline(pid)[:160]}" for pid in self.processes()]
        for node in self.nodes:
            for port in (node.port, node.dist_port):
                if _listening(port):
                    left.append(f"a listener on 127.0.0.1:{port} ({node.name})")
        if _listening(self.epmd_port):
            left.append(f"the private epmd on port {self.epmd_port}")
        if EPMD is not None:  # the machine's own epmd (port 4369) never heard of these nodes
            names = subprocess.run([str(EPMD), "-names"], capture_output=True, text=True, timeout=10, check=False)
            left += [f"epmd -names: {line}" for line in names.stdout.splitlines() if self.token in line]
        if self.base.exists():
            left.append(f"the folder {self.base}")
        return left


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is not a listener
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
