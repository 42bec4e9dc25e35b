"""The node as an HTCondor partitionable slot: consumable Cpus, Memory, Disk.

Pure bookkeeping, no I/O. A job reserves its ``RequestCpus`` (default 1),
``RequestMemory`` (default ``[node] default_request_memory_mib``) and
``RequestDisk`` (default 0) while it runs; the machine ad shows what is left
(``Cpus``, ``Memory``, ``Disk``) beside the totals (``TotalCpus``, ...).

:func:`flow` is the rule that keeps the broker's prefetch in step with the
free resources (docs/pool.md): the node never holds more deliveries than it
could start now.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from carod.wire.jobad import Request


@dataclass(frozen=True)
class Totals:
    """The whole machine: what an idle node offers."""

    cpus: float
    memory_mib: float
    disk_kib: float
    #: most jobs at once ([node] slots, default the Cpus)
    slots: int


@dataclass(frozen=True)
class Free:
    cpus: float
    memory_mib: float
    disk_kib: float
    slots: int


class Resources:
    """Reservations against the totals. Keys are whatever identifies a run."""

    def __init__(self, totals: Totals) -> None:
        self.totals = totals
        self._claims: dict[Hashable, Request] = {}

    @property
    def running(self) -> int:
        return len(self._claims)

    def free(self, disk_available_kib: float | None = None) -> Free:
        """What is unreserved; disk also capped by what the filesystem has left now."""
        t = self.totals
        claims = self._claims.values()
        disk = t.disk_kib - sum(c.disk_kib for c in claims)
        if disk_available_kib is not None:
            disk = min(disk, disk_available_kib)
        return Free(
            cpus=t.cpus - sum(c.cpus for c in claims),
            memory_mib=t.memory_mib - sum(c.memory_mib for c in claims),
            disk_kib=max(0.0, disk),
            slots=t.slots - len(self._claims),
        )

    def never_fits(self, request: Request) -> str | None:
        """Why the job could not run here even on an idle node (None when it could)."""
        t = self.totals
        over = []
        if request.cpus > t.cpus:
            over.append(f"RequestCpus {_n(request.cpus)} > TotalCpus {_n(t.cpus)}")
        if request.memory_mib > t.memory_mib:
            over.append(f"RequestMemory {_n(request.memory_mib)} > TotalMemory {_n(t.memory_mib)}")
        if request.disk_kib > t.disk_kib:
            over.append(f"RequestDisk {_n(request.disk_kib)} > TotalDisk {_n(t.disk_kib)}")
        return "; ".join(over) or None

    def fits(self, request: Request, disk_available_kib: float | None = None) -> bool:
        """True when the request fits in what is free now."""
        free = self.free(disk_available_kib)
        return (
            free.slots >= 1
            and request.cpus <= free.cpus + 1e-9
            and request.memory_mib <= free.memory_mib + 1e-9
            and request.disk_kib <= free.disk_kib
        )

    def reserve(self, key: Hashable, request: Request) -> None:
        if key in self._claims:
            raise ValueError(f"{key!r} already holds a reservation")
        self._claims[key] = request

    def release(self, key: Hashable) -> None:
        self._claims.pop(key, None)

    def room(self, default: Request, disk_available_kib: float | None = None) -> int:
        """How many jobs of the default size would fit in what is free now."""
        free = self.free(disk_available_kib)
        counts = [free.slots, _times(free.cpus, default.cpus), _times(free.memory_mib, default.memory_mib)]
        if default.disk_kib > 0:
            counts.append(_times(free.disk_kib, default.disk_kib))
        return max(0, min(counts))


def _times(free: float, each: float) -> int:
    if each <= 0:
        return 1 << 30
    return max(0, math.floor(free / each + 1e-9))


def _n(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def flow(*, consuming: bool, credit: int, capacity: int) -> int | None:
    """What to do with the job-queue consumer.

    ``credit``: deliveries the broker may still send the current consumer
    (its prefetch less what it holds). ``capacity``: deliveries the node
    could start now. Returns None to leave the consumer alone, 0 to stop
    consuming, n > 0 to consume (again) with prefetch n.

    The consumer is only touched when the broker may send more than the node
    can start, or would send nothing while the node could start more, so a
    node whose jobs all have the default size consumes once and never again.
    """
    if consuming:
        if credit > capacity:
            return max(capacity, 0)
        if credit <= 0 < capacity:
            return capacity
        return None
    return capacity if capacity > 0 else None
