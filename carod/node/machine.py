"""The node's machine ClassAd: detected from the host, plus ``[machine]``.

Detection reads /proc and /etc/os-release once at start (:func:`detect`);
:func:`totals` reads the consumable resources from it. Before every match
and every advert, :func:`update` writes the live values in, as a
partitionable slot shows them: ``Cpus``, ``Memory``, ``Disk`` free now,
``TotalCpus``, ``TotalMemory``, ``TotalDisk``, ``TotalSlots``,
``JobsRunning``, ``LoadAvg``, ``ClockMin``, ``ClockDay``.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from pathlib import Path

import classad2

from carod import __version__
from carod.config import Config
from carod.errors import ConfigError
from carod.node.resources import Resources, Totals
from carod.wire.classads import ad_from_expressions, evaluate

_OS_NAMES = {
    "debian": "Debian",
    "ubuntu": "Ubuntu",
    "rhel": "RedHat",
    "centos": "CentOS",
    "rocky": "Rocky",
    "almalinux": "AlmaLinux",
    "fedora": "Fedora",
    "opensuse-leap": "openSUSE",
    "sles": "SLES",
    "amzn": "AmazonLinux",
}


def arch() -> str:
    machine = platform.machine()
    return {"x86_64": "X86_64", "amd64": "X86_64", "i686": "INTEL", "i386": "INTEL"}.get(machine.lower(), machine)


def os_release(path: Path = Path("/etc/os-release")) -> tuple[str, int]:
    """(OpSysName, OpSysMajorVer) as HTCondor spells them, e.g. ("Debian", 12)."""
    fields: dict[str, str] = {}
    try:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value.strip().strip('"')
    except OSError:
        return ("Linux", 0)
    os_id = fields.get("ID", "linux")
    name = _OS_NAMES.get(os_id, os_id.capitalize())
    version = fields.get("VERSION_ID", "0").split(".", 1)[0]
    return (name, int(version) if version.isdigit() else 0)


def memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


def disk_kib(path: Path) -> int:
    """Free KiB for an unprivileged user under ``path`` (or its nearest parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize // 1024


def detect(config: Config) -> classad2.ClassAd:
    """The machine ad: detected attributes, then ``Start``, then ``[machine]``."""
    name, major = os_release()
    n_cpus = cpus()
    ad = classad2.ClassAd()
    ad["MyType"] = "Machine"
    ad["TargetType"] = "Job"
    ad["Name"] = config.node_name
    ad["Machine"] = socket.getfqdn()
    ad["Arch"] = arch()
    ad["OpSys"] = "LINUX"
    ad["OpSysName"] = name
    ad["OpSysMajorVer"] = major
    ad["OpSysAndVer"] = f"{name}{major}" if major else name
    ad["Memory"] = memory_mib()
    ad["Cpus"] = n_cpus
    ad["Disk"] = disk_kib(config.node.sandbox_root)
    ad["DetectedCpus"] = n_cpus
    ad["DetectedMemory"] = ad["Memory"]
    ad["CarodVersion"] = __version__
    ad["HasFileTransfer"] = True
    ad["PartitionableSlot"] = True
    ad["SlotType"] = "Partitionable"
    ad["DaemonStartTime"] = int(time.time())
    ad["Start"] = classad2.ExprTree(config.node.start)
    #: What a job's network is here (docs/operations.md "Network policy"); set_network_policy
    #: corrects it once the sandbox is known (no bubblewrap: jobs share the host's network).
    ad["NetworkPolicy"] = config.sandbox.network
    ad.update(ad_from_expressions(config.machine, section="machine"))
    return ad


def set_network_policy(ad: classad2.ClassAd, config: Config, policy: str) -> None:
    """``NetworkPolicy`` = what jobs really get (isolation.Layers.network_policy), unless [machine] sets it."""
    if not any(name.lower() == "networkpolicy" for name, _ in config.machine):
        ad["NetworkPolicy"] = policy


def totals(ad: classad2.ClassAd, config: Config) -> Totals:
    """The consumable resources of the whole machine, from the detected ad. Raises ConfigError."""
    values = {}
    for name in ("Cpus", "Memory", "Disk"):
        value = evaluate(ad, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"[machine] {name}: must be a number of at least 0, got {value!r}")
        values[name] = float(value)
    if values["Cpus"] <= 0:
        raise ConfigError(f"[machine] Cpus: must be more than 0, got {values['Cpus']:g}")
    return Totals(
        cpus=values["Cpus"],
        memory_mib=values["Memory"],
        disk_kib=values["Disk"],
        slots=config.slots_for(values["Cpus"]),
    )


def disk_is_fixed(config: Config) -> bool:
    """True when ``[machine] Disk`` sets the disk; otherwise the filesystem's free space caps it."""
    return any(name.lower() == "disk" for name, _ in config.machine)


def update(
    ad: classad2.ClassAd,
    resources: Resources,
    *,
    disk_available_kib: float | None,
    state: str = "Running",
    idle: bool = False,
) -> None:
    """Write the live values into ``ad``; ``idle``: as if nothing ran (would the job ever match here?)."""
    t = resources.totals
    free = resources.free(disk_available_kib)
    if idle:
        cpus, memory, disk, running = t.cpus, t.memory_mib, t.disk_kib, 0
    else:
        cpus, memory, disk, running = free.cpus, free.memory_mib, free.disk_kib, resources.running
    ad["Cpus"] = _number(cpus)
    ad["Memory"] = _number(memory)
    ad["Disk"] = _number(disk)
    ad["TotalCpus"] = _number(t.cpus)
    ad["TotalMemory"] = _number(t.memory_mib)
    ad["TotalDisk"] = _number(t.disk_kib)
    ad["TotalSlots"] = t.slots
    ad["JobsRunning"] = running
    ad["State"] = "Claimed" if running else "Unclaimed"
    ad["Activity"] = "Busy" if running else "Idle"
    ad["NodeState"] = state
    ad["LoadAvg"] = round(os.getloadavg()[0], 2)
    now = time.time()
    local = time.localtime(now)
    ad["MyCurrentTime"] = int(now)
    ad["ClockMin"] = local.tm_hour * 60 + local.tm_min
    ad["ClockDay"] = (local.tm_wday + 1) % 7  # HTCondor: 0 = Sunday


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(value, 3)
