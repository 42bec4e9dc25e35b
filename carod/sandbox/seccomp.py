"""A seccomp filter: no user namespaces, kernel keyrings or btrfs ioctls for jobs (pure: bytes, no I/O).

bubblewrap loads it (``--seccomp FD``) just before it starts the job's chain,
so it binds setpriv, the job and everything the job starts. It refuses
``unshare`` and ``clone`` with ``CLONE_NEWUSER`` (EPERM) and answers
``clone3`` with ENOSYS, whose flags a classic BPF filter cannot read (it
takes a pointer); the C library then falls back to ``clone``, as it does
under Docker's default profile. Everything else is allowed. A user
namespace gives a job no power over the host, but it opens a large part of
the kernel (mounts, netfilter, ...) to an unprivileged user: the kernel's
attack surface is the reason, not a layer of carod's that it would defeat.

It also refuses ``add_key``, ``request_key`` and ``keyctl`` (EPERM), as
Docker's default profile does: the user and user-session keyrings belong to
the uid, not the job, so with a shared job user (or a slot user's next job)
a key one job stored was readable by the next, and by any host process of
that user.

The program is classic BPF over ``struct seccomp_data`` (``nr`` at offset 0,
``arch`` at 4, ``args[0]`` at 16; the flags are in its low 32 bits on the
little-endian architectures below). A process of another architecture than
those listed (a 32-bit one on a 64-bit kernel included) is checked with
that architecture's numbers.
"""

from __future__ import annotations

import errno
import platform
import struct
from dataclasses import dataclass

CLONE_NEWUSER = 0x10000000

_LD_ABS_W = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000

_NR = 0
_ARCH = 4
_ARG0_LOW = 16
_ARG1_LOW = 24
_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
#: An ioctl request's type byte (bits 8-15), and btrfs's (0x94: subvolumes, snapshots, quotas, FICLONE).
_IOC_TYPE_MASK = 0xFF00
_BTRFS_IOC_TYPE = 0x9400

_X32 = 0x40000000


@dataclass(frozen=True)
class _Arch:
    audit: int
    #: syscalls whose first argument is clone flags
    flags_first: tuple[int, ...]
    #: clone3
    enosys: tuple[int, ...]
    #: add_key, request_key, keyctl
    refused: tuple[int, ...] = ()
    #: ioctl (its request's type byte is checked)
    ioctl: tuple[int, ...] = ()


#: By audit architecture: unshare and clone (flags first), clone3.
_ARCHES = {
    "x86_64": (
        _Arch(
            0xC000003E,
            (272, 56, 272 | _X32, 56 | _X32),
            (435, 435 | _X32),
            (248, 249, 250, *(n | _X32 for n in (248, 249, 250))),
            (16, 514 | _X32),
        ),
        _Arch(0x40000003, (310, 120), (435,), (286, 287, 288), (54,)),  # i386 on a 64-bit kernel (int 0x80)
    ),
    "aarch64": (
        _Arch(0xC00000B7, (97, 220), (435,), (217, 218, 219), (29,)),
        _Arch(0x40000028, (337, 120), (435,), (309, 310, 311), (54,)),  # arm (EABI) on a 64-bit kernel
    ),
}


def supported() -> bool:
    return platform.machine() in _ARCHES


def program(machine: str | None = None, *, user_namespaces: bool = False) -> bytes:
    """The compiled filter for ``machine`` (default: this one). ValueError for an unknown one.

    ``user_namespaces``: let jobs create them (``[sandbox] user_namespaces``); keyrings stay refused.
    """
    arches = _ARCHES.get(machine or platform.machine())
    if arches is None:
        raise ValueError(f"no user-namespace filter for {machine or platform.machine()}")
    # Assembled back to front would be simpler to jump in; instead each
    # block is built with symbolic targets and resolved below.
    code: list[tuple[int, int | str, int | str, int]] = [(_LD_ABS_W, 0, 0, _ARCH)]
    for index, arch in enumerate(arches):
        code.append((_JEQ_K, f"arch{index}", 0, arch.audit))
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    labels: dict[str, int] = {}
    for index, arch in enumerate(arches):
        labels[f"arch{index}"] = len(code)
        code.append((_LD_ABS_W, 0, 0, _NR))
        if not user_namespaces:
            for nr in arch.flags_first:
                code.append((_JEQ_K, "flags", 0, nr))
            for nr in arch.enosys:
                code.append((_JEQ_K, "enosys", 0, nr))
        for nr in arch.refused:
            code.append((_JEQ_K, "eperm", 0, nr))
        for nr in arch.ioctl:
            code.append((_JEQ_K, "ioctl", 0, nr))
        code.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["flags"] = len(code)
    code.append((_LD_ABS_W, 0, 0, _ARG0_LOW))
    code.append((_JSET_K, "eperm", 0, CLONE_NEWUSER))
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["ioctl"] = len(code)
    code.append((_LD_ABS_W, 0, 0, _ARG1_LOW))
    code.append((_AND_K, 0, 0, _IOC_TYPE_MASK))
    code.append((_JEQ_K, "eperm", 0, _BTRFS_IOC_TYPE))
    code.append((_RET_K, 0, 0, _RET_ALLOW))
    labels["eperm"] = len(code)
    code.append((_RET_K, 0, 0, _RET_ERRNO | errno.EPERM))
    labels["enosys"] = len(code)
    code.append((_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS))
    out = bytearray()
    for pc, (op, jt, jf, k) in enumerate(code):
        out += struct.pack("<HBBI", op, _offset(jt, pc, labels), _offset(jf, pc, labels), k)
    return bytes(out)


def _offset(target: int | str, pc: int, labels: dict[str, int]) -> int:
    if isinstance(target, int):
        return target
    jump = labels[target] - pc - 1
    if not 0 <= jump <= 255:
        raise ValueError(f"jump to {target} out of range")
    return jump
