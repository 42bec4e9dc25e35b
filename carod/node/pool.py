"""The pool as this node sees it: the other nodes heard from, and who could run a job.

Pure: :class:`PoolView` (the nodes of this queue heard from recently, and
which of them would take a job), :class:`HandBacks` and the rules for passing
a job on. The adverts themselves are :mod:`carod.wire.adverts`; the broker
edge publishes and receives their bytes (docs/pool.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import classad2

from carod.wire import classads
from carod.wire.adverts import OFFLINE, RUNNING, Advert, AdvertError, checked_ad
from carod.wire.jobad import Request

#: A job is handed back to the queue (for a node with room) at most this often per node...
HAND_BACK_AGAIN_S = 30.0
#: ...and only while the broker has delivered it fewer times than this since it was queued.
HAND_BACK_DELIVERIES = 3


@dataclass
class Peer:
    advert: Advert
    ad: classad2.ClassAd
    #: the same ad as if the node ran nothing (would it ever take the job?)
    idle_ad: classad2.ClassAd
    heard: float


def idle(ad: classad2.ClassAd) -> classad2.ClassAd:
    """A copy of a live machine ad with every resource free and no jobs."""
    copy = classad2.ClassAd()
    copy.update(ad)
    for free, total in (("Cpus", "TotalCpus"), ("Memory", "TotalMemory"), ("Disk", "TotalDisk")):
        if total in ad:
            copy[free] = ad.lookup(total)
    copy["JobsRunning"] = 0
    return copy


#: Most time one job's matching against the other nodes may take; the next call starts where this one stopped.
MATCH_BUDGET_S = 0.01


class PoolView:
    """The nodes of one job queue heard from within ``timeout_s``, at most ``max_nodes`` of them."""

    def __init__(
        self,
        queue: str,
        self_name: str,
        timeout_s: float,
        max_nodes: int = 256,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.queue = queue
        self.self_name = self_name
        self.timeout_s = timeout_s
        self.max_nodes = max_nodes
        self.peers: dict[str, Peer] = {}
        #: measures the match budget (a parameter so tests can drive it)
        self.clock = clock
        self._next = 0

    def heard(self, advert: Advert, now: float) -> bool:
        """Take an advert in. False when it is not about another node of this queue.

        Raises AdvertError when it is too costly to keep (:func:`checked_ad`), or
        names a new node while ``max_nodes`` are known.
        """
        if advert.queue != self.queue or advert.node == self.self_name:
            return False
        if advert.state == OFFLINE:
            self.peers.pop(advert.node, None)
            return True
        if advert.node not in self.peers and len(self.peers) >= self.max_nodes:
            self.expire(now)
            if len(self.peers) >= self.max_nodes:
                known = f"{self.max_nodes} nodes known already ([pool] max_nodes)"
                raise AdvertError(f"advert of {advert.node[:64]!r}: {known}")
        ad = checked_ad(advert)
        self.peers[advert.node] = Peer(advert, ad, idle(ad), now)
        return True

    def expire(self, now: float) -> list[str]:
        gone = [name for name, peer in self.peers.items() if now - peer.heard > self.timeout_s]
        for name in gone:
            del self.peers[name]
        return gone

    def last_heard(self) -> dict[str, float]:
        return {name: peer.advert.sent for name, peer in self.peers.items()}

    def could_run_now(self, job: classad2.ClassAd, request: Request, now: float) -> list[str]:
        """Other nodes taking jobs whose advertised free resources fit the job and whose live ad matches it."""
        return self._takers(job, request, now, idle=False)

    def could_ever_run(self, job: classad2.ClassAd, request: Request, now: float) -> list[str]:
        """Other nodes taking jobs that would run the job if they were idle."""
        return self._takers(job, request, now, idle=True)

    def _takers(self, job: classad2.ClassAd, request: Request, now: float, *, idle: bool) -> list[str]:
        """Nodes heard within ``timeout_s`` (``now``: monotonic) that are taking jobs and would take this one.

        At most :data:`MATCH_BUDGET_S` of matching per call, starting where the last call
        stopped: many costly adverts cannot make one job's matching long, nor hide the others for good.
        """
        takers = []
        names = list(self.peers)
        start, deadline = self._next % max(1, len(names)), self.clock() + MATCH_BUDGET_S
        for i in range(len(names)):
            name = names[(start + i) % len(names)]
            peer = self.peers[name]
            ad = peer.idle_ad if idle else peer.ad
            if now - peer.heard > self.timeout_s or peer.advert.state != RUNNING:
                continue
            if fits(ad, request) and classads.match(job, ad).ok:
                takers.append(name)
            if self.clock() > deadline:
                self._next = start + i + 1
                break
        return takers


class HandBacks:
    """When this node last handed each job back to the queue for another node (pure: times passed in)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def may(self, message_id: str, deliveries: int, now: float) -> bool:
        """Requeue it for another node? Not again soon from here, nor once the broker counts 3 deliveries."""
        if len(self._last) > 10_000:
            self._last = {k: t for k, t in self._last.items() if now - t <= HAND_BACK_AGAIN_S}
        last = self._last.get(message_id)
        return deliveries < HAND_BACK_DELIVERIES and (last is None or now - last > HAND_BACK_AGAIN_S)

    def mark(self, message_id: str, now: float) -> None:
        self._last[message_id] = now


#: Clocks of the nodes (which stamp x-carod-first-offer) may differ by this much.
CLOCK_SKEW_S = 300.0


def may_pass(over_s: float, max_pass_s: float) -> bool:
    """Pass a job on without counting a decline, ``over_s`` after its first decline?

    Only within ``max_pass_s``; and not when the first decline lies in the future
    (a header the submitter forged to be passed on for ever).
    """
    return -CLOCK_SKEW_S <= over_s <= max_pass_s


def unclaimed(nodes: list[str], max_pass_s: float) -> str:
    """The end of an unmatched job's hold reason when adverts said other nodes would run it."""
    if not nodes:
        return ""
    names = ", ".join(name[:64] for name in nodes[:5]) + (", ..." if len(nodes) > 5 else "")
    return (
        f"; node(s) {names} advertise that they would run it but none took it "
        f"within [broker] max_pass_s = {max_pass_s:g} seconds"
    )


def fits(ad: classad2.ClassAd, request: Request) -> bool:
    """The request fits the free resources a machine ad shows."""
    free: list[float] = []
    for name in ("Cpus", "Memory", "Disk"):
        value = classads.evaluate(ad, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        free.append(float(value))
    return request.cpus <= free[0] and request.memory_mib <= free[1] and request.disk_kib <= free[2]
