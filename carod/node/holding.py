"""Held jobs (``carod hold``): kept by the broker, journaled and advertised by the node that held them.

Holding a job (running: after its KillSig and the grace; waiting or not yet
started: at once) is, in this order (docs/reliability.md, "Held jobs"):

1. the hold is journaled (table ``held``: the job's reply address, owner,
   what ``carod q`` shows, its runs and last Sequence);
2. a copy of the job message (body, properties, headers, plus the owner in
   ``x-carod-owner`` and the node's broker user as its user_id) goes into the
   job's own durable queue ``<queue>.held.<hash>``, confirmed by the broker;
3. the Held reply (HoldReasonCode 1, UserRequest) and the ack of the original
   commit together (carod.node.answer).

A redelivery of a job the journal says is held is never run: its copy is kept
again (a second copy is harmless) and it is answered from the journal. The node
advertises its held jobs (JobStatus 5, HoldReason, HoldReasonCode), from the
journal, so after a restart too, and is the one that acts on ``release`` and
``rm`` of them:

* release: the row is marked ``releasing`` (and the job's journal row forgotten,
  so that it may run here again) -> an Idle reply (confirmed) -> the copy back to
  the job queue with its runs and Sequence (confirmed) -> the held queue deleted ->
  the row dropped. Any node may run it; JobRunCount goes on.
* rm: a Removed reply (confirmed) -> the held queue deleted -> the row dropped.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import classad2

from carod.config import Config, url_user
from carod.edges.amqp import ReplyUndeliverable
from carod.edges.broker import Broker, HeldQueueTaken, held_queue_name
from carod.edges.journal import Journal
from carod.errors import BrokerError
from carod.holdcodes import HoldCode
from carod.node.job import Job
from carod.wire import adcost, adverts, classads, replies
from carod.wire.adverts import JobInfo
from carod.wire.classads import Scalar
from carod.wire.message import (
    DELIVERY_COUNT_HEADER,
    OWNER_HEADER,
    RUNS_HEADER,
    SEQUENCE_HEADER,
    ReplyAddressError,
    parse_reply_to,
)

log = logging.getLogger("carod.job")

HELD, RELEASING = "held", "releasing"
#: Longest HoldReason kept in the advert (the reply has the whole reason).
_ADVERT_REASON = 1000
#: Headers a copy leaves out: the broker's and carod's own transport headers (set again where they apply).
_TRANSPORT = frozenset({"x-death", DELIVERY_COUNT_HEADER, "x-carod-offers", "x-carod-first-offer"})


@dataclass(frozen=True)
class HeldJob:
    """One job held by this node, as its journal row keeps it."""

    message_id: str
    state: str
    queue: str
    reply_to: str
    #: the job's verified owner (None: nobody in particular)
    owner: str | None
    reason: str
    runs: int
    #: the Sequence of the last reply sent (the Held one)
    sequence: int
    info: JobInfo

    def to_json(self) -> str:
        data = {
            "queue": self.queue,
            "reply_to": self.reply_to,
            "owner": self.owner,
            "reason": self.reason,
            "runs": self.runs,
            "sequence": self.sequence,
            "info": self.info.to_json(),
        }
        return json.dumps(data)

    @classmethod
    def from_row(cls, message_id: str, state: str, text: str) -> HeldJob:
        data: dict[str, Any] = json.loads(text)
        info = adverts.decode_job(data["info"])
        return cls(
            message_id,
            state,
            str(data["queue"]),
            str(data["reply_to"]),
            data.get("owner"),
            str(data["reason"]),
            int(data["runs"]),
            int(data["sequence"]),
            info,
        )


class Holding:
    """The node's held jobs: kept, advertised, released, removed."""

    def __init__(self, config: Config, broker: Broker, journal: Journal) -> None:
        self.config = config
        self.broker = broker
        self.journal = journal
        self.node_user = url_user(config.broker.url)
        self.held: dict[str, HeldJob] = {}
        #: held jobs being released or removed now (a second request for one is refused, not queued)
        self.busy: set[str] = set()

    async def load(self) -> None:
        """The held jobs the journal knows (at start, before any job is taken)."""
        rows = await self.journal.call(
            lambda: self.journal.execute("SELECT message_id, state, record FROM held"), writes=False
        )
        for mid, state, text in rows:
            try:
                self.held[mid] = HeldJob.from_row(mid, state, text)
            except (ValueError, KeyError, TypeError, adverts.AdvertError) as exc:
                log.error("job=%s its held row cannot be read (%s); left in the journal", mid, exc)
        if self.held:
            log.info("%d held job(s) kept by the broker for this node", len(self.held))

    def infos(self) -> list[JobInfo]:
        return [held.info for held in self.held.values()]

    def get(self, message_id: str) -> HeldJob | None:
        return self.held.get(message_id)

    # ------------------------------------------------------------ holding

    async def keep(self, job: Job, reason: str) -> None:
        """Journal the hold, then keep a copy of the job's message in its held queue. Raises BrokerError.

        ``job.sequence`` + 1 is the Sequence its Held reply will have.
        """
        env = job.envelope
        held = HeldJob(
            job.message_id,
            HELD,
            held_queue_name(self.config.broker.queue, job.message_id),
            str(env.reply_to),
            env.owner,
            reason,
            job.run_count,
            job.sequence + 1,
            held_info(job, reason),
        )
        await self._save(held)
        self.held[held.message_id] = held
        try:
            try:
                await self.keep_copy(job, held)
            except HeldQueueTaken as exc:
                # Someone declared the queue the job's id names (it is predictable) with other arguments, so
                # that every hold fails and the job loops between the queue and the node: a name of its own,
                # nobody can guess, journaled (release and rm use the journaled name).
                log.warning("job=%s %s; kept in a queue of a random name instead", job.envelope.label, exc)
                held = replace(held, queue=f"{held.queue}.{secrets.token_hex(8)}")
                await self._save(held)
                self.held[held.message_id] = held
                await self.keep_copy(job, held)
        except BrokerError:
            await self._drop(held.message_id)
            raise
        log.info("job=%s held: its message is kept in %s", job.envelope.label, held.queue)

    async def keep_copy(self, job: Job, held: HeldJob) -> None:
        """The copy of the job's message in its held queue (again, for a redelivery). Raises BrokerError."""
        headers = {k: v for k, v in job.delivery.headers.items() if k not in _TRANSPORT}
        headers[OWNER_HEADER] = held.owner or ""
        headers[RUNS_HEADER] = held.runs
        body, properties = job.delivery.copy(headers, user_id=self.node_user)
        await self.broker.keep_held(held.queue, body, properties)

    # ------------------------------------------------------------ release and rm

    async def release(self, held: HeldJob, why: str) -> str:
        """Idle to the submitter, the job back to the job queue, its held queue deleted. Raises BrokerError."""
        releasing = replace(held, state=RELEASING, sequence=held.sequence + 1)
        self.busy.add(held.message_id)
        try:
            await self._save(releasing, forget_job=True)
            self.held[held.message_id] = releasing
            await self._release(releasing, why)
        finally:
            self.busy.discard(held.message_id)
        log.info("job=%s released: back in %s (%s)", held.message_id, self.config.broker.queue, why)
        return "released"

    async def _release(self, held: HeldJob, why: str) -> None:
        """Raises BrokerError: the row stays (``releasing``), and a release or rm later does it again."""
        idle = replies.idle(
            sequence=held.sequence, node=self.config.node_name, now=time.time(), reason=why, run_count=held.runs
        )
        await self._reply(held, idle.headers)
        headers: dict[str, Scalar] = {
            RUNS_HEADER: held.runs,
            SEQUENCE_HEADER: held.sequence,
            OWNER_HEADER: held.owner or "",
        }
        if not await self.broker.release_held(held.queue, headers, user_id=self.node_user, message_id=held.message_id):
            log.warning("job=%s its held queue %s had no message: released before", held.message_id, held.queue)
        await self.finish_release(held.message_id)

    async def finish_release(self, message_id: str) -> None:
        """The released job's row dropped (also when its message reached this node before that)."""
        await self._drop(message_id)

    async def remove(self, held: HeldJob, why: str) -> str:
        """Removed to the submitter, its held queue (and message) deleted. Raises BrokerError."""
        self.busy.add(held.message_id)
        try:
            await self._remove(held, why)
        finally:
            self.busy.discard(held.message_id)
        log.info("job=%s held job removed: %s", held.message_id, why)
        return "held"

    async def _remove(self, held: HeldJob, why: str) -> None:
        removed = replies.removed(
            sequence=held.sequence + 1,
            node=self.config.node_name,
            now=time.time(),
            reason=why,
            info=None,
            run_count=held.runs,
        )
        await self._reply(held, removed.headers)
        await self.broker.delete_held(held.queue)
        await self._drop(held.message_id)

    async def _reply(self, held: HeldJob, headers: Mapping[str, Scalar]) -> None:
        """A reply to the held job's submitter, confirmed. Raises BrokerError (try again later); a reply
        address that refuses it for good (the submitter's queue is gone) is logged, not raised: the job's
        release or removal must not depend on a submitter that left."""
        try:
            address = parse_reply_to(held.reply_to)
        except ReplyAddressError:
            address = None
        if address is None:
            return
        try:
            await self.broker.publish_reply(address, correlation_id=held.message_id, headers=headers, body=b"")
        except ReplyUndeliverable as exc:
            log.warning("job=%s its submitter cannot be told (%s); going on", held.message_id, exc)

    # ------------------------------------------------------------ journal

    async def _save(self, held: HeldJob, *, forget_job: bool = False) -> None:
        def save() -> None:
            self.journal.execute(
                "INSERT OR REPLACE INTO held (message_id, state, record, created) VALUES (?, ?, ?, ?)",
                (held.message_id, held.state, held.to_json(), time.time()),
            )
            if forget_job:  # a released job may run here again: its next message is a new job's, not a redelivery
                self.journal.execute("DELETE FROM outbox WHERE message_id = ?", (held.message_id,))
                self.journal.execute("DELETE FROM jobs WHERE message_id = ?", (held.message_id,))

        await self.journal.call(save)

    async def _drop(self, message_id: str) -> None:
        await self.journal.call(lambda: self.journal.execute("DELETE FROM held WHERE message_id = ?", (message_id,)))
        self.held.pop(message_id, None)


def held_info(job: Job, reason: str) -> JobInfo:
    """What ``carod q`` shows of a held job: JobStatus 5 with its HoldReason and HoldReasonCode."""
    attrs = {
        "HoldReason": classad2.quote(reason[:_ADVERT_REASON]),
        "HoldReasonCode": str(int(HoldCode.USER_REQUEST)),
        "OwnerVerified": "true" if job.envelope.owner is not None else "false",
    }
    ad = job.ad
    if ad is not None:
        owner, cmd = classads.evaluate(ad, "Owner"), classads.evaluate(ad, "Cmd")
        cpus, memory = classads.evaluate(ad, "RequestCpus"), classads.evaluate(ad, "RequestMemory")
    else:
        owner, cmd = (
            job.envelope.owner or _header_text(job.headers.get("Owner")) or "nobody",
            _header_text(job.headers.get("Cmd")),
        )
        cpus, memory = 1.0, 0.0
    return JobInfo(
        message_id=job.message_id,
        owner=owner if isinstance(owner, str) else "",
        cmd=cmd if isinstance(cmd, str) else "",
        started=job.started,
        cpus=float(cpus) if isinstance(cpus, int | float) and not isinstance(cpus, bool) else 1.0,
        memory_mib=float(memory) if isinstance(memory, int | float) and not isinstance(memory, bool) else 0.0,
        status=adverts.HELD,
        submitted=job.submitted,
        attrs=attrs,
    )


def _header_text(value: object) -> str:
    """A string header's value (ClassAd string text unquoted), bounded; "" when it is none."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or len(value) > 4096:
        return ""
    if not adcost.is_literal(value):  # hostile text: only a literal is evaluated here (sprintf could cost GBs)
        return value
    try:
        result = classad2.ExprTree(value).eval()
    except (classad2.ClassAdException, ValueError):
        return value
    return result if isinstance(result, str) else value
