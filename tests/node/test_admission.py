"""carod.node.admission on its own: reservations, waiting in arrival order, and the consumer's flow (no broker).

The collaborators are small fakes: a delivery is anything with a consumer
tag, and the broker edge's flow control is a function that records what it
was asked (the prefetch to consume with; 0 = stop).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from carod.errors import BrokerError
from carod.node.admission import Admission
from carod.node.resources import Resources, Totals
from carod.wire.jobad import Request

SMALL = Request(cpus=1, memory_mib=100)


@dataclass(eq=False)
class FakeDelivery:
    consumer_tag: str | None = "c1"


class FlowControl:
    """The broker edge as admission sees it: records each prefetch asked for; returns a new consumer tag."""

    def __init__(self) -> None:
        self.asked: list[int] = []
        self.fail_next = 0
        self.changed = asyncio.Event()

    async def __call__(self, prefetch: int) -> str | None:
        self.asked.append(prefetch)
        self.changed.set()
        if self.fail_next:
            self.fail_next -= 1
            raise BrokerError("the broker is away")
        return f"c{len(self.asked) + 1}" if prefetch else None

    async def settled(self, admission: Admission) -> None:
        """Until admission's flow task has nothing left to apply."""
        for _ in range(100):
            task = admission._flow_task
            if task is None or task.done():
                return
            await asyncio.wait({task}, timeout=5)
        raise AssertionError("the flow task never settled")


def admission(cpus: float = 2, slots: int = 2, prefetch: int = 2) -> Admission:
    totals = Totals(cpus=cpus, memory_mib=1000, disk_kib=10**9, slots=slots)
    return Admission(Resources(totals), SMALL, max_prefetch=prefetch)


async def test_a_full_node_stops_consuming_and_resumes_when_a_job_ends() -> None:
    adm, control = admission(slots=2, prefetch=3), FlowControl()
    adm.start_flow(control, ("c1", 3))
    first, second = FakeDelivery("c1"), FakeDelivery("c1")
    t1, t2 = adm.arrive(first), adm.arrive(second)
    assert adm.reserve_now(t1, SMALL, lambda: True) and adm.reserve_now(t2, SMALL, lambda: True)
    await control.settled(adm)
    assert adm.capacity() == 0
    assert control.asked == [0], "two deliveries held on two slots: the node must stop consuming"
    t1.release()
    t1.close()
    adm.done(first)
    await control.settled(adm)
    assert control.asked == [0, 1], "one slot free again: consume with a prefetch of one"
    assert adm.credit() == 1


async def test_done_is_idempotent_and_a_reconnection_forgets_every_delivery() -> None:
    adm = admission()
    delivery = FakeDelivery()
    ticket = adm.arrive(delivery)
    adm.start_flow(FlowControl(), ("c1", 2))
    assert adm.credit() == 1
    ticket.close()
    adm.done(delivery)
    adm.done(delivery)
    assert adm.credit() == 2
    assert adm.capacity() == 2
    adm.hold(FakeDelivery())
    assert adm.capacity() == 1
    adm.reset_deliveries()
    assert adm.credit() == 0, "after a reconnection there is no consumer until the flow starts one"
    assert adm.capacity() == 2, "the deliveries died with the connection: they hold no slot"


async def test_an_adopted_redelivery_counts_once_under_its_new_consumer() -> None:
    adm = admission(cpus=3, slots=3, prefetch=3)
    adm.start_flow(FlowControl(), ("c2", 3))
    delivery = FakeDelivery("c1")
    adm.arrive(delivery)
    assert adm.credit() == 3  # held under the old consumer's tag
    delivery.consumer_tag = "c2"  # the job's Delivery adopted a redelivery from the new consumer
    adm.hold(delivery)
    assert adm.credit() == 2
    assert adm.capacity() == 2, "the old and the adopted delivery are one job: one slot, not two"


async def test_waiting_jobs_start_in_arrival_order_and_nobody_jumps_the_queue() -> None:
    adm = admission(cpus=1, slots=3, prefetch=3)
    running = adm.arrive(FakeDelivery())
    assert adm.reserve_now(running, SMALL, lambda: True)
    started: list[str] = []
    free = {"now": False}

    async def wait(name: str) -> None:
        ticket = adm.arrive(FakeDelivery())
        if await adm.wait(ticket, SMALL, lambda: free["now"], job=name):
            started.append(name)
            ticket.release()

    first = asyncio.create_task(wait("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(wait("second"))
    await asyncio.sleep(0)
    assert [w.job for w in adm.waiting()] == ["first", "second"]
    late = adm.arrive(FakeDelivery())
    assert not adm.reserve_now(late, SMALL, lambda: True), "a newcomer must not pass the jobs already waiting"
    free["now"] = True
    running.release()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert started == ["first", "second"]


async def test_a_job_given_up_is_handed_back_and_the_next_one_still_waits() -> None:
    adm = admission(cpus=1, slots=3, prefetch=3)
    assert adm.reserve_now(adm.arrive(FakeDelivery()), SMALL, lambda: True)
    results: dict[str, bool] = {}

    async def wait(name: str) -> None:
        results[name] = await adm.wait(adm.arrive(FakeDelivery()), SMALL, lambda: True, job=name)

    tasks = [asyncio.create_task(wait(name)) for name in ("a", "b")]
    await asyncio.sleep(0)
    adm.waiting()[0].give_up()
    await asyncio.wait_for(tasks[0], 5)
    assert results == {"a": False}
    assert [w.job for w in adm.waiting()] == ["b"]
    adm.give_up_all()
    await asyncio.wait_for(tasks[1], 5)
    assert results == {"a": False, "b": False}


async def test_resources_are_given_back_once_however_often_a_ticket_is_released() -> None:
    adm = admission(cpus=2, slots=2)
    ticket = adm.arrive(FakeDelivery())
    assert adm.reserve_now(ticket, Request(cpus=2, memory_mib=100), lambda: True)
    assert adm.resources.free().cpus == 0
    ticket.release()
    ticket.release()
    ticket.close()
    assert adm.resources.free().cpus == 2
    assert adm.resources.running == 0


async def test_a_flow_change_the_broker_refuses_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("carod.node.admission._FLOW_RETRY_S", 0.01)
    adm, control = admission(slots=2, prefetch=2), FlowControl()
    control.fail_next = 1
    adm.start_flow(control, None)  # not consuming, room for two
    await control.settled(adm)
    assert control.asked == [2, 2], "the refused resume is asked again until the broker takes it"
    assert adm.credit() == 2
