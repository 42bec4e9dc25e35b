"""The one place that limits what runs on this node (docs/pool.md).

:class:`Admission` holds the partitionable slot's reservations
(:class:`~carod.node.resources.Resources`), the jobs waiting for resources (in
arrival order), and the deliveries the node holds. After every change it
works out how many more deliveries the node could start now and, through
:func:`~carod.node.resources.flow`, asks the broker edge to stop consuming or
to consume with a prefetch that matches, so the node never holds messages
it cannot start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from carod.errors import BrokerError
from carod.node.resources import Resources, flow
from carod.wire.jobad import Request

log = logging.getLogger("carod.admission")

_FLOW_RETRY_S = 1.0

#: Called with the prefetch to consume with (0: stop consuming); returns the
#: new consumer's tag (None when stopped). Raises BrokerError.
FlowControl = Callable[[int], Awaitable[str | None]]


class Holding(Protocol):
    """A delivery the node holds (carod.edges.delivery.Delivery): counted against the consumer it came from."""

    @property
    def consumer_tag(self) -> str | None: ...


@dataclass(eq=False)
class Ticket:
    """One delivery's claim on the node: unreserved until it runs, then its resources."""

    admission: Admission
    request: Request | None = None
    reserved: bool = False
    closed: bool = False

    def release(self) -> None:
        """The run is over: give its resources back. Idempotent."""
        self.admission._release(self)

    def close(self) -> None:
        """The delivery is settled or handed on: it no longer needs room. Idempotent."""
        self.admission._close(self)


@dataclass(eq=False)
class Waiting:
    """A job that fits the machine but not what is free now."""

    ticket: Ticket
    request: Request
    ready: Callable[[], bool]
    #: the node's own handle on the job (what it needs to decide to give up)
    job: object
    future: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def give_up(self) -> None:
        """Stop waiting: the job is handed back to the queue."""
        if not self.future.done():
            self.future.set_result(False)


class Admission:
    def __init__(self, resources: Resources, default: Request, *, max_prefetch: int) -> None:
        self.resources = resources
        self.default = default
        self.max_prefetch = max_prefetch
        #: deliveries held (by identity) -> the consumer tag they came from
        self._held: dict[Holding, str | None] = {}
        self._unreserved: set[Ticket] = set()
        self._waiters: deque[Waiting] = deque()
        #: set on every change (the advertiser publishes then)
        self.changed = asyncio.Event()
        self.disk_available: Callable[[], float | None] = lambda: None
        self._control: FlowControl | None = None
        self._consumer: tuple[str, int] | None = None  # (tag, prefetch) of the current consumer
        self._flow_task: asyncio.Task[None] | None = None
        self._flow_again = False

    # ------------------------------------------------------------ deliveries

    def arrive(self, delivery: Holding) -> Ticket:
        self.hold(delivery)
        ticket = Ticket(self)
        self._unreserved.add(ticket)
        self._changed()
        return ticket

    def hold(self, delivery: Holding) -> None:
        """A delivery the node keeps (a new job, or a running job's that adopted a redelivery: its tag now)."""
        self._held[delivery] = delivery.consumer_tag

    def done(self, delivery: Holding) -> None:
        """The node no longer holds this delivery (settled, or its channel died). Idempotent."""
        if self._held.pop(delivery, "absent") != "absent":
            self._changed()

    def reset_deliveries(self) -> None:
        """The connection was lost: every delivery held died with it."""
        self._held.clear()
        self._consumer = None
        self._changed()

    # ------------------------------------------------------------ resources

    def reserve_now(self, ticket: Ticket, request: Request, ready: Callable[[], bool]) -> bool:
        """Reserve at once when nobody waits ahead and ``ready()`` (fits and matches now)."""
        if self._waiters or not ready():
            return False
        self._reserve(ticket, request)
        return True

    async def wait(self, ticket: Ticket, request: Request, ready: Callable[[], bool], *, job: object) -> bool:
        """Wait, in arrival order, until the job fits and ``ready()``. False when given up (hand it back)."""
        waiter = Waiting(ticket, request, ready, job)
        self._waiters.append(waiter)
        self._changed()
        try:
            return await waiter.future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            self._changed()

    def waiting(self) -> list[Waiting]:
        return [w for w in self._waiters if not w.future.done()]

    def recheck(self) -> None:
        """Try the waiting jobs again: what they wait for may change without a job ending (disk, load, time)."""
        self._wake()

    def give_up_all(self) -> None:
        for waiter in list(self._waiters):
            waiter.give_up()

    def _reserve(self, ticket: Ticket, request: Request) -> None:
        self.resources.reserve(ticket, request)
        ticket.request = request
        ticket.reserved = True
        self._unreserved.discard(ticket)
        self._changed()

    def _release(self, ticket: Ticket) -> None:
        if ticket.reserved:
            ticket.reserved = False
            self.resources.release(ticket)
            self._changed()
            self._wake()

    def _close(self, ticket: Ticket) -> None:
        self._release(ticket)
        if not ticket.closed:
            ticket.closed = True
            self._unreserved.discard(ticket)
            self._changed()

    def _wake(self) -> None:
        """Start waiting jobs, first come first served, while the first one fits."""
        while self._waiters:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.popleft()
                continue
            if not head.ready():
                return
            self._waiters.popleft()
            self._reserve(head.ticket, head.request)
            head.future.set_result(True)

    # ------------------------------------------------------------ flow

    def capacity(self) -> int:
        """Deliveries the node could start now, beyond the ones it holds."""
        slots_left = self.resources.totals.slots - len(self._held)
        room = self.resources.room(self.default, self.disk_available()) - len(self._unreserved)
        return min(slots_left, room, self.max_prefetch)

    def credit(self) -> int:
        """Deliveries the broker may still send the current consumer."""
        if self._consumer is None:
            return 0
        tag, prefetch = self._consumer
        return prefetch - sum(1 for held_tag in self._held.values() if held_tag == tag)

    def start_flow(self, control: FlowControl, consumer: tuple[str, int] | None) -> None:
        """Take over the consumer: ``control(n)`` stops (0) or (re)starts it with prefetch n."""
        self._control = control
        self._consumer = consumer
        self._changed()

    def stop_flow(self) -> None:
        self._control = None

    def _changed(self) -> None:
        self.changed.set()
        if self._control is None:
            return
        if self._flow_task is not None and not self._flow_task.done():
            self._flow_again = True
            return
        self._flow_task = asyncio.get_running_loop().create_task(self._apply_flow())

    async def _apply_flow(self) -> None:
        while (control := self._control) is not None:
            self._flow_again = False
            wanted = flow(consuming=self._consumer is not None, credit=self.credit(), capacity=self.capacity())
            if wanted is not None:
                try:
                    tag = await control(wanted)
                except BrokerError as exc:
                    # The consumer may be cancelled or not: start afresh on the next try.
                    self._consumer = None
                    log.warning("could not %s consuming: %s; retrying", "resume" if wanted else "pause", exc)
                    await asyncio.sleep(_FLOW_RETRY_S)
                    self._flow_again = True
                else:
                    self._consumer = (tag, wanted) if tag is not None else None
            if not self._flow_again:
                return

    async def close(self) -> None:
        self._control = None
        if self._flow_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._flow_task
