"""A job's network beyond loopback: slirp4netns attached to its sandbox's own namespace.

``[sandbox] network`` (docs/security.md "Network policies", docs/operations.md):

* ``none``: bubblewrap's empty network namespace, loopback only;
* ``outbound``: the same namespace, plus a slirp4netns (user-mode TCP/IP,
  a process outside the sandbox) behind a ``tap0`` interface
  (10.0.2.100/24). The job's connections are made again by slirp4netns
  from the host, so they reach what the host reaches, except the host's own
  loopback (``--disable-host-loopback``): the broker, databases and other
  services listening on 127.0.0.1 stay out of reach;
* ``services``: that, and the sandbox gets a block of the node's
  ``service_ports`` of its own: the kernel picks the job's ephemeral ports
  (a listener on port 0) in it (``ip_local_port_range`` of the sandbox's
  namespace), and every port of the block is forwarded from the host
  (``add_hostfwd`` on 0.0.0.0). So a job listening on port 0 is reached at
  ``$HOSTNAME:$PORT``; two sandboxes never share a port; a port of the
  block nobody listens on accepts and closes at once;
* ``host``: the node's own namespace (the old ``network = yes``).

The helper is attached while the sandbox is started ahead of its job
(carod.sandbox.warm): off the job's critical path. It ends with the
sandbox: carod closes the pipe given as ``--exit-fd`` (and so does the
kernel if carod dies), and waits for it. slirp4netns runs as root in a
mount namespace of its own made private first (its ``--enable-sandbox``
unmounts what it does not need, which would otherwise propagate to the
host's shared mounts, e.g. /run/netns), with its seccomp filter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from carod.config import Config, service_port_range
from carod.errors import EXIT_CONFIG, StartupError

log = logging.getLogger("carod.network")

#: The policies that attach slirp4netns to each sandbox.
HELPED = ("outbound", "services")
#: The longest carod waits for bubblewrap to make the sandbox's network namespace.
NAMESPACE_TIMEOUT_S = 10.0
#: The longest carod waits for slirp4netns to say it is ready, and for one API answer.
READY_TIMEOUT_S = 10.0
#: After its exit pipe is closed, the longest carod waits for slirp4netns to end before SIGKILL.
STOP_TIMEOUT_S = 5.0
#: What the sandbox's interface is (slirp4netns' defaults: 10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3).
TAP = "tap0"
MTU = 65520
_ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ROOT_ENV = {"PATH": _ROOT_PATH, "LC_ALL": "C"}


class NetworkError(OSError):
    """The sandbox's network could not be set up (its sandbox is given up)."""


@dataclass(frozen=True)
class Tools:
    """The programs a helped policy needs, found once at start-up."""

    slirp4netns: str
    unshare: str
    nsenter: str
    services: bool


def detect(config: Config, *, bwrap: str | None, bash: str | None) -> Tools | None:
    """The helper for ``[sandbox] network`` (None for none/host). Raises StartupError (exit 78) when missing."""
    policy = config.sandbox.network
    if policy not in HELPED:
        return None
    where = f"[sandbox] network = {policy}"
    if bwrap is None:
        raise StartupError(
            f"{where} needs bubblewrap (each job's own network namespace); it is not in use", EXIT_CONFIG
        )
    if bash is None:
        raise StartupError(
            f"{where} needs bash 4.4 or newer in /usr/bin or /bin (sandboxes started ahead)", EXIT_CONFIG
        )
    found = {name: shutil.which(name, path=_ROOT_PATH) for name in ("slirp4netns", "unshare", "nsenter")}
    if found["slirp4netns"] is None:
        raise StartupError(f"{where}: slirp4netns is not installed (the slirp4netns package)", EXIT_CONFIG)
    for name in ("unshare", "nsenter"):
        if found[name] is None:
            raise StartupError(f"{where}: {name} (util-linux) is not installed", EXIT_CONFIG)
    try:
        done = subprocess.run(
            [str(found["slirp4netns"]), "--version"], capture_output=True, timeout=10, check=False, env=_ROOT_ENV
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StartupError(f"{where}: slirp4netns does not run here ({exc})", EXIT_CONFIG) from exc
    if done.returncode != 0:
        raise StartupError(f"{where}: slirp4netns does not run here (exit {done.returncode})", EXIT_CONFIG)
    if policy == "services":
        first, last = service_port_range(config.sandbox.service_ports)
        host_first, host_last = host_ephemeral_range()
        if first <= host_last and host_first <= last:
            raise StartupError(
                f"[sandbox] service_ports: {first}-{last} overlaps the host's ephemeral ports "
                f"{host_first}-{host_last} (net.ipv4.ip_local_port_range): choose ports outside it",
                EXIT_CONFIG,
            )
    return Tools(str(found["slirp4netns"]), str(found["unshare"]), str(found["nsenter"]), policy == "services")


def host_ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    try:
        first, last = path.read_text(encoding="ascii").split()
        return int(first), int(last)
    except (OSError, ValueError):
        return 32768, 60999  # the kernel's default


class PortBlocks:
    """The node's service ports cut into per-sandbox blocks; a block is its sandbox's until it ends."""

    def __init__(self, first: int, last: int, per_job: int) -> None:
        self.per_job = per_job
        self._free = deque(range(start, start + per_job) for start in range(first, last - per_job + 2, per_job))
        self.total = len(self._free)
        self._lock = threading.Lock()

    def take(self) -> range | None:
        with self._lock:
            return self._free.popleft() if self._free else None

    def give_back(self, block: range) -> None:
        with self._lock:
            self._free.append(block)

    @classmethod
    def for_node(cls, config: Config, slots: int) -> PortBlocks:
        """Enough blocks for every slot's running job and its next sandbox. Raises StartupError (exit 78)."""
        first, last = service_port_range(config.sandbox.service_ports)
        blocks = cls(first, last, config.sandbox.service_ports_per_job)
        need = 2 * slots + 1
        if blocks.total < need:
            raise StartupError(
                f"[sandbox] service_ports: {first}-{last} holds {blocks.total} blocks of service_ports_per_job = "
                f"{blocks.per_job}; {slots} slots need {need} (a running job and a sandbox started ahead each, "
                "and one more)",
                EXIT_CONFIG,
            )
        return blocks


@dataclass
class Attached:
    """One sandbox's slirp4netns, and its block of service ports."""

    popen: subprocess.Popen[bytes]
    #: the write end of its --exit-fd pipe; -1 once stopped
    exit_fd: int
    ports: range | None = None
    blocks: PortBlocks | None = field(default=None, repr=False)

    def stop(self) -> None:
        """End the helper (its forwarded ports close with it) and free its ports. Idempotent, blocking."""
        if self.exit_fd >= 0:
            os.close(self.exit_fd)
            self.exit_fd = -1
        # It keeps no state: SIGKILL ends it at once (its exit pipe alone takes ~30 ms to be noticed).
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        try:
            self.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("slirp4netns (pid %d) did not end after SIGKILL", self.popen.pid)
        if self.ports is not None and self.blocks is not None:
            self.blocks.give_back(self.ports)
            self.ports = None


def slirp_argv(tools: Tools, *, netns_fd: int, ready_fd: int, exit_fd: int, api_socket: Path | None) -> list[str]:
    """slirp4netns on the namespace open as ``netns_fd``, in a private mount namespace (module docstring)."""
    argv = [tools.unshare, "--mount", "--propagation", "private", "--", tools.slirp4netns]
    argv += ["--configure", f"--mtu={MTU}", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp"]
    argv += ["--ready-fd", str(ready_fd), "--exit-fd", str(exit_fd), "--netns-type=path"]
    if api_socket is not None:
        argv += ["--api-socket", str(api_socket)]
    argv += [f"/proc/self/fd/{netns_fd}", TAP]
    return argv


def port_range_script(block: range) -> list[str]:
    """What runs in the sandbox's namespace (as root, via nsenter) to make ``block`` its ephemeral ports."""
    script = 'echo "$1 $2" > /proc/sys/net/ipv4/ip_local_port_range'
    return ["/bin/sh", "-c", script, "carod-ports", str(block[0]), str(block[-1])]


def open_namespace(chain_pid: int, timeout_s: float = NAMESPACE_TIMEOUT_S) -> int:
    """A descriptor of the network namespace bubblewrap made for the chain ``chain_pid`` (blocking).

    bubblewrap's child is in it. It is taken once that child has started the
    job user's shell (its own child): bubblewrap has set up loopback by then (a
    slirp4netns configuring the namespace meanwhile made that fail). The
    descriptor is opened first and the child checked to be still the chain's
    afterwards, so a pid reused in the meantime cannot give another namespace.
    """
    own = os.stat("/proc/self/ns/net").st_ino
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            children = Path(f"/proc/{chain_pid}/task/{chain_pid}/children").read_text(encoding="ascii").split()
        except OSError as exc:
            raise NetworkError(f"the sandbox ended before its network was set up ({exc.strerror})") from exc
        for child in children:
            try:
                fd = os.open(f"/proc/{child}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                parent = Path(f"/proc/{child}/stat").read_text(encoding="ascii").rpartition(")")[2].split()[1]
            except (OSError, IndexError):
                parent = ""
            if parent == str(chain_pid) and os.fstat(fd).st_ino != own and _has_children(child):
                return fd
            os.close(fd)
        if time.monotonic() > deadline:
            raise NetworkError("bubblewrap made no network namespace for the sandbox in time")
        time.sleep(0.001)


def _has_children(pid: str) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii").strip())
    except OSError:
        return False


def attach(tools: Tools, chain_pid: int, blocks: PortBlocks | None) -> Attached:
    """slirp4netns for the sandbox of ``chain_pid`` (blocking); with services, its ports. Raises NetworkError."""
    ports: range | None = None
    if tools.services:
        ports = blocks.take() if blocks is not None else None
        if ports is None:
            raise NetworkError("no block of [sandbox] service_ports is free")
    netns_fd = ready_r = ready_w = exit_r = exit_w = -1
    api_dir: str | None = None
    attached: Attached | None = None
    try:
        netns_fd = open_namespace(chain_pid)
        if ports is not None:
            _run_in(tools, netns_fd, port_range_script(ports))
            api_dir = tempfile.mkdtemp(prefix="carod-net-")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        exit_r, exit_w = os.pipe2(os.O_CLOEXEC)
        api = Path(api_dir, "api.sock") if api_dir else None
        argv = slirp_argv(tools, netns_fd=netns_fd, ready_fd=ready_w, exit_fd=exit_r, api_socket=api)
        popen = subprocess.Popen(
            argv,
            pass_fds=(netns_fd, ready_w, exit_r),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=_ROOT_ENV,
            start_new_session=True,
        )
        attached = Attached(popen, exit_w, ports, blocks)
        exit_w = -1  # the Attached owns it
        ports = None
        os.close(ready_w)
        ready_w = -1
        _wait_ready(ready_r, popen)
        if api is not None and attached.ports is not None:
            _forward(api, attached.ports)
        return attached
    except BaseException:
        if attached is not None:
            attached.stop()
        raise
    finally:
        for fd in (netns_fd, ready_r, ready_w, exit_r, exit_w):
            if fd >= 0:
                os.close(fd)
        if ports is not None and blocks is not None:
            blocks.give_back(ports)
        if api_dir is not None:
            shutil.rmtree(api_dir, ignore_errors=True)


def _run_in(tools: Tools, netns_fd: int, argv: list[str]) -> None:
    try:
        done = subprocess.run(
            [tools.nsenter, f"--net=/proc/self/fd/{netns_fd}", "--", *argv],
            pass_fds=(netns_fd,),
            capture_output=True,
            timeout=READY_TIMEOUT_S,
            check=False,
            cwd="/",
            env=_ROOT_ENV,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"could not set the sandbox's ports: {exc}") from exc
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()[:200]
        raise NetworkError(f"could not set the sandbox's ports: {why or f'exit {done.returncode}'}")


def _wait_ready(ready_fd: int, popen: subprocess.Popen[bytes]) -> None:
    readable, _, _ = select.select([ready_fd], [], [], READY_TIMEOUT_S)
    if not readable or os.read(ready_fd, 16)[:1] != b"1":
        code = popen.poll()
        state = f"it exited {code}" if code is not None else "not in time"
        raise NetworkError(f"slirp4netns did not set up the sandbox's network ({state})")


def _forward(api: Path, ports: range) -> None:
    """Forward each port of the block from the host (0.0.0.0) to the sandbox, one API request each."""
    refused: list[str] = []
    for port in ports:
        request = {"execute": "add_hostfwd", "arguments": {"proto": "tcp", "host_port": port, "guest_port": port}}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(READY_TIMEOUT_S)
            try:
                sock.connect(str(api))
                sock.sendall(json.dumps(request).encode())
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            except OSError as exc:
                raise NetworkError(f"slirp4netns' API did not answer: {exc}") from exc
        with contextlib.suppress(ValueError):
            reply = json.loads(answer)
            if isinstance(reply, dict) and "return" in reply:
                continue
        refused.append(f"{port} ({answer.decode(errors='replace')[:100]})")
    if refused:
        # A port some host process already holds: the job's listener there is not reached from outside.
        log.warning("service ports not forwarded to a sandbox (in use on the host?): %s", ", ".join(refused[:5]))
