"""The pool as the nodes see it: adverts on ``carod.nodes`` and who could run a job.

Pure: encoding and decoding adverts, and :class:`PoolView`, the set of
nodes heard from recently. No I/O; the broker edge publishes and receives
the bytes (docs/pool.md).

An advert is a JSON object::

    {"v": 1, "node": "n1", "queue": "grid", "state": "Running", "sent": 1764000000.5,
     "period_s": 5.0, "ad": "[ Cpus = 2; ... ]", "jobs": [{...}, ...], "peers": {"n2": 1764000000.1}}

``state`` is ``Running`` (taking jobs), ``Draining`` (SIGTERM: finishing its
jobs, taking no more) or ``Offline`` (gone: drop it now). ``ad`` is the
live machine ad in ClassAd syntax; ``jobs`` the jobs running there;
``peers`` when the node last heard each other node (so ``carod status`` can
list a node that has gone quiet but not yet timed out).

Adverts are not authenticated: anyone who may publish to the pool exchange can
forge one. What one can cost a node is bounded (docs/pool.md, "Forged adverts"):
a body over ``[pool] max_advert_kib`` is dropped unread; the machine ad may
have at most :data:`MAX_ATTRIBUTES` attributes of at most
:data:`MAX_EXPR_BYTES` each, must be bounded by construction
(:func:`carod.adcost.problem`), and only its ``Start``, ``Requirements`` and
``Rank`` may refer to the job (:func:`checked_ad`); at most ``[pool]
max_nodes`` nodes are kept, each for ``[pool] node_timeout_s`` after its
last advert.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import classad2

from carod.errors import CarodError
from carod.node.resources import Request
from carod.wire import adcost, classads

VERSION = 1
RUNNING = "Running"
DRAINING = "Draining"
OFFLINE = "Offline"
STATES = (RUNNING, DRAINING, OFFLINE)

#: Routing keys on the pool exchange: adverts, and the question "who is there?".
ADVERT_KEY_PREFIX = "advert."
QUERY_KEY = "query"


#: Most attributes in an advertised machine ad (carod's own have about 40).
MAX_ATTRIBUTES = 512
#: Longest expression text of one advertised attribute.
MAX_EXPR_BYTES = 4096
#: Most references to the job one advertised Start/Requirements/Rank may make (references inlined).
MAX_JOB_REFERENCES = 8
#: A job is handed back to the queue (for a node with room) at most this often per node...
HAND_BACK_AGAIN_S = 30.0
#: ...and only while the broker has delivered it fewer times than this since it was queued.
HAND_BACK_DELIVERIES = 3


class AdvertError(CarodError):
    """An advert that cannot be read, or that would cost too much to keep."""


@dataclass(frozen=True)
class JobInfo:
    """One job running on a node, as ``carod q`` shows it."""

    message_id: str
    owner: str
    cmd: str
    started: float
    cpus: float
    memory_mib: float

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "owner": self.owner,
            "cmd": self.cmd,
            "started": self.started,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
        }


@dataclass(frozen=True)
class Advert:
    node: str
    queue: str
    state: str
    sent: float
    period_s: float
    ad_text: str
    jobs: tuple[JobInfo, ...] = ()
    peers: Mapping[str, float] = field(default_factory=dict)

    def machine_ad(self) -> classad2.ClassAd:
        try:
            return classad2.parseOne(self.ad_text)
        except (classad2.ClassAdException, ValueError) as exc:
            raise AdvertError(f"advert of {self.node[:64]!r}: its machine ad does not parse: {exc}") from exc


def checked_ad(advert: Advert) -> classad2.ClassAd:
    """The advert's machine ad, if evaluating it is cheap by construction. Raises AdvertError.

    Every attribute must be bounded (:func:`carod.adcost.problem`); only
    ``Start``, ``Requirements`` and ``Rank`` may refer to the job, at most
    :data:`MAX_JOB_REFERENCES` times each. A job cannot refer to those three
    (adcost.MACHINE_POLICY), so a match never goes back and forth between the ads.
    """
    ad = advert.machine_ad()
    who = f"advert of {advert.node[:64]!r}"
    if len(ad) > MAX_ATTRIBUTES:
        raise AdvertError(f"{who}: {len(ad)} attributes in its machine ad (at most {MAX_ATTRIBUTES})")
    exprs = {name: str(ad.lookup(name)) for name in ad}
    for name, text in exprs.items():
        if len(text) > MAX_EXPR_BYTES:
            raise AdvertError(f"{who}: its {name[:64]} is {len(text)} bytes long (at most {MAX_EXPR_BYTES})")
    found = adcost.problem(exprs, max_foreign=MAX_JOB_REFERENCES, forbidden=frozenset())
    if found is not None:
        raise AdvertError(f"{who}: its {found[0][:64]} {found[1]}")
    for name, cost in adcost.costs(exprs).items():
        if cost.foreign and name.lower() not in adcost.MACHINE_POLICY:
            raise AdvertError(f"{who}: its {name[:64]} refers to the job; only Start, Requirements and Rank may")
    return ad


def encode(advert: Advert) -> bytes:
    return json.dumps(
        {
            "v": VERSION,
            "node": advert.node,
            "queue": advert.queue,
            "state": advert.state,
            "sent": advert.sent,
            "period_s": advert.period_s,
            "ad": advert.ad_text,
            "jobs": [job.to_json() for job in advert.jobs],
            "peers": dict(advert.peers),
        },
        separators=(",", ":"),
    ).encode()


def json_object(body: bytes, version: int, error: type[CarodError]) -> dict[str, Any]:
    """A JSON object with ``"v": version`` (adverts, control messages); raises ``error`` naming what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise error("not a JSON object")
    if data.get("v") != version:
        raise error(f"unknown version {data.get('v')!r}")
    return data


def decode(body: bytes, *, max_bytes: int = 256 * 1024) -> Advert:
    """Read an advert. Raises AdvertError naming what is wrong (a body over ``max_bytes`` is not decoded)."""
    if len(body) > max_bytes:
        raise AdvertError(f"an advert of {len(body)} bytes (at most {max_bytes})")
    data = json_object(body, VERSION, AdvertError)
    node, queue, state, ad_text = (data.get(k) for k in ("node", "queue", "state", "ad"))
    sent, period = data.get("sent"), data.get("period_s")
    if not isinstance(node, str) or not node or not isinstance(queue, str) or not isinstance(ad_text, str):
        raise AdvertError("node, queue and ad must be strings")
    if state not in STATES:
        raise AdvertError(f"unknown state {state!r}")
    if (
        not isinstance(sent, int | float)
        or not isinstance(period, int | float)
        or not _finite(sent)
        or not _finite(period)
    ):
        raise AdvertError("sent and period_s must be numbers")
    raw_peers = data.get("peers", {})
    if not isinstance(raw_peers, dict) or not all(isinstance(k, str) and _finite(v) for k, v in raw_peers.items()):
        raise AdvertError("peers must map names to times")
    peers = {str(k): float(v) for k, v in raw_peers.items()}
    return Advert(node, queue, str(state), float(sent), float(period), ad_text, _jobs(data.get("jobs", [])), peers)


def _jobs(items: object) -> tuple[JobInfo, ...]:
    if not isinstance(items, list):
        raise AdvertError("jobs must be a list")
    jobs = []
    for item in items:
        try:
            jobs.append(
                JobInfo(
                    message_id=str(item["message_id"]),
                    owner=str(item["owner"]),
                    cmd=str(item["cmd"]),
                    started=float(item["started"]),
                    cpus=float(item["cpus"]),
                    memory_mib=float(item["memory_mib"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AdvertError(f"a job entry is incomplete: {exc!r}") from exc
    return tuple(jobs)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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


def newest(adverts: Iterable[Advert]) -> dict[str, Advert]:
    """The latest advert of each node (by ``sent``)."""
    latest: dict[str, Advert] = {}
    for advert in adverts:
        known = latest.get(advert.node)
        if known is None or advert.sent >= known.sent:
            latest[advert.node] = advert
    return latest


def status_table(adverts: Mapping[str, Advert], silent: Mapping[str, float], now: float) -> str:
    """The pool as ``condor_status`` prints it: one line per node, then totals."""
    header = f"{'Name':<24} {'State':<12} {'Cpus':>11} {'Memory MiB':>15} {'Jobs':>5} {'LoadAv':>6} {'Heard':>7}"
    lines = [header]
    free_cpus = total_cpus = free_mem = total_mem = jobs = 0.0
    for name in sorted(adverts):
        advert = adverts[name]
        ad = advert.machine_ad()
        values = {  # literals only: a forged advert's expressions are not evaluated here
            k: classads.evaluate(ad, k) if k in ad and adcost.is_literal(str(ad.lookup(k))) else 0
            for k in ("Cpus", "TotalCpus", "Memory", "TotalMemory", "LoadAvg")
        }
        nums = {
            k: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0 for k, v in values.items()
        }
        free_cpus += nums["Cpus"]
        total_cpus += nums["TotalCpus"]
        free_mem += nums["Memory"]
        total_mem += nums["TotalMemory"]
        jobs += len(advert.jobs)
        lines.append(
            f"{name[:24]:<24} {advert.state:<12} {_of(nums['Cpus'], nums['TotalCpus']):>11} "
            f"{_of(nums['Memory'], nums['TotalMemory']):>15} {len(advert.jobs):>5} {nums['LoadAvg']:>6.2f} "
            f"{_ago(now - advert.sent):>7}"
        )
    for name in sorted(silent):
        lines.append(
            f"{name[:24]:<24} {'Unresponsive':<12} {'-':>11} {'-':>15} {'-':>5} {'-':>6} {_ago(now - silent[name]):>7}"
        )
    lines.append("")
    lines.append(
        f"{len(adverts)} node(s) answering, {len(silent)} silent; cpus {_of(free_cpus, total_cpus)} free, "
        f"memory {_of(free_mem, total_mem)} MiB free, {int(jobs)} job(s) running"
    )
    return "\n".join(lines) + "\n"


def queue_table(jobs: Iterable[tuple[str, JobInfo]], now: float) -> str:
    """The jobs running in the pool as ``condor_q`` prints them: one line per job, then a count."""
    lines = [f"{'ID':<36} {'Owner':<12} {'Node':<20} {'Run time':>9} {'Cpus':>5} {'Mem MiB':>8}  Cmd"]
    count = 0
    for node, job in sorted(jobs, key=lambda item: item[1].started):
        count += 1
        lines.append(
            f"{job.message_id[:36]:<36} {(job.owner or '-')[:12]:<12} {node[:20]:<20} "
            f"{_duration(now - job.started):>9} {job.cpus:>5g} {job.memory_mib:>8g}  {job.cmd}"
        )
    lines.append("")
    lines.append(f"{count} job(s) running")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _of(free: float, total: float) -> str:
    return f"{free:g}/{total:g}"


def _ago(seconds: float) -> str:
    return f"{max(0.0, seconds):.1f}s"
