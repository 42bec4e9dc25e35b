"""The node's machine ClassAd: detected from the host, plus ``[machine]``.

Detection reads /proc and /etc/os-release once at start; ``Disk`` is read
again for every match (:func:`refresh`) because it changes as jobs run.
"""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import classad2

from carod import __version__
from carod.classads import ad_from_expressions
from carod.config import Config

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
    ad["TotalSlots"] = config.slots_for(n_cpus)
    ad["CarodVersion"] = __version__
    ad["HasFileTransfer"] = True
    ad["Start"] = classad2.ExprTree(config.node.start)
    ad.update(ad_from_expressions(config.machine, section="machine"))
    return ad


def refresh(ad: classad2.ClassAd, config: Config) -> None:
    """Update the attributes that change while the node runs."""
    ad["Disk"] = disk_kib(config.node.sandbox_root)
    for name, text in config.machine:
        if name == "Disk":
            ad["Disk"] = classad2.ExprTree(text)
