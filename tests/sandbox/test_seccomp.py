"""carod.sandbox.seccomp: the filter's program names every syscall it means to refuse (no broker)."""

from __future__ import annotations

import struct

import pytest

from carod.sandbox import seccomp

JEQ = 0x15


def compared(program: bytes) -> set[int]:
    """Every constant the program compares the syscall number (or an argument) with."""
    out = set()
    for at in range(0, len(program), 8):
        code, _jt, _jf, k = struct.unpack_from("<HBBI", program, at)
        if code == JEQ:
            out.add(k)
    return out


@pytest.mark.parametrize(
    ("machine", "unshare", "clone3", "keyctl", "ioctl"),
    [("x86_64", 272, 435, 250, 16), ("aarch64", 97, 435, 219, 29)],
)
def test_each_architecture_names_its_syscalls(machine: str, unshare: int, clone3: int, keyctl: int, ioctl: int) -> None:
    names = compared(seccomp.program(machine))
    assert {unshare, clone3, keyctl, ioctl} <= names
    assert 0x9400 in names  # the btrfs ioctl type


def test_user_namespaces_allowed_keeps_keyrings_and_btrfs_refused() -> None:
    names = compared(seccomp.program("x86_64", user_namespaces=True))
    assert 272 not in names and 435 not in names
    assert {250, 16, 0x9400} <= names


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="no user-namespace filter"):
        seccomp.program("sparc")
