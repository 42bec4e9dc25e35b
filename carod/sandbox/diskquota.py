"""A kernel bound on each job's disk: a btrfs image with simple quotas under the sandboxes.

At start-up (:func:`setup`) carod makes a sparse image file
(``<state_dir>/sandboxes.img``, ``[sandbox] disk_image_mib``), formats it
btrfs, loop-mounts it on ``[node] sandbox_root`` (``nosuid,nodev``) and turns
on btrfs *simple quotas* (Linux 6.7+). It is made anew at every start: after a
restart the old sandboxes are garbage.

Each job's sandbox is then a btrfs subvolume in a quota group of its own
(``1/n``) whose referenced-bytes limit is the job's disk limit. The kernel
refuses writes past it (EDQUOT), counts files that are unlinked but still
open and the file system's metadata of the job's files (so many small files
count too), and puts a subvolume or snapshot the job makes inside its sandbox
into the same group (simple quotas inherit the parent's groups), so it cannot
step outside its limit that way. Reading a group's usage is one small sysfs
read. The per-job set-up is five ioctls and its removal three (no process
is started; 70-120 and 60-70 microseconds on the development machine).

Why btrfs and not ext4 or XFS project quotas: those need ``CONFIG_QFMT_V2``
or ``CONFIG_XFS_QUOTA``, which kernels built without disk quotas (like the
one this project is tested on) lack; btrfs quota groups are part of btrfs.
Where the host cannot do this (no root, no loop device, no btrfs, no
``mkfs.btrfs``, a kernel without simple quotas), :func:`setup` says why and
carod falls back to ``RLIMIT_FSIZE`` plus a walk of the sandbox every
``check_interval_s`` (``[sandbox] disk_quota = auto``), or refuses to start
(``required``).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from carod.config import Config
from carod.errors import EXIT_CONFIG, StartupError
from carod.units import MIB

IMAGE_NAME = "sandboxes.img"
#: The smallest image mkfs.btrfs is happy with, with room for a few jobs.
MIN_IMAGE_MIB = 256
#: Usage this close to the limit counts as "at the limit" (the kernel stops a
#: write a little before the limit: metadata reservations, the last partial write).
SLACK_MIN_BYTES = MIB
SLACK_FRACTION = 200
#: The smallest limit a sandbox's quota group gets (kernel_limit_bytes).
MIN_LIMIT_BYTES = 4 * MIB

_SBIN = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
_MNT_DETACH = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0x94 << 8) | nr


_WRITE, _READ = 1, 2
_VOL_ARGS_SIZE = 4096  # struct btrfs_ioctl_vol_args: s64 fd, char name[4088]
_IOC_SUBVOL_CREATE = _ioc(_WRITE, 14, _VOL_ARGS_SIZE)
_IOC_SNAP_DESTROY = _ioc(_WRITE, 15, _VOL_ARGS_SIZE)
_IOC_INO_LOOKUP = _ioc(_READ | _WRITE, 18, 4096)  # u64 treeid, u64 objectid, char name[4080]
_IOC_FS_INFO = _ioc(_READ, 31, 1024)  # u64 max_id, u64 num_devices, u8 fsid[16], ...
_IOC_QUOTA_CTL = _ioc(_READ | _WRITE, 40, 16)  # u64 cmd, u64 status
_IOC_QGROUP_ASSIGN = _ioc(_WRITE, 41, 24)  # u64 assign, u64 src, u64 dst
_IOC_QGROUP_CREATE = _ioc(_WRITE, 42, 16)  # u64 create, u64 qgroupid
_IOC_QGROUP_LIMIT = _ioc(_READ, 43, 48)  # u64 qgroupid; u64 flags, max_rfer, max_excl, rsv_rfer, rsv_excl
_QUOTA_CTL_ENABLE_SIMPLE_QUOTA = 4
_QGROUP_LIMIT_MAX_RFER = 1
_FIRST_FREE_OBJECTID = 256
_LEVEL_SHIFT = 48


class QuotaError(OSError):
    """A quota operation the kernel refused (an OSError, so callers treat it as one)."""


def _ioctl(fd: int, request: int, arg: bytearray, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise QuotaError(exc.errno or errno.EIO, f"{what}: {exc.strerror}") from exc


def _vol_args(name: str) -> bytearray:
    raw = name.encode()
    if len(raw) >= _VOL_ARGS_SIZE - 8 or "/" in name or b"\0" in raw:
        raise QuotaError(errno.EINVAL, f"not a subvolume name: {name!r}")
    buf = bytearray(_VOL_ARGS_SIZE)
    buf[8 : 8 + len(raw)] = raw
    return buf


def _level1(group: int) -> int:
    return (1 << _LEVEL_SHIFT) | group


def kernel_limit_bytes(limit_bytes: int) -> int:
    """The quota group's limit for a job limit: never below :data:`MIN_LIMIT_BYTES`.

    btrfs reserves whole tree blocks for the records of a job's files, so a
    tiny limit (HTCondor ads often say ``RequestDisk = DiskUsage``, tens of
    KiB) would refuse even the job's ``Out`` file.
    """
    return max(limit_bytes, MIN_LIMIT_BYTES)


def limit_slack_bytes(limit_bytes: int) -> int:
    """How far below its limit a sandbox counts as full (docs/security.md)."""
    return max(SLACK_MIN_BYTES, limit_bytes // SLACK_FRACTION)


@dataclass
class DiskQuota:
    """The mounted image and its quota groups.

    Each method is one to five ioctls or a sysfs read (tens of microseconds);
    :meth:`destroy` of a sandbox holding nested subvolumes may fall back to a
    file-by-file removal by the caller, so call it in a thread.
    """

    root: Path
    image: Path
    size_bytes: int
    #: /sys/fs/btrfs/<fsid>/qgroups
    sysfs: Path
    root_fd: int
    _next_group: int = 1
    #: group -> the subvolume id of its sandbox
    _subvolumes: dict[int, int] = field(default_factory=dict)
    #: quota groups of ended jobs, deleted once the kernel lets go of them
    _retired: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=4096))
    #: jobs are set up and removed from several threads at once
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def describe(self) -> str:
        return f"disk: btrfs quota per sandbox on a {self.size_bytes // MIB} MiB image"

    def make_box(self, path: Path) -> None:
        """Create ``path`` (a direct child of the root) as a subvolume; raises OSError like mkdir."""
        if path.parent != self.root:
            raise QuotaError(errno.EINVAL, f"{path} is not directly under {self.root}")
        _ioctl(self.root_fd, _IOC_SUBVOL_CREATE, _vol_args(path.name), "cannot create the sandbox subvolume")

    def attach(self, box: Path) -> int:
        """Put the subvolume ``box`` into a new quota group of its own; returns the group's number."""
        fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            lookup = bytearray(4096)
            struct.pack_into("QQ", lookup, 0, 0, _FIRST_FREE_OBJECTID)
            _ioctl(fd, _IOC_INO_LOOKUP, lookup, "cannot read the sandbox's subvolume id")
        finally:
            os.close(fd)
        (subvolume,) = struct.unpack_from("Q", lookup, 0)
        with self._lock:
            group = self._next_group
            self._next_group += 1
        qgroup = _level1(group)
        _ioctl(self.root_fd, _IOC_QGROUP_CREATE, bytearray(struct.pack("QQ", 1, qgroup)), "cannot create a quota group")
        assign = bytearray(struct.pack("QQQ", 1, subvolume, qgroup))
        _ioctl(self.root_fd, _IOC_QGROUP_ASSIGN, assign, "cannot put the sandbox in its quota group")
        with self._lock:
            self._subvolumes[group] = subvolume
        return group

    def limit(self, group: int, limit_bytes: int) -> None:
        """Set the group's hard limit on referenced bytes (at least MIN_LIMIT_BYTES: kernel_limit_bytes)."""
        limit_bytes = kernel_limit_bytes(limit_bytes)
        args = bytearray(struct.pack("QQQQQQ", _level1(group), _QGROUP_LIMIT_MAX_RFER, limit_bytes, 0, 0, 0))
        _ioctl(self.root_fd, _IOC_QGROUP_LIMIT, args, "cannot set the sandbox's disk limit")

    def used_bytes(self, group: int) -> int:
        """What the group's sandbox takes now (data and metadata; unlinked open files too). One sysfs read."""
        try:
            text = (self.sysfs / f"1_{group}" / "referenced").read_text(encoding="ascii")
            return int(text.strip())
        except (OSError, ValueError) as exc:
            raise QuotaError(errno.EIO, f"cannot read the sandbox's disk usage: {exc}") from exc

    def destroy(self, box: Path, group: int | None) -> bool:
        """Delete the sandbox subvolume whatever it holds (the kernel frees it in the background).

        False when the kernel refused (e.g. the job made subvolumes inside it):
        the caller then removes the tree file by file. The job's quota group
        is deleted too (the kernel deletes the subvolume's own group once it
        has freed it); one still in use is tried again at later calls.
        """
        deleted = False
        if box.parent == self.root:
            try:
                _ioctl(self.root_fd, _IOC_SNAP_DESTROY, _vol_args(box.name), "cannot delete the sandbox subvolume")
                deleted = True
            except QuotaError as exc:
                deleted = exc.errno == errno.ENOENT
        if group is not None:
            with self._lock:
                subvolume = self._subvolumes.pop(group, None)
            if deleted and subvolume is not None:
                with contextlib.suppress(OSError):  # then the group is empty and goes at once
                    fcntl.ioctl(
                        self.root_fd, _IOC_QGROUP_ASSIGN, bytearray(struct.pack("QQQ", 0, subvolume, _level1(group)))
                    )
            self._retired.appendleft(group)
        self._forget_retired()
        return deleted

    def _forget_retired(self, attempts: int = 4) -> None:
        """Delete a few quota groups of ended jobs; a group still in use stays for a later try."""
        for _ in range(attempts):
            try:
                group = self._retired.popleft()
            except IndexError:
                return
            try:
                fcntl.ioctl(self.root_fd, _IOC_QGROUP_CREATE, bytearray(struct.pack("QQ", 0, _level1(group))))
            except OSError as exc:
                if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    self._retired.append(group)

    def close(self) -> None:
        """At a clean shutdown: detach the file system and delete the image (nothing in it is needed)."""
        with contextlib.suppress(OSError):
            os.close(self.root_fd)
        with contextlib.suppress(OSError):
            unmount_all(self.root, self.image)
        with contextlib.suppress(OSError):
            self.image.unlink()


# ---------------------------------------------------------------- start-up


def image_size_bytes(config: Config) -> int:
    """``[sandbox] disk_image_mib``, or half the space free for the image's file system now."""
    if config.sandbox.disk_image_mib:
        return config.sandbox.disk_image_mib * MIB
    st = os.statvfs(config.node.state_dir)
    return max(MIN_IMAGE_MIB * MIB, (st.f_bavail * st.f_frsize // 2) // MIB * MIB)


def _mounts_on(root: Path) -> list[tuple[str, str]]:
    """(file system type, source) of each mount on ``root``, oldest first."""
    found = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == str(root) and " - " in line:
                after = line.split(" - ", 1)[1].split()
                found.append((after[0], after[1]) if len(after) > 1 else ("", ""))
    return found


def _is_image(source: str, image: Path) -> bool:
    """Whether ``source`` is a loop device over ``image`` (which may since have been deleted)."""
    name = Path(source).name
    if not name.startswith("loop"):
        return False
    try:
        backing = Path(f"/sys/block/{name}/loop/backing_file").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return False
    return backing.removesuffix(" (deleted)") == str(image)


def unmount_all(root: Path, image: Path | None = None) -> int:
    """Detach carod's image mounted on ``root`` (lazily: a leftover process keeps only its own view).

    With ``image``, a mount on ``root`` that is not that image is left alone
    and raises OSError (an operator's own file system there).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    count = 0
    while (mounts := _mounts_on(root)) and count < 16:
        fstype, source = mounts[-1]
        if image is not None and not (fstype == "btrfs" and _is_image(source, image)):
            raise OSError(
                errno.EBUSY, f"{root} is the mount point of another file system ({fstype} {source}), not carod's image"
            )
        if libc.umount2(os.fsencode(root), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot unmount {root}: {os.strerror(err)}")
        count += 1
    return count


def _missing(config: Config) -> str | None:
    """What the host lacks for the image, or None."""
    if os.geteuid() != 0:
        return "carod does not run as root (mounting the image needs root)"
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "no loop devices (/dev/loop-control is missing; in a container, pass it in)"
    try:
        filesystems = Path("/proc/filesystems").read_text(encoding="ascii", errors="replace")
    except OSError:
        filesystems = ""
    if "btrfs" not in filesystems.split():
        return "the kernel has no btrfs file system (modprobe btrfs)"
    if shutil.which("mkfs.btrfs", path=_SBIN) is None:
        return "mkfs.btrfs is not installed (install btrfs-progs)"
    if config.node.sandbox_root.is_relative_to(config.node.state_dir / IMAGE_NAME):
        return "[node] sandbox_root is inside the image's path"
    return None


def _run(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=120, check=False, env={"PATH": _SBIN})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OSError(errno.EIO, f"{what}: {exc}") from exc
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(errno.EIO, f"{what}: {message[-1] if message else f'exit {done.returncode}'}")


def _make(config: Config) -> DiskQuota:
    """Unmount what a previous run left, then make, mount and set up a fresh image. Raises OSError."""
    root = config.node.sandbox_root
    image = config.node.state_dir / IMAGE_NAME
    unmount_all(root, image)
    image.unlink(missing_ok=True)
    size = image_size_bytes(config)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    mkfs = shutil.which("mkfs.btrfs", path=_SBIN) or "mkfs.btrfs"
    _run([mkfs, "-q", "-f", "-K", "-m", "single", "-d", "single", str(image)], "mkfs.btrfs failed")
    root.mkdir(parents=True, exist_ok=True)
    options = "loop,nosuid,nodev,noatime,discard=async"
    _run(["mount", "-t", "btrfs", "-o", options, str(image), str(root)], "mounting the image failed")
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        unmount_all(root)
        raise
    try:
        os.chmod(root_fd, 0o711)  # noqa: S103 - traversable, not listable: jobs reach only their own box
        ctl = bytearray(struct.pack("QQ", _QUOTA_CTL_ENABLE_SIMPLE_QUOTA, 0))
        try:
            _ioctl(root_fd, _IOC_QUOTA_CTL, ctl, "cannot enable quotas")
        except QuotaError as exc:
            raise QuotaError(exc.errno, "the kernel has no btrfs simple quotas (Linux 6.7 or later)") from exc
        info = bytearray(1024)
        _ioctl(root_fd, _IOC_FS_INFO, info, "cannot read the file system's id")
        sysfs = Path("/sys/fs/btrfs") / str(uuid.UUID(bytes=bytes(info[16:32]))) / "qgroups"
        try:
            mode = (sysfs / "mode").read_text(encoding="ascii").strip()
        except OSError as exc:
            raise QuotaError(errno.ENOENT, f"the kernel shows no quota groups in {sysfs}") from exc
        if mode != "squota":
            raise QuotaError(errno.EINVAL, f"the quotas are in mode {mode!r}, not simple quotas")
    except OSError:
        os.close(root_fd)
        unmount_all(root)
        raise
    return DiskQuota(root=root, image=image, size_bytes=size, sysfs=sysfs, root_fd=root_fd)


def setup(config: Config) -> tuple[DiskQuota | None, str]:
    """The image per ``[sandbox] disk_quota``: (quota, "") or (None, why not). Raises StartupError when required."""
    mode = config.sandbox.disk_quota
    if mode == "none":
        _forget_image(config)
        return None, "disk_quota = none in the config"
    why = _missing(config)
    if why is None:
        try:
            return _make(config), ""
        except OSError as exc:
            with contextlib.suppress(OSError):
                (config.node.state_dir / IMAGE_NAME).unlink()
            why = exc.strerror or str(exc)
    if mode == "required":
        raise StartupError(f"[sandbox] disk_quota = required: {why}", EXIT_CONFIG)
    _forget_image(config)
    return None, why


def _forget_image(config: Config) -> None:
    """Without the image this time: detach one an earlier run left mounted (jobs must not land on it) and delete it."""
    image = config.node.state_dir / IMAGE_NAME
    if os.geteuid() != 0 or not image.exists():
        return
    with contextlib.suppress(OSError):
        unmount_all(config.node.sandbox_root, image)  # only carod's own image, never another mount
        image.unlink()
