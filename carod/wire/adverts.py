"""The pool as the nodes see it: adverts on ``carod.nodes`` and who could run a job.

Pure: encoding and decoding adverts. No I/O; the broker edge publishes and receives
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
(:func:`carod.wire.adcost.problem`), and only its ``Start``, ``Requirements`` and
``Rank`` may refer to the job (:func:`checked_ad`); at most ``[pool]
max_nodes`` nodes are kept, each for ``[pool] node_timeout_s`` after its
last advert.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import classad2

from carod.errors import CarodError
from carod.wire import adcost

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


class AdvertError(CarodError):
    """An advert that cannot be read, or that would cost too much to keep."""


#: JobStatus values a node advertises for its jobs (HTCondor's): waiting on the node, running, held.
IDLE, RUNNING_STATUS, HELD = 1, 2, 5
#: Most extra attributes one advertised job may carry, and the longest expression text of one.
MAX_JOB_ATTRS = 64
MAX_JOB_ATTR_BYTES = 2048


@dataclass(frozen=True)
class JobInfo:
    """One job on a node (running, waiting there, or held by it), as ``carod q`` shows it.

    ``attrs`` are extra job attributes as ClassAd expression text: the ones the job
    chirped (``condor_chirp set_job_attr``) and, for a held job, ``HoldReason`` and
    ``HoldReasonCode``. ``submitted`` is the job's ``QDate`` (Unix time; 0 when unknown).
    """

    message_id: str
    owner: str
    cmd: str
    started: float
    cpus: float
    memory_mib: float
    status: int = RUNNING_STATUS
    submitted: float = 0.0
    attrs: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "owner": self.owner,
            "cmd": self.cmd,
            "started": self.started,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "status": self.status,
            "submitted": self.submitted,
            "attrs": dict(self.attrs),
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


def query_ad(node: str, info: JobInfo) -> classad2.ClassAd:
    """The ClassAd ``carod q -af/-format/-constraint`` (and a node's ``-constraint``) see for one job.

    Fixed attributes from the advert's fields, then each of ``info.attrs`` parsed as an
    expression. One that does not parse, or whose evaluation is not bounded by reading it
    (:func:`carod.wire.adcost.problem`'s limits, references inlined: an advert is not
    authenticated), is left out, so evaluating any attribute of this ad is cheap. The
    fixed ones cannot be overridden by ``attrs``.
    """
    fixed: dict[str, str | int | float] = {
        "MessageId": info.message_id,
        "GlobalJobId": info.message_id,
        "Owner": info.owner,
        "Cmd": info.cmd,
        "JobStatus": info.status,
        "QDate": _integer(info.submitted),
        "JobStartDate": _integer(info.started),
        "RemoteHost": node,
        "RequestCpus": _number(info.cpus),
        "RequestMemory": _number(info.memory_mib),
    }
    taken = {name.lower() for name in fixed}
    texts = {name: text for name, text in info.attrs.items() if name.lower() not in taken}
    ad = classad2.ClassAd()
    for name in _bounded(texts, fixed):
        try:
            ad[name] = classad2.ExprTree(texts[name])
        except (classad2.ClassAdException, ValueError):
            continue
    ad.update(fixed)
    return ad


def _bounded(texts: Mapping[str, str], fixed: Mapping[str, object]) -> list[str]:
    """The names in ``texts`` whose evaluation (references inlined, ``fixed`` as literals) stays bounded."""
    everything = {**dict.fromkeys(fixed, "0"), **texts}
    keep = []
    for name, cost in adcost.costs(everything).items():
        if name not in texts or cost.unbounded is not None:
            continue
        if cost.steps > adcost.MAX_STEPS or cost.bytes > adcost.MAX_BYTES or cost.steps * cost.bytes > adcost.MAX_WORK:
            continue
        keep.append(name)
    return keep


def checked_ad(advert: Advert) -> classad2.ClassAd:
    """The advert's machine ad, if evaluating it is cheap by construction. Raises AdvertError.

    Every attribute must be bounded (:func:`carod.wire.adcost.problem`); only
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
    return tuple(decode_job(item) for item in items)


def decode_job(item: Any) -> JobInfo:
    """One job entry of an advert (:meth:`JobInfo.to_json`). Raises AdvertError."""
    try:
        return JobInfo(
            message_id=str(item["message_id"]),
            owner=str(item["owner"]),
            cmd=str(item["cmd"]),
            started=float(item["started"]),
            cpus=float(item["cpus"]),
            memory_mib=float(item["memory_mib"]),
            status=int(item.get("status", RUNNING_STATUS)),
            submitted=float(item.get("submitted", 0.0)),
            attrs=_attrs(item.get("attrs", {})),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AdvertError(f"a job entry is incomplete: {exc!r}") from exc


def _integer(value: float) -> int:
    return int(value) if math.isfinite(value) and abs(value) < 2**62 else 0


def _number(value: float) -> int | float:
    value = float(value)
    return int(value) if math.isfinite(value) and value.is_integer() else value


def _attrs(items: object) -> dict[str, str]:
    if not isinstance(items, dict) or len(items) > MAX_JOB_ATTRS:
        raise AdvertError(f"a job's attrs must map at most {MAX_JOB_ATTRS} names to expression text")
    for name, text in items.items():
        if not isinstance(name, str) or not isinstance(text, str) or len(text.encode()) > MAX_JOB_ATTR_BYTES:
            raise AdvertError(f"a job's attrs must map names to expression text of at most {MAX_JOB_ATTR_BYTES} bytes")
    return dict(items)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def newest(adverts: Iterable[Advert]) -> dict[str, Advert]:
    """The latest advert of each node (by ``sent``)."""
    latest: dict[str, Advert] = {}
    for advert in adverts:
        known = latest.get(advert.node)
        if known is None or advert.sent >= known.sent:
            latest[advert.node] = advert
    return latest
