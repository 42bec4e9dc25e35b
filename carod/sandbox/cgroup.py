"""One control group per job: limits, usage, and a kill that catches every process.

carod uses the cgroup hierarchy it finds (docs/security.md):

* **v2** (unified): a ``carod-<id>`` directory next to carod's own cgroup,
  with the ``memory``, ``pids`` and ``cpu`` controllers that are available
  enabled for it; a job's cgroup gets ``memory.max``, ``pids.max``,
  ``cpu.max``; it is killed with ``cgroup.kill``. Under systemd this needs
  ``Delegate=yes``. When carod's own cgroup holds processes and is not the
  root, carod moves itself into a ``supervisor`` leaf first (the "no internal
  processes" rule).
* **v1**: the same directory in each of the ``memory``, ``pids``, ``cpu``,
  ``cpuacct`` and ``freezer`` hierarchies; killed by freezing the cgroup,
  SIGKILLing every member and thawing it, so a fork cannot escape the kill.

``<id>`` is derived from carod's state directory, so two carod processes on one
host (each has its own journal) never touch each other's jobs. Every function
here does blocking file work: call it from a thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from carod.errors import CarodError
from carod.sandbox import procfs

log = logging.getLogger("carod.cgroup")

V2_CONTROLLERS = ("memory", "pids", "cpu")
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
CPU_PERIOD_US = 100_000
KILL_TIMEOUT_S = 5.0
#: After a job's main process exited, how long its last processes may take to end by themselves
#: (bubblewrap's init tearing its PID namespace down) before the cgroup is frozen and killed.
SETTLE_TIMEOUT_S = 0.02


class CgroupError(CarodError):
    """The cgroup file system refused something carod needs."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True)
class Usage:
    user_cpu_s: float
    sys_cpu_s: float
    #: Peak memory of the whole job (all its processes), None when not measured.
    peak_memory_kib: int | None
    oom_kills: int
    #: Memory the job uses now (KiB), None when not measured.
    memory_kib: int | None = None


def parent_name(state_dir: Path) -> str:
    return "carod-" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _keyed(path: Path) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.events, memory.oom_control) as a dict."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in _read(path).splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value)
    return values


def _mounts() -> tuple[Path | None, dict[str, Path]]:
    """(the cgroup2 mount, {v1 controller: its mount})."""
    v2: Path | None = None
    v1: dict[str, Path] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _source, options = [*right.split(), "", "", ""][:3]
            mount = Path(fields[4])
            if fstype == "cgroup2" and v2 is None:
                v2 = mount
            elif fstype == "cgroup":
                for option in options.split(","):
                    if option in V1_CONTROLLERS:
                        v1.setdefault(option, mount)
    return v2, v1


def _own_paths() -> dict[str, str]:
    """carod's own cgroup per controller ("" = the v2 hierarchy)."""
    paths: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                paths[controller] = path
    return paths


class Cgroups:
    """The host's cgroup hierarchy as carod uses it. Build with :func:`detect`."""

    version = "none"

    def __init__(self, parent_dirs: list[Path], controllers: frozenset[str]) -> None:
        self.parent_dirs = parent_dirs
        #: what it can limit: a subset of memory, pids, cpu
        self.controllers = controllers

    def describe(self) -> str:
        limits = ", ".join(sorted(self.controllers & {"memory", "pids", "cpu"})) or "no limits"
        return f"cgroup {self.version} at {self.parent_dirs[0]} ({limits})"

    def job(self, name: str) -> JobCgroup:
        raise NotImplementedError

    def create(self, name: str, limits: Limits) -> JobCgroup:
        group = self.job(name)
        try:
            for directory in group.dirs:
                os.mkdir(directory, 0o755)
            group.apply(limits)
        except OSError as exc:
            group.remove()
            raise CgroupError(f"cannot create the job's cgroup {group.dirs[0]}: {exc.strerror}") from exc
        return group

    def leftovers(self) -> list[JobCgroup]:
        """Job cgroups a previous carod left behind (it died while they ran)."""
        names: set[str] = set()
        for parent in self.parent_dirs:
            with contextlib.suppress(OSError), os.scandir(parent) as it:
                names.update(e.name for e in it if e.is_dir(follow_symlinks=False) and e.name.startswith("job-"))
        return [self.job(name) for name in sorted(names)]

    def close(self) -> None:
        """Remove carod's parent directories if no job is left in them."""
        for parent in self.parent_dirs:
            with contextlib.suppress(OSError):
                os.rmdir(parent)


class JobCgroup:
    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self.name = dirs[0].name

    def apply(self, limits: Limits) -> None:
        raise NotImplementedError

    def add(self, pid: int) -> None:
        """Move ``pid`` into the job's cgroup (every hierarchy)."""
        for directory in self.dirs:
            _write(directory / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for directory in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in _read(directory / "cgroup.procs").split())
        return sorted(found)

    def signal(self, sig: int, uid: int | None = None) -> None:
        """Send ``sig`` to every process in the cgroup (only those of ``uid`` when given)."""
        for pid in self.pids():
            if uid is not None and procfs.uid_of(pid) != uid:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def exists(self) -> bool:
        return any(d.is_dir() for d in self.dirs)

    def kill(self, timeout_s: float = KILL_TIMEOUT_S) -> bool:
        """SIGKILL every process and wait until they are gone. False if some are left."""
        if not self.exists() or not self.pids():
            return True
        return self._kill(time.monotonic() + timeout_s)

    def _kill(self, deadline: float) -> bool:
        raise NotImplementedError

    def usage(self) -> Usage:
        raise NotImplementedError

    def remove(self) -> None:
        for directory in reversed(self.dirs):
            for delay in (0, 0.005, 0.02, 0.1, 0.3):
                time.sleep(delay)
                try:
                    os.rmdir(directory)
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        log.warning("cannot remove cgroup %s: %s", directory, exc.strerror)
                        break
                else:
                    break

    def _wait_empty(self, deadline: float) -> bool:
        # Polled from 0.1 ms up to 2 ms apart: what is left is usually a process in its last
        # fraction of a millisecond of exiting (bubblewrap's init emptying its PID namespace).
        delay = 0.0001
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
        return True

    def settle(self, timeout_s: float = SETTLE_TIMEOUT_S) -> bool:
        """Wait briefly for the processes left to end by themselves (blocking). True when none is left."""
        return self._wait_empty(time.monotonic() + timeout_s)


# ---------------------------------------------------------------- v2


class V2(Cgroups):
    version = "v2"

    def job(self, name: str) -> JobCgroup:
        return V2Job([self.parent_dirs[0] / name], self.controllers)


class V2Job(JobCgroup):
    def __init__(self, dirs: list[Path], controllers: frozenset[str]) -> None:
        super().__init__(dirs)
        self.controllers = controllers

    def apply(self, limits: Limits) -> None:
        d = self.dirs[0]
        if limits.memory_bytes is not None and "memory" in self.controllers:
            _write(d / "memory.max", str(limits.memory_bytes))
            with contextlib.suppress(FileNotFoundError):
                _write(d / "memory.swap.max", "0")
        if limits.pids is not None and "pids" in self.controllers:
            _write(d / "pids.max", str(limits.pids))
        if limits.cpus is not None and "cpu" in self.controllers:
            _write(d / "cpu.max", f"{max(1000, int(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")

    def _kill(self, deadline: float) -> bool:
        d = self.dirs[0]
        try:
            _write(d / "cgroup.kill", "1")
        except FileNotFoundError:
            return _freeze_and_kill(self, d / "cgroup.freeze", "1", "0", deadline)
        except OSError:
            return not self.pids()
        return self._wait_empty(deadline)

    def usage(self) -> Usage:
        d = self.dirs[0]
        cpu = _keyed(d / "cpu.stat")
        peak: int | None = None
        current: int | None = None
        with contextlib.suppress(OSError, ValueError):
            peak = int(_read(d / "memory.peak")) // 1024
        with contextlib.suppress(OSError, ValueError):
            current = int(_read(d / "memory.current")) // 1024
        return Usage(
            user_cpu_s=cpu.get("user_usec", 0) / 1e6,
            sys_cpu_s=cpu.get("system_usec", 0) / 1e6,
            peak_memory_kib=peak,
            oom_kills=_keyed(d / "memory.events").get("oom_kill", 0),
            memory_kib=current,
        )


# ---------------------------------------------------------------- v1


class V1(Cgroups):
    version = "v1"

    def __init__(self, parents: dict[str, Path]) -> None:
        unique = list(dict.fromkeys(parents.values()))
        super().__init__(unique, frozenset(parents))
        self.parents = parents

    def job(self, name: str) -> JobCgroup:
        return V1Job({controller: parent / name for controller, parent in self.parents.items()})


class V1Job(JobCgroup):
    def __init__(self, by_controller: dict[str, Path]) -> None:
        super().__init__(list(dict.fromkeys(by_controller.values())))
        self.by_controller = by_controller

    def _file(self, controller: str, name: str) -> Path | None:
        d = self.by_controller.get(controller)
        return d / name if d is not None else None

    def apply(self, limits: Limits) -> None:
        if limits.memory_bytes is not None and (f := self._file("memory", "memory.limit_in_bytes")):
            _write(f, str(limits.memory_bytes))
            swap = f.with_name("memory.memsw.limit_in_bytes")
            with contextlib.suppress(FileNotFoundError):
                _write(swap, str(limits.memory_bytes))
        if limits.pids is not None and (f := self._file("pids", "pids.max")):
            _write(f, str(limits.pids))
        if limits.cpus is not None and (f := self._file("cpu", "cpu.cfs_quota_us")):
            _write(f.with_name("cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(f, str(max(1000, int(limits.cpus * CPU_PERIOD_US))))

    def _kill(self, deadline: float) -> bool:
        state = self._file("freezer", "freezer.state")
        if state is None or not state.exists():
            while self.pids():
                self.signal(signal.SIGKILL)
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.002)
            return True
        return _freeze_and_kill(self, state, "FROZEN", "THAWED", deadline)

    def usage(self) -> Usage:
        user_s = sys_s = 0.0
        if f := self._file("cpuacct", "cpuacct.stat"):
            ticks = _keyed(f)
            user_s = ticks.get("user", 0) / procfs.TICKS_PER_S
            sys_s = ticks.get("system", 0) / procfs.TICKS_PER_S
        peak: int | None = None
        current: int | None = None
        oom = 0
        if f := self._file("memory", "memory.max_usage_in_bytes"):
            with contextlib.suppress(OSError, ValueError):
                peak = int(_read(f)) // 1024
            with contextlib.suppress(OSError, ValueError):
                current = int(_read(f.with_name("memory.usage_in_bytes"))) // 1024
            oom = _keyed(f.with_name("memory.oom_control")).get("oom_kill", 0)
        return Usage(user_cpu_s=user_s, sys_cpu_s=sys_s, peak_memory_kib=peak, oom_kills=oom, memory_kib=current)


def _freeze_and_kill(group: JobCgroup, state: Path, frozen: str, thawed: str, deadline: float) -> bool:
    """Freeze (no process can fork meanwhile), SIGKILL all, thaw so the kills land."""
    try:
        try:
            _write(state, frozen)
        except FileNotFoundError:
            return group._wait_empty(deadline)
        # v1 reports FREEZING until every task stopped; v2's cgroup.freeze reads back "1" at once.
        while state.name == "freezer.state" and _read(state).strip() != "FROZEN":
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)
        group.signal(signal.SIGKILL)
    finally:
        with contextlib.suppress(OSError):
            _write(state, thawed)
    return group._wait_empty(deadline)


# ---------------------------------------------------------------- detection


def detect(mode: str, state_dir: Path) -> tuple[Cgroups | None, str]:
    """The cgroups carod will use for ``mode`` (auto|v2|v1|none), and why.

    Raises :class:`CgroupError` when ``mode`` asks for a hierarchy the host
    does not offer.
    """
    if mode == "none":
        return None, "cgroups = none in the config"
    name = parent_name(state_dir)
    v2_mount, v1_mounts = _mounts()
    own = _own_paths()
    reasons: list[str] = []
    v2: Cgroups | None = None
    if mode in ("auto", "v2"):
        if v2_mount is None:
            reasons.append("no cgroup2 file system is mounted")
        else:
            try:
                v2 = _setup_v2(v2_mount, own.get("", "/"), name)
            except OSError as exc:
                reasons.append(f"cgroup v2 at {v2_mount} is not writable ({exc.strerror})")
        if v2 is not None and (mode == "v2" or {"memory", "pids"} <= v2.controllers):
            return v2, ""
        if v2 is not None:
            reasons.append(f"cgroup v2 at {v2_mount} has no memory/pids controllers for carod")
    if mode in ("auto", "v1"):
        try:
            v1 = _setup_v1(v1_mounts, own, name)
            if v1 is None:
                reasons.append("no cgroup v1 hierarchy is mounted")
        except OSError as exc:
            v1 = None
            reasons.append(f"cgroup v1 is not writable ({exc.strerror})")
        if v1 is not None and {"memory", "pids", "freezer"} <= v1.controllers:
            if v2 is not None:
                v2.close()
            return v1, ""
        if v1 is not None:
            v1.close()
            missing = {"memory", "pids", "freezer"} - set(v1.controllers)
            reasons.append(f"cgroup v1 lacks {', '.join(sorted(missing))}")
    if v2 is not None:
        return v2, "; ".join(reasons)
    if mode != "auto":
        raise CgroupError(f"[sandbox] cgroups = {mode}: " + "; ".join(reasons))
    return None, "; ".join(reasons)


def _setup_v2(mount: Path, own: str, name: str) -> Cgroups:
    base = mount / own.lstrip("/")
    available = set(_read(base / "cgroup.controllers").split()) & set(V2_CONTROLLERS)
    if available:
        enabled = set(_read(base / "cgroup.subtree_control").split())
        if not available <= enabled:
            try:
                _enable(base, available)
            except OSError as exc:
                if exc.errno != errno.EBUSY or base == mount:
                    raise
                # "No internal processes": carod moves into a leaf of its own cgroup.
                supervisor = base / "supervisor"
                with contextlib.suppress(FileExistsError):
                    os.mkdir(supervisor)
                for pid in _read(base / "cgroup.procs").split():
                    with contextlib.suppress(OSError):
                        _write(supervisor / "cgroup.procs", pid)
                _enable(base, available)
    parent = base / name
    with contextlib.suppress(FileExistsError):
        os.mkdir(parent, 0o755)
    if available:
        _enable(parent, available)
    return V2([parent], frozenset(available))


def _enable(directory: Path, controllers: set[str]) -> None:
    _write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(controllers)))


def _setup_v1(mounts: dict[str, Path], own: dict[str, str], name: str) -> Cgroups | None:
    parents: dict[str, Path] = {}
    for controller, mount in mounts.items():
        parent = mount / own.get(controller, "/").lstrip("/") / name
        with contextlib.suppress(FileExistsError):
            os.mkdir(parent, 0o755)
        parents[controller] = parent
    return V1(parents) if parents else None


def sweep_user(uid: int, timeout_s: float = KILL_TIMEOUT_S) -> int:
    """SIGKILL every process of ``uid`` until none is left (dedicated slot users only)."""
    deadline = time.monotonic() + timeout_s
    killed = 0
    while True:
        found = [pid for pid in procfs.all_pids() if procfs.uid_of(pid) == uid and procfs.alive(pid)]
        if not found or time.monotonic() > deadline:
            return killed
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(0.002)
