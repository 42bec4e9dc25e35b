"""What the kernel says about processes, read from /proc: the one place carod parses /proc/PID/stat.

Blocking reads of small files; a process that is gone reads as None (or is
left out), never as an error.
"""

from __future__ import annotations

import os


def live_members(pgid: int) -> list[int]:
    """PIDs in process group ``pgid`` that are not yet zombies."""
    members = []
    for name in os.listdir("/proc"):
        fields = stat_fields(int(name)) if name.isdigit() else None
        if fields is not None and len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name, from the state on (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # pid (comm) state ppid pgrp ... ; comm may contain spaces and parentheses
    return stat[stat.rfind(b")") + 2 :].split()


TICKS_PER_S = os.sysconf("SC_CLK_TCK")


PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def group_usage(pgid: int) -> tuple[float, float, int, int]:
    """CPU seconds (user, sys), resident KiB and process count of process group ``pgid`` now (blocking)."""
    user = system = rss = 0
    members = live_members(pgid)
    for pid in members:
        fields = stat_fields(pid)
        if fields is None or len(fields) < 22:
            continue
        # utime, stime are fields 14, 15 and rss 24 of proc(5); here offset by the 2 before the state
        user += int(fields[11])
        system += int(fields[12])
        rss += int(fields[21])
    return user / TICKS_PER_S, system / TICKS_PER_S, rss * PAGE_KIB, len(members)


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell it from a reused pid."""
    fields = stat_fields(pid)
    return fields[19].decode() if fields is not None and len(fields) > 19 else None


def uid_of(pid: int) -> int | None:
    """The real uid of ``pid`` (not the owner of /proc/PID, which a non-dumpable process changes)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def alive(pid: int) -> bool:
    """Not a zombie (a zombie cannot be killed, only reaped by its parent)."""
    fields = stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] not in (b"Z", b"X")
