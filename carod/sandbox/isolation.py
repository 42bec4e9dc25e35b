"""The layers between a job and the node, and the command line that applies them.

Every job is started through the same chain (docs/security.md)::

    /bin/sh (gate, root) -> [bwrap (root)] -> setpriv (drops to the job user) -> env (job user) -> Cmd

The root part of the chain (gate, bwrap, setpriv) never sees a byte the job
chose in its environment or working directory: it runs with a fixed
environment (:data:`ROOT_ENV`) in ``/``; the job's variables are arguments
of ``env -i``, which runs as the job user after the switch, enters the
sandbox (``-C``) and execs the job with exactly those variables. (The job's
``Environment = "LD_PRELOAD=./evil.so"`` once ran its library's constructor
as root in the gate and bwrap.)

* the **gate** is a tiny shell that stops itself (SIGSTOP) until carod has
  moved it into the job's cgroup and set its rlimits, so no instruction of
  the job runs outside its limits; on SIGCONT it execs the rest;
* **bubblewrap** (``isolation = auto|bwrap``) gives a read-only system, a
  private /tmp and /dev/shm with a size cap, only the sandbox writable,
  carod's state and the other sandboxes hidden, a PID, IPC and (unless
  ``network = host``) network namespace (with ``outbound`` and ``services``,
  carod.sandbox.network attaches slirp4netns to it);
* **setpriv** switches uid and gid, clears the supplementary groups, sets
  ``no_new_privs`` and empties the capability bounding set.

:func:`command` builds that argv (pure). :func:`detect` looks at the host.
:func:`probe_problems` reads what a probe job saw and says what is wrong.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from carod.config import Config
from carod.errors import EXIT_CONFIG, EXIT_NOPERM, StartupError
from carod.sandbox import chirpdir, cmdpath, network, seccomp
from carod.sandbox.cgroup import CgroupError, Cgroups
from carod.sandbox.cgroup import detect as detect_cgroups
from carod.sandbox.network import Tools as NetworkTools
from carod.sandbox.users import JobUser
from carod.units import MIB

SH = "/bin/sh"
#: The whole environment of the root part of the chain: nothing of the job's.
ROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
#: The root part of the chain runs here, never in the job's sandbox.
ROOT_CWD = "/"
#: Runs a Cmd whose path contains "=" (``env`` would take it for a variable).
EXEC_SCRIPT = 'exec "$0" "$@"'

#: The gate stops itself until carod has put it under its limits and sends SIGCONT.
#: (Should carod die meanwhile, it stays stopped: the next start kills it, carod.sandbox.runner.kill_stopped_gates.)
GATE_SCRIPT = 'kill -STOP $$; exec "$@"'
#: The job user's shell in a sandbox started ahead of its job (carod.sandbox.warm). It reads NUL-ended
#: fields from its stdin until carod closes it: In, Out, Err ("" = as Out), the file size and address space
#: limits in KiB ("" = none), the job's argv (carod.sandbox.isolation.job_exec), then "carod-end". Anything
#: else (carod went away before sending it all) ends it with 125 before any of the job runs. It opens the
#: job's stdio as the job user, sets the limits (hard and soft), and execs the job.
WAIT_SCRIPT = (
    "mapfile -d '' a; n=${#a[@]}; "
    '[ "$n" -ge 7 ] && [ "${a[n-1]}" = carod-end ] || exit 125; '
    'if [ -n "${a[3]}" ]; then ulimit -f "${a[3]}" || exit 125; fi; '
    'if [ -n "${a[4]}" ]; then ulimit -v "${a[4]}" || exit 125; fi; '
    'if [ -z "${a[2]}" ]; then exec <"${a[0]}" >"${a[1]}" 2>&1 || exit 124; '
    'else exec <"${a[0]}" >"${a[1]}" 2>"${a[2]}" || exit 124; fi; '
    'exec "${a[@]:5:n-6}"'
)
#: What the start-up probe job prints: its credentials, namespaces and whether / is writable.
PROBE_SCRIPT = (
    "cat /proc/self/status; "
    'echo "ns-pid $(readlink /proc/self/ns/pid)"; '
    'echo "ns-net $(readlink /proc/self/ns/net)"; '
    "if touch /usr/.carod-probe 2>/dev/null; then echo root-writable; rm -f /usr/.carod-probe; fi; "
    "if unshare -U true 2>/dev/null; then echo userns-allowed; fi"
)


@dataclass(frozen=True)
class Layers:
    """What the host gives this node's jobs, decided once at start-up."""

    bwrap: str | None
    cgroups: Cgroups | None
    #: [sandbox] network: none, outbound, services or host (carod.sandbox.network)
    network: str
    tmp_bytes: int
    hidden: tuple[Path, ...]
    setpriv: str
    #: GNU env with -C (coreutils >= 8.28): sets the job's environment and directory as the job user.
    env: str = "/usr/bin/env"
    #: Files hidden from jobs (an empty read-only file is bound over each): carod's config.
    hidden_files: tuple[Path, ...] = ()
    #: The seccomp filter bubblewrap loads (carod.sandbox.seccomp): no keyrings, no user namespaces unless allowed.
    seccomp: bytes | None = None
    user_namespaces: bool = False
    #: bash (>= 4.4, for ``mapfile -d``): the job user's waiting shell of sandboxes started ahead; None = none.
    bash: str | None = None
    #: ``state_dir/chirp`` (carod.sandbox.chirpdir): each sandbox's chirp directory is bound from here; None = no chirp
    chirp_root: Path | None = None
    notes: tuple[str, ...] = ()
    #: slirp4netns and its helpers, for network = outbound and services (None otherwise)
    net: NetworkTools | None = None

    @property
    def host_network(self) -> bool:
        """Do jobs share the node's network namespace (network = host, or no bubblewrap)?"""
        return self.network == "host" or not self.bwrap

    @property
    def network_policy(self) -> str:
        """What jobs really get, for the machine ad's NetworkPolicy: host when they share the node's namespace."""
        return "host" if self.host_network else self.network

    def job_view(self, box: Path) -> cmdpath.View:
        """What a job in ``box`` sees of the host (for checking its Cmd as it would)."""
        if not self.bwrap:
            return cmdpath.View(PurePosixPath(box))
        hidden = [PurePosixPath("/tmp"), PurePosixPath("/dev/shm"), *(PurePosixPath(p) for p in self.hidden)]
        if not self.host_network:
            hidden.append(PurePosixPath("/run"))
        return cmdpath.View(PurePosixPath(box), tuple(hidden))

    def describe(self) -> str:
        parts = []
        if self.bwrap:
            net = {
                "none": "no network",
                "outbound": "outbound network by slirp4netns",
                "services": "outbound network and service ports by slirp4netns",
            }.get(self.network, "the host's network")
            userns = "no user namespaces" if self.seccomp and not self.user_namespaces else "user namespaces allowed"
            parts.append(f"bubblewrap (read-only /, private /tmp, PID+IPC namespaces, {net}, {userns})")
        else:
            parts.append("no bubblewrap")
        parts.append(self.cgroups.describe() if self.cgroups else "no cgroups (rlimits + process-group kill)")
        parts.append("setpriv (no groups, no_new_privs, no capabilities)")
        return "; ".join(parts)


def detect(config: Config) -> Layers:
    """Decide the layers. Raises StartupError when a required one is missing."""
    sandbox = config.sandbox
    notes: list[str] = []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise StartupError(
            "setpriv (util-linux) is not installed; carod needs it to drop jobs to their user", EXIT_NOPERM
        )
    env = _find_env()
    bwrap: str | None = None
    if sandbox.isolation != "none":
        bwrap, why = _find_bwrap()
        if bwrap is None:
            if sandbox.isolation == "bwrap":
                raise StartupError(f"[sandbox] isolation = bwrap: {why}", EXIT_CONFIG)
            notes.append(f"no bubblewrap isolation: {why} (install the bubblewrap package)")
    else:
        notes.append("no bubblewrap isolation: isolation = none in the config")
    try:
        cgroups, why = detect_cgroups(sandbox.cgroups, config.node.state_dir)
    except (CgroupError, OSError) as exc:
        raise StartupError(str(exc), EXIT_CONFIG) from exc
    if cgroups is None:
        notes.append(f"no cgroups: {why}; limits fall back to rlimits")
    elif why:
        notes.append(f"cgroup {cgroups.version} without the usual limits: {why}")
    hidden = tuple(
        dict.fromkeys([config.node.state_dir, config.node.sandbox_root, *(Path(p) for p in sandbox.hide_paths)])
    )
    if config.path is not None:
        try:
            mode = config.path.stat().st_mode
        except OSError:
            mode = 0
        if mode & 0o004:
            notes.append(
                f"the config file {config.path} is readable by every local user (mode {mode & 0o777:04o}) and "
                "may hold the broker's password: chmod 0640 it (under bubblewrap, jobs see an empty file)"
            )
    filter_program: bytes | None = None
    if bwrap:
        if seccomp.supported():
            filter_program = seccomp.program(user_namespaces=sandbox.user_namespaces)
        else:
            notes.append(
                f"no seccomp filter for {platform.machine()}: jobs can create user namespaces and use keyrings"
            )
    chirp_root: Path | None = None
    if bwrap:
        chirp_root, why = chirpdir.setup(config.node.state_dir)
        if chirp_root is None:
            notes.append(f"no chirp (WantIOProxy jobs are held): {why}")
    bash: str | None = None
    if sandbox.prestart or sandbox.network in network.HELPED:
        bash = _find_bash()
        if bash is None:
            notes.append("sandboxes are not started ahead of jobs: no bash 4.4 or newer in /usr/bin or /bin")
    net = network.detect(config, bwrap=bwrap, bash=bash)
    if sandbox.network == "host" and bwrap:
        notes.append(
            "[sandbox] network = host: jobs share the node's network namespace and reach its loopback "
            "services (the broker, databases); see docs/security.md"
        )
    return Layers(
        bwrap=bwrap,
        cgroups=cgroups,
        network=sandbox.network,
        tmp_bytes=sandbox.tmp_mib * MIB,
        hidden=hidden,
        setpriv=setpriv,
        env=env,
        seccomp=filter_program,
        user_namespaces=config.sandbox.user_namespaces,
        hidden_files=tuple(p for p in [config.path] if p is not None and p.is_file()),
        bash=bash,
        chirp_root=chirp_root,
        notes=tuple(notes),
        net=net,
    )


def _find_env() -> str:
    """GNU env that can change directory (-C): it starts every job as the job user."""
    path = shutil.which("env", path="/usr/bin:/bin")
    if path is not None:
        try:
            done = subprocess.run(
                [path, "-i", "-C", "/", "--", "/bin/true"], capture_output=True, timeout=10, check=False, cwd="/"
            )
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0:
            return path
    raise StartupError(
        "carod needs GNU env with -C (coreutils 8.28 or newer) to start jobs as their user; "
        f"{path or 'env'} does not do it",
        EXIT_NOPERM,
    )


def _find_bash() -> str | None:
    """bash with ``mapfile -d`` (4.4+), for the waiting shell of sandboxes started ahead."""
    path = shutil.which("bash", path="/usr/bin:/bin")
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, "--norc", "--noprofile", "-c", "mapfile -d '' a; [ \"${a[1]}\" = y ]"],
            input=b"x\0y\0",
            capture_output=True,
            timeout=10,
            check=False,
            cwd="/",
            env=ROOT_ENV,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if done.returncode == 0 else None


def _find_bwrap() -> tuple[str | None, str]:
    path = shutil.which("bwrap")
    if path is None:
        return None, "bwrap is not installed"
    if os.geteuid() != 0:
        return None, "carod does not run as root (bwrap without a user namespace needs root)"
    try:
        done = subprocess.run(
            [path, "--ro-bind", "/", "/", "--unshare-pid", "--", "/bin/true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"bwrap does not run here ({exc})"
    if done.returncode != 0:
        return None, f"bwrap does not work here: {done.stderr.decode(errors='replace').strip()}"
    return path, ""


def command(
    layers: Layers, user: JobUser, box: Path, argv: list[str], env: dict[str, str], *, seccomp_fd: int | None = None
) -> list[str]:
    """The whole argv for one job: gate, bubblewrap, setpriv, env, then ``argv``.

    ``seccomp_fd``: a descriptor the chain inherits, holding :attr:`Layers.seccomp` (bwrap reads and closes it).

    Run it with :data:`ROOT_ENV` as its environment and :data:`ROOT_CWD` as
    its directory. Everything the job chose (``argv``, ``env``) comes after
    the last ``--`` of bwrap and setpriv, where they read no options, and
    reaches a program only after the switch to the job user.
    """
    return head(layers, user, box, seccomp_fd=seccomp_fd) + job_exec(layers, box, argv, env)


def head(layers: Layers, user: JobUser, box: Path, *, seccomp_fd: int | None = None) -> list[str]:
    """The part of the chain that knows nothing of the job: gate, bubblewrap, setpriv (the job user's ``--``)."""
    chain = [SH, "-c", GATE_SCRIPT, "carod-gate"]
    if layers.bwrap:
        chain += [layers.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        size = str(layers.tmp_bytes)
        chain += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
        chain += ["--perms", "1777", "--size", size, "--tmpfs", "/dev/shm"]
        if not layers.host_network:
            # Unix sockets of local services (databases, brokers, D-Bus) live under /run.
            chain += ["--tmpfs", "/run"]
        for path in layers.hidden:
            chain += ["--tmpfs", str(path)]
        for path in layers.hidden_files:
            chain += ["--ro-bind", "/dev/null", str(path)]
        chain += ["--bind", str(box), str(box)]
        if layers.chirp_root is not None:  # empty unless the job wants chirp (carod.sandbox.chirpdir)
            chain += ["--ro-bind", str(layers.chirp_root / box.name), chirpdir.MOUNT]
        chain += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent"]
        if not layers.host_network:
            chain.append("--unshare-net")
        if seccomp_fd is not None:
            chain += ["--seccomp", str(seccomp_fd)]
        chain.append("--")
    chain.append(layers.setpriv)
    if user.switch:
        chain += [f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups"]
        chain += ["--bounding-set=-all", "--inh-caps=-all"]
    chain += ["--no-new-privs", "--"]
    return chain


def job_exec(layers: Layers, box: Path, argv: list[str], env: dict[str, str]) -> list[str]:
    """What the job user runs: ``env -i -C box -- VARS... argv`` (exactly the job's variables, in its sandbox)."""
    chain = [layers.env, "-i", "-C", str(box), "--"]
    chain += [f"{name}={value}" for name, value in env.items()]
    if "=" in argv[0]:
        chain += [SH, "-c", EXEC_SCRIPT]
    chain += argv
    return chain


def waiting(layers: Layers, user: JobUser, box: Path, *, seccomp_fd: int | None = None) -> list[str]:
    """The chain of a sandbox started ahead of its job: :func:`head`, then the job user's waiting shell.

    The shell (:data:`WAIT_SCRIPT`) reads the job from its stdin when carod
    sends it (carod.sandbox.warm) and then runs :func:`job_exec`'s argv.
    """
    if layers.bash is None:
        raise ValueError("no bash: sandboxes cannot be started ahead")
    shell = [layers.bash, "--norc", "--noprofile", "-c", WAIT_SCRIPT, "carod-wait"]
    return [*head(layers, user, box, seccomp_fd=seccomp_fd), *shell]


def probe_problems(output: str, user: JobUser, layers: Layers) -> list[str]:
    """What is wrong with the probe job's view of itself (empty = all layers hold)."""
    fields: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("ns-"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
        elif line.strip() in ("root-writable", "userns-allowed"):
            fields[line.strip()] = "yes"
        else:
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
    problems = []
    if not fields:
        return ["the probe job printed nothing"]
    uids = fields.get("Uid", "").split()
    gids = fields.get("Gid", "").split()
    if uids != [str(user.uid)] * 4:
        problems.append(f"it ran with uids {uids}, not {user.uid}")
    if gids != [str(user.gid)] * 4:
        problems.append(f"it ran with gids {gids}, not {user.gid}")
    groups = set(fields.get("Groups", "").split()) - {str(user.gid)}
    if user.switch and groups:
        problems.append(f"it kept supplementary groups {sorted(groups)}")
    if fields.get("NoNewPrivs") != "1":
        problems.append("no_new_privs is not set")
    if user.switch and fields.get("CapEff", "0").strip("0"):
        problems.append(f"it has capabilities {fields.get('CapEff')}")
    if layers.bwrap:
        if fields.get("ns-pid") == os.readlink("/proc/self/ns/pid"):
            problems.append("it shares carod's PID namespace")
        if not layers.host_network and fields.get("ns-net") == os.readlink("/proc/self/ns/net"):
            problems.append("it shares carod's network namespace")
        if "root-writable" in fields:
            problems.append("it can write to /usr")
        if layers.seccomp and not layers.user_namespaces and "userns-allowed" in fields:
            problems.append("it can create a user namespace")
    return problems
