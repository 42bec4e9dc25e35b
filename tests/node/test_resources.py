"""carod.node.resources: reservations against the node's totals, and the consumer's flow control (no broker)."""

from __future__ import annotations

import pytest

from carod.node.resources import Resources, Totals, flow
from carod.wire.jobad import Request

TOTALS = Totals(cpus=4, memory_mib=4096, disk_kib=1_000_000, slots=4)


def test_reservations_count_against_the_totals() -> None:
    res = Resources(TOTALS)
    big = Request(cpus=3, memory_mib=1000, disk_kib=500_000)
    assert res.fits(big)
    res.reserve("a", big)
    free = res.free()
    assert (free.cpus, free.memory_mib, free.disk_kib, free.slots) == (1, 3096, 500_000, 3)
    assert not res.fits(Request(cpus=2, memory_mib=10))
    assert res.fits(Request(cpus=1, memory_mib=3096, disk_kib=500_000))
    assert not res.fits(Request(cpus=1, memory_mib=10, disk_kib=200), disk_available_kib=100)  # a fuller disk
    res.release("a")
    res.release("a")  # idempotent
    assert res.free().cpus == 4 and res.running == 0
    with pytest.raises(ValueError, match="already"):
        res.reserve("b", big)
        res.reserve("b", big)


def test_never_fits_names_what_is_too_big() -> None:
    res = Resources(TOTALS)
    assert res.never_fits(Request(cpus=4, memory_mib=4096, disk_kib=1_000_000)) is None
    why = res.never_fits(Request(cpus=8, memory_mib=5000, disk_kib=1))
    assert why == "RequestCpus 8 > TotalCpus 4; RequestMemory 5000 > TotalMemory 4096"


def test_room_is_counted_in_default_jobs_and_bounded_by_slots() -> None:
    res = Resources(Totals(cpus=8, memory_mib=1024, disk_kib=0, slots=6))
    assert res.room(Request(1, 128)) == 6  # slots bind
    assert res.room(Request(1, 512)) == 2  # memory binds
    res.reserve("x", Request(7, 100))
    assert res.room(Request(1, 128)) == 1  # cpus bind


@pytest.mark.parametrize(
    ("consuming", "credit", "capacity", "expected"),
    [
        (True, 2, 2, None),  # in step: leave it
        (True, 0, 0, None),  # full and nothing more will come
        (True, 2, 0, 0),  # the broker could send what cannot start: stop
        (True, 2, 1, 1),  # ... or send less
        (True, 0, 3, 3),  # nothing would come though three could start: consume again
        (True, 1, 3, None),  # something still comes; resize when it has
        (False, 0, 0, None),
        (False, 0, 2, 2),
        (False, 0, -1, None),
    ],
)
def test_flow(consuming: bool, credit: int, capacity: int, expected: int | None) -> None:
    assert flow(consuming=consuming, credit=credit, capacity=capacity) == expected
