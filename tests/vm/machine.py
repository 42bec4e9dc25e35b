"""The test VM: a Debian 12 guest with systemd and cgroup v2 under QEMU, booted once per run.

scripts/vm-image builds (or finds in its cache) the image; :func:`boot` gives the guest a COPY
of carod and its libraries (a read-only disk) and shares the guest driver with it
(9p; the guest writes there as root, so never the checkout itself), boots it with software
emulation and the host's broker port as its only way out, and returns what the guest driver
recorded once the guest has powered itself off. Nothing is left behind: the QEMU process is
waited for (killed past its deadline), the share, carod's disk and the root disk's copy-on-write layer
are removed.
"""

from __future__ import annotations

import compileall
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from packaging.requirements import Requirement

REPO = Path(__file__).parents[2]
GUEST = Path(__file__).parent / "guest"
#: The guest's broker address: QEMU forwards it to the host's broker (guestfwd).
GUEST_BROKER_HOST = "10.0.2.100"
#: A whole run (boot, scenarios, power-off) takes ~5 min on a quiet 2-core host under TCG, ~12 on a
#: busy one; past this it is stuck.
BOOT_DEADLINE_S = 1800.0
#: CAROD_VM_TESTS=skip turns the VM tests into skips, for developers without the time or QEMU.
#: CI never sets it: a missing QEMU or image fails them there.
OPT_OUT = os.environ.get("CAROD_VM_TESTS", "") == "skip"
# CAROD_VM_KEEP=DIR copies what the guest wrote and its console there, to look at after a run.


@dataclass
class Run:
    results: dict[str, Any]
    console: str
    journal: str
    image_s: float
    boot_s: float
    returncode: int | None
    params: dict[str, Any] = field(default_factory=dict)

    def explain(self) -> str:
        """The end of the guest's console and carod's journal, for a failing assertion."""
        return (
            f"\n--- guest console (last 40 lines)\n{_tail(self.console, 40)}"
            f"\n--- carod's journal in the guest (last 40 lines)\n{_tail(self.journal, 40)}"
        )


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def image() -> tuple[Path, float]:
    """The cached image's directory (built when missing) and the seconds that took."""
    began = time.monotonic()
    done = subprocess.run([str(REPO / "scripts" / "vm-image")], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/vm-image failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1]), time.monotonic() - began


def _runtime_distributions() -> list[importlib.metadata.Distribution]:
    """carod's dependencies (not its extras), recursively, as installed here."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [Requirement(r) for r in importlib.metadata.requires("carod") or []]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        dist = importlib.metadata.distribution(req.name)
        seen[name] = dist
        todo.extend(Requirement(r) for r in dist.requires or [])
    return list(seen.values())


def _copy_site_packages(site: Path) -> None:
    """Every file of carod's runtime dependencies (with their compiled bytecode), into ``site``."""
    for dist in _runtime_distributions():
        root = Path(str(dist.locate_file("")))
        for rel in dist.files or []:
            source = root / rel
            if ".." in rel.parts or not source.is_file():
                continue
            target = site / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            cached = source.parent / "__pycache__"
            if source.suffix == ".py" and cached.is_dir():
                for pyc in cached.glob(f"{source.stem}.cpython-{sys.version_info[0]}{sys.version_info[1]}*.pyc"):
                    (target.parent / "__pycache__").mkdir(exist_ok=True)
                    shutil.copy2(pyc, target.parent / "__pycache__" / pyc.name)


def make_share(share: Path, disk: Path, params: dict[str, Any]) -> None:
    """The share (the guest driver, params.json, out/) and the disk of carod, its unit and libraries.

    carod reaches the guest as a small read-only ext4 disk, not through 9p, which pays per file
    under emulation (copying the ~850 files one by one took the guest over 3 minutes on a busy
    host, unpacking a tar of them one); the guest mounts it where it runs carod from.
    """
    staging = share.parent / "staging"
    ignore = shutil.ignore_patterns("*.pyc.*", ".mypy_cache")
    shutil.copytree(REPO / "carod", staging / "src" / "carod", ignore=ignore)
    # Bytecode made here (the guest's Python is also 3.11) spares the emulated guest compiling it.
    compileall.compile_dir(staging / "src" / "carod", quiet=1)
    shutil.copytree(REPO / "systemd", staging / "src" / "systemd")
    _copy_site_packages(staging / "site")
    size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
    with open(disk, "wb") as f:
        f.truncate(int(size * 1.5) + 32 * 1024 * 1024)
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    subprocess.run([mkfs, "-q", "-d", str(staging), str(disk)], check=True)
    shutil.rmtree(staging)
    shutil.copytree(GUEST, share / "guest", ignore=ignore)
    (share / "out").mkdir()
    (share / "params.json").write_text(json.dumps(params))


def guest_broker_url(host_url: str) -> tuple[str, str]:
    """(the URL the guest uses, the host's 'host:port' QEMU forwards it to)."""
    parts = urlsplit(host_url)
    port = parts.port or 5672
    if parts.scheme != "amqp":
        raise ValueError(f"the VM tests need a plain amqp:// broker URL, not {parts.scheme}://")
    credentials = f"{parts.username or 'guest'}:{parts.password or 'guest'}@"
    guest = urlunsplit(("amqp", f"{credentials}{GUEST_BROKER_HOST}:{port}", parts.path or "/", "", ""))
    return guest, f"{parts.hostname or '127.0.0.1'}:{port}"


def qemu_command(images: Path, share: Path, disk: Path, console: Path, target: str, port: int) -> list[str]:
    # KVM here is PVM and does not boot Debian's kernels (docs/operations.md): software emulation.
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "1536",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        f"file:{console}",
        "-kernel",
        str(images / "vmlinuz"),
        "-initrd",
        str(images / "initrd.img"),
        "-append",
        "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 mitigations=off panic=-1 "
        "systemd.show_status=0 loglevel=4",
        # The cached image stays as it is: the guest writes to a temporary layer QEMU removes.
        "-drive",
        f"file={images / 'rootfs.raw'},format=raw,if=virtio,snapshot=on",
        # carod and its libraries: the guest's /dev/vdb.
        "-drive",
        f"file={disk},format=raw,if=virtio,readonly=on",
        "-virtfs",
        f"local,path={share},mount_tag=carod,security_model=none,id=carod",
        # No network but the host's broker port: restrict=on, one forward through socat.
        "-netdev",
        f"user,id=net0,restrict=on,guestfwd=tcp:{GUEST_BROKER_HOST}:{port}-cmd:socat - TCP:{target}",
        "-device",
        "virtio-net-pci,netdev=net0",
    ]


def boot(host_broker_url: str, queue: str, exchange: str, max_job_pids: int) -> Run:
    """Build or find the image, boot the guest with the driver, and return what it recorded."""
    images, image_s = image()
    guest_url, target = guest_broker_url(host_broker_url)
    port = int(target.rsplit(":", 1)[1])
    params = {
        "broker_url": guest_url,
        "broker_port": port,
        "queue": queue,
        "exchange": exchange,
        "max_job_pids": max_job_pids,
    }
    workdir = Path(tempfile.mkdtemp(prefix=f"carod-vm-{uuid.uuid4().hex[:6]}-"))
    try:
        share, disk = workdir / "share", workdir / "carod.img"
        share.mkdir()
        make_share(share, disk, params)
        console = workdir / "console.log"
        scratch = workdir / "tmp"  # QEMU's snapshot layer goes here (TMPDIR), and with it
        scratch.mkdir()
        env = {**os.environ, "TMPDIR": str(scratch)}
        began = time.monotonic()
        proc = subprocess.Popen(
            qemu_command(images, share, disk, console, target, port),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            output, _ = proc.communicate(timeout=BOOT_DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        finally:  # an interrupted or timed-out test leaves no QEMU behind either
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        boot_s = time.monotonic() - began
        results_file = share / "out" / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        text = console.read_text(errors="replace") if console.exists() else ""
        if output:
            text += "\n--- qemu\n" + output.decode(errors="replace")
        keep = os.environ.get("CAROD_VM_KEEP")
        if keep:  # what the guest wrote (results, carod's journal, systemd's boot log) and its console
            shutil.copytree(share / "out", Path(keep), dirs_exist_ok=True)
            if console.exists():
                shutil.copy2(console, Path(keep) / "console.log")
        journal_file = share / "out" / "journal.txt"
        journal = journal_file.read_text(errors="replace") if journal_file.exists() else ""
        return Run(results, _strip(text), journal, image_s, boot_s, proc.returncode, params)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _strip(console: str) -> str:
    """The console without terminal escapes."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console)
