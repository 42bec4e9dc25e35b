"""Replies on their way out: journal first, then publish until the broker confirms (within bounds).

A final reply (Completed or Held) is published only while the job has a
live delivery, in one AMQP transaction with that delivery's ack
(docs/reliability.md); a non-final one is published and confirmed alone.
The Running reply goes out without the job waiting for it
(:meth:`Answerer.send_soon`); every later reply of the job, the final one
included, waits until the broker has confirmed it (or it was given up), so
replies arrive in order and a final reply never overtakes an update.
A result zip larger than ``[broker] result_part_mib`` goes ahead of the
final reply in parts (carod.wire.parts), each confirmed before the next is read,
so at most one part of it is in memory.

Nothing is retried without a bound (docs/reliability.md, "Replies the broker
refuses"): a transient failure (connection lost, no confirm) is retried for
``[broker] reply_retry_s``; a permanent refusal is never retried as it was:

* the address refuses it (no such exchange, ACCESS_REFUSED): nobody can
  ever be answered; the job is stopped, acked without a reply, logged, counted;
* the broker refuses the message for its size or shape: a final reply is
  replaced once by a small Held one that says so (:func:`carod.wire.replies.refused`);
  an update is dropped.

Every reply goes to the address its job's first message named: a final reply
stored in the journal is sent to the address stored with it, and to no other.
A message that reuses a message_id is answered at its own address, Held, and
never journaled (:meth:`Answerer.refuse_reused`, :meth:`Answerer.answer_again`).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from carod.config import Config
from carod.edges.amqp import ReplyRefused, ReplyUndeliverable, ReplyUnroutable
from carod.edges.broker import Broker
from carod.edges.delivery import Delivery, Settle
from carod.edges.journal import Journal
from carod.edges.metrics import Metrics
from carod.edges.records import JobRecord, OutboxEntry
from carod.errors import BrokerError
from carod.holdcodes import HoldCode
from carod.node.job import Job, log_state
from carod.node.outcome import Evicted, Exited, Held, Outcome, Removed, reply_for
from carod.states import JobState
from carod.units import MIB
from carod.wire import amqp10, parts, replies
from carod.wire.classads import Scalar
from carod.wire.message import ReplyAddress

log = logging.getLogger("carod.job")

#: Between retries of a reply the broker did not confirm.
_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class GaveUp(BrokerError):
    """A reply was retried for ``[broker] reply_retry_s`` and the broker never took it."""


class Answerer:
    """Sends a job's replies; ``running`` is the node's map of jobs by message_id."""

    def __init__(
        self,
        config: Config,
        broker: Broker,
        journal: Journal,
        running: dict[str, Job],
        stopping: asyncio.Event,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.broker = broker
        self.journal = journal
        self.running = running
        self.stopping = stopping
        self.metrics = metrics
        self.part_bytes = config.broker.result_part_mib * MIB
        #: each job's update being sent without the job waiting for it (keyed by id(job))
        self._updates: dict[int, asyncio.Task[bool]] = {}

    def reply(self, job: Job, outcome: Outcome) -> replies.Reply:
        """The outcome's state change (log line, metrics) and its reply: the one place a job's end is told."""
        match outcome:
            case Exited(info, _zip, results):
                if results.skipped:
                    log.info(
                        "job=%s result zip skipped non-regular, foreign or undecodable entries: %s",
                        job.envelope.label,
                        ", ".join(results.skipped[:20]),
                    )
                log_state(
                    job,
                    JobState.EXITED,
                    self.metrics,
                    exit_code=info.exit_code,
                    exit_signal=info.exit_signal,
                    duration_s=round(info.duration_s, 6),
                    result_bytes=results.bytes,
                )
            case Held(held, info):
                log_state(job, JobState.HELD, self.metrics, code=int(held.code), reason=held.reason, info=info)
            case Removed(reason, info):
                log_state(job, JobState.REMOVED, self.metrics, reason=reason, info=info)
            case Evicted(reason, info):
                log_state(job, JobState.EVICTED, self.metrics, reason=reason, info=info)
        reply = reply_for(
            outcome, sequence=job.next_sequence(), node=self.config.node_name, now=time.time(), run_count=job.run_count
        )
        return replies.with_attrs(reply, job.chirped)

    async def conclude(self, job: Job, outcome: Outcome) -> None:
        """Answer how the job ended here: its final reply and ack; for an eviction, Idle and back to the queue."""
        reply = self.reply(job, outcome)
        if isinstance(outcome, Evicted):
            await self.send(job, reply)
            # Not an interruption: the next delivery runs it afresh.
            await self.journal.set_state(job.message_id, JobState.RECEIVED)
            await job.delivery.settle(Settle.REQUEUE, label=job.envelope.label)
            return
        await self.final(job, reply)

    async def final(self, job: Job, reply: replies.Reply) -> None:
        """Journal the final reply, then send it and ack. A cancel must not split these."""
        address = job.envelope.reply_to
        entry = await self.journal.add_reply(
            job.message_id,
            address.exchange if address else "",
            address.routing_key if address else "",
            dict(reply.headers),
            str(reply.body_path) if reply.body_path else None,
            final=True,
            reply_to=str(address) if address else None,
        )
        await self.updates_sent(job)  # never before an update the broker has not confirmed
        await self.resend_final(job, entry)

    async def reused_id(self, job: Job, record: JobRecord) -> bool:
        """True when ``job``'s message reuses a message_id first seen with another reply_to: answered Held.

        Such a message is not the job's redelivery: it is not run, and it is
        answered Held at its own address, saying that the id was already used;
        nothing of the first job's goes there (docs/protocol.md, "message_id").
        A record with no address (kept by an older carod) is not a reused id.
        """
        if record.reply_to is None or record.reply_to == str(job.envelope.reply_to):
            return False
        await self.refuse_reused(job, record)
        return True

    async def refuse_reused(self, job: Job, record: JobRecord | None) -> None:
        """Answer ``job``'s message Held: its message_id belongs to another job (``record``: its row, if any)."""
        log.warning(
            "job=%s state=%s: this message_id was first used with another reply_to or by another broker user; "
            "this message (reply_to %s) is not run and is answered Held",
            job.envelope.label,
            JobState.REUSED_ID.value,
            job.envelope.reply_to,
        )
        self.metrics.reused_ids.inc()
        reason = (
            f"this message_id was already used by another job (with another reply_to or owner){_when(record)}; "
            f"this message was not run. {self._unique_rule()}"
        )
        job.sequence, job.run_count = 0, 0  # a job of its own: nothing of the first one's
        await self.answer_alone(job, self._held(job, reason))

    async def answer_again(self, job: Job, record: JobRecord) -> None:
        """A new message (not a redelivery) with the id of a job answered here: a client sending it again.

        From the job's own reply_to its final reply is sent again while the
        journal has it whole (a reply with a result does not: the result file
        goes once the broker has it); else a Held reply says the id was
        already answered. Never journaled: the row is the first message's.
        """
        entry = await self.journal.last_final(job.message_id)
        if entry is not None and _address(entry) != job.envelope.reply_to:
            await self.refuse_reused(job, record)  # answered to another address (a row kept by an older carod)
            return
        if entry is not None and entry.body_path is None:
            log_state(job, JobState.RESEND, self.metrics, note="answered here before; its final reply is sent again")
            await self.answer_alone(job, replies.bound_headers(entry.headers))
            return
        kept = "" if entry is None else " and its result is no longer kept"
        log_state(job, JobState.DUPLICATE, self.metrics, note=f"answered here before{kept}; answered Held")
        reason = (
            f"a job with this message_id was already answered{_answered_at(record)}{kept}; this message was not run. "
            f"{self._unique_rule()}"
        )
        await self.answer_alone(job, self._held(job, reason))

    def _unique_rule(self) -> str:
        retention = self.config.node.journal_retention_s
        return (
            f"A message_id must be unique for [node] journal_retention_s = {retention:g} s: "
            "send the job again with a new message_id"
        )

    def _held(self, job: Job, reason: str) -> dict[str, Scalar]:
        """A Held reply's headers for a message that is not run (not logged as a held job)."""
        return replies.held(
            sequence=job.next_sequence(),
            node=self.config.node_name,
            now=time.time(),
            reason=reason,
            code=HoldCode.UNSPECIFIED,
            run_count=job.run_count,
        ).headers

    async def answer_alone(self, job: Job, headers: Mapping[str, Scalar]) -> None:
        """A final reply the journal does not keep (its row is another message's), committed with the ack."""
        try:
            await asyncio.shield(self.commit_final(job, headers, b""))
        except GaveUp as exc:
            log.error("job=%s reply given up for now (%s); its message is requeued", job.envelope.label, exc)
            self.metrics.replies_given_up.labels(kind="final").inc()
            await job.delivery.settle(Settle.REQUEUE, label=job.envelope.label)
        except TimeoutError:
            log.warning(
                "job=%s no live delivery to answer on for %.0fs; its message is left to the broker",
                job.envelope.label,
                self.config.node.redelivery_wait_s,
            )

    async def resend_final(self, job: Job, entry: OutboxEntry) -> None:
        """Send the journaled final reply ``entry`` to the address stored with it, with ``job``'s delivery."""
        if _address(entry) != job.envelope.reply_to:
            # Not this message's answer (its message_id was first used with
            # another reply_to): the stored reply goes to its own address or
            # nowhere; this message is told that its id was taken.
            await self.refuse_reused(job, None)
            return
        headers: dict[str, Scalar] = replies.bound_headers(entry.headers)
        body = b""
        if entry.body_path and not job.unanswerable:
            path = Path(entry.body_path)
            whole, size = await asyncio.to_thread(_read_if_small, path, self.part_bytes)
            if whole is not None:
                body = whole
            else:
                headers.update(await self._send_parts(job, path, size))
        await asyncio.shield(self._send_final_and_ack(job, entry, headers, body))

    async def _send_parts(self, job: Job, path: Path, size: int) -> dict[str, str | int]:
        """Publish the result zip at ``path`` in confirmed parts; the final reply's part headers."""
        result_id = uuid.uuid4().hex
        count = parts.count(size, self.part_bytes)
        digest = hashlib.sha256()
        # Only to a live delivery: parts of a job that went to another node would be noise.
        await job.delivery.wait_live(self.config.node.redelivery_wait_s, self.stopping)
        started = asyncio.get_running_loop().time()
        f = await asyncio.to_thread(path.open, "rb")
        try:
            for index in range(count):
                chunk = await asyncio.to_thread(_read_part, f, self.part_bytes, digest)
                if not await self._publish(job, parts.part_headers(result_id, index, count, size), chunk):
                    break  # nobody can receive it; the final reply finds that out too
        finally:
            await asyncio.to_thread(f.close)
        log.info(
            "job=%s result of %d bytes sent in %d parts duration_s=%.3f",
            job.envelope.label,
            size,
            count,
            asyncio.get_running_loop().time() - started,
        )
        return parts.final_headers(result_id, count, size, digest.hexdigest())

    async def _send_final_and_ack(
        self, job: Job, entry: OutboxEntry, headers: Mapping[str, Scalar], body: bytes
    ) -> None:
        try:
            await self.commit_final(job, headers, body)
        except GaveUp as exc:
            # Nothing is lost and nothing spins: the reply stays in the journal,
            # the message goes back to the broker, and its next delivery (here,
            # or after a restart) is answered from the journal.
            log.error("job=%s final reply given up for now (%s); its message is requeued", job.envelope.label, exc)
            self.metrics.replies_given_up.labels(kind="final").inc()
            if self.running.get(entry.message_id) is job:
                del self.running[entry.message_id]
            await job.delivery.settle(Settle.REQUEUE, label=job.envelope.label)
            return
        except TimeoutError:
            # Its delivery died and the broker has not given it back: another
            # node probably took it. The answer stays in the journal; a later
            # redelivery here is answered from it.
            log.warning(
                "job=%s finished, but no live delivery to answer it on for %.0fs; its reply waits in the journal",
                job.envelope.label,
                self.config.node.redelivery_wait_s,
            )
            if self.running.get(entry.message_id) is job:
                del self.running[entry.message_id]
            return
        # Not waited for: in the journal's next commit, which comes before any later call's
        # answer (a redelivery's look-up included); the result file goes after that commit.
        await self.journal.confirmed(entry.id, entry.message_id, final=True)
        # From here on a redelivery is answered from the journal (acked), not adopted.
        if self.running.get(entry.message_id) is job:
            del self.running[entry.message_id]
        if not job.delivery.acked:  # a redelivery adopted since the commit: it is answered too
            await job.delivery.settle(Settle.ACK, label=job.envelope.label)

    async def commit_final(self, job: Job, headers: Mapping[str, Scalar], body: bytes) -> None:
        """Publish the final reply and ack the job in one transaction, retrying until it commits (within bounds).

        Only on a live delivery: if the delivery died with its channel, this
        waits for the broker to deliver the job again (to this node); if it
        went to another node instead, that node answers and this reply stays
        unsent, so the submitter never gets two final replies. The delivery
        is acked with the reply (or alone, when the broker refuses every
        reply to the job's address). Raises GaveUp after
        ``[broker] reply_retry_s`` of transient failures, TimeoutError when
        no live delivery came back.
        """
        env = job.envelope
        address = env.reply_to
        if address is None:
            await job.delivery.settle(Settle.ACK, label=env.label)
            return
        headers = replies.bound_headers(headers)
        deadline = asyncio.get_running_loop().time() + self.config.broker.reply_retry_s
        attempt = 0
        replaced = False
        while True:
            await job.delivery.wait_live(self.config.node.redelivery_wait_s, self.stopping)
            delivery = job.delivery
            if job.unanswerable is not None:
                return await self._settle_unanswered(job, delivery, job.unanswerable)
            try:
                await delivery.reply_and_ack(
                    address,
                    correlation_id=env.message_id,
                    headers=_for_client(job, headers),
                    body=body,
                    timeout_s=self.config.broker.confirm_timeout_s,
                )
                return
            except ReplyRefused as exc:
                self._refused(job, exc)
                if replaced:
                    return await self._settle_unanswered(job, delivery, str(exc))
                # Never again as it was: a small Held reply that says why, on this
                # delivery or (when the refusal cost the delivery its channel) the next.
                headers, body, replaced = replies.refused(headers, str(exc)), b"", True
            except ReplyUndeliverable as exc:
                self._refused(job, exc)
                return await self._settle_unanswered(job, delivery, str(exc))
            except BrokerError as exc:
                attempt = await _pause_before_retry(env.label, "final reply not committed", exc, attempt, deadline)

    async def _settle_unanswered(self, job: Job, delivery: Delivery, why: str) -> None:
        """Nobody can be answered: ack the delivery alone (a lost ack: the redelivery is acked as answered)."""
        log.error(
            "job=%s state=%s: acknowledged without a final reply: %s",
            job.envelope.label,
            JobState.UNANSWERED.value,
            why,
        )
        self.metrics.jobs_unanswered.inc()
        await delivery.settle(Settle.ACK, label=job.envelope.label)

    def _refused(self, job: Job, exc: ReplyUndeliverable) -> None:
        """Count a permanent refusal; one of the address means nothing more is sent for the job."""
        self.metrics.replies_refused.labels(reason=exc.kind).inc()
        if type(exc) is ReplyUndeliverable and job.unanswerable is None:
            job.unanswerable = str(exc)
            log.error("job=%s its reply address %s refuses replies: %s", job.envelope.label, job.envelope.reply_to, exc)

    async def send(self, job: Job, reply: replies.Reply) -> bool:
        """A non-final reply: journaled, published until confirmed or given up. False: not delivered."""
        await self.updates_sent(job)
        address = job.envelope.reply_to
        if address is None or job.unanswerable is not None:
            return False
        entry = await self.journal.add_reply(
            job.message_id, address.exchange, address.routing_key, dict(reply.headers), None, final=False
        )
        try:
            return await self._publish(job, reply.headers, b"")
        finally:
            await self.journal.confirmed(entry.id, job.message_id, final=False)  # sent or given up

    def send_soon(self, job: Job, reply: replies.Reply) -> asyncio.Task[bool] | None:
        """A non-final reply (Running) sent as :meth:`send` does, without the job waiting for it.

        Its journal row is in the journal's next commit, not waited for: its
        ``Sequence`` is already durable (carod.node.attempt gives it to
        start_attempt). The job's next reply, final or not, waits until the
        broker has confirmed this one or it was given up (:meth:`updates_sent`).
        None: nothing to send (no reply address, or nobody can be answered).
        """
        address = job.envelope.reply_to
        if address is None or job.unanswerable is not None:
            return None
        previous = self._updates.get(id(job))

        async def deliver() -> bool:
            entry = await self.journal.add_reply(
                job.message_id,
                address.exchange,
                address.routing_key,
                dict(reply.headers),
                None,
                final=False,
                wait=False,
            )
            try:
                if previous is not None:
                    await asyncio.wait({previous})  # its failure is its own
                return await self._publish(job, reply.headers, b"")
            finally:
                await self.journal.confirmed(entry.id, job.message_id, final=False)  # sent or given up

        task = asyncio.create_task(deliver())
        key = id(job)
        self._updates[key] = task

        def forget(done: asyncio.Task[bool]) -> None:
            if self._updates.get(key) is done:
                del self._updates[key]

        task.add_done_callback(forget)
        return task

    async def updates_sent(self, job: Job) -> None:
        """Until the job's updates sent without waiting are confirmed by the broker, or given up."""
        task = self._updates.get(id(job))
        if task is not None:
            await asyncio.wait({task})  # its failures are its own (logged, counted)

    def drop_updates(self, job: Job) -> None:
        """The job is done with here (answered, or its handling failed): stop sending its updates."""
        task = self._updates.pop(id(job), None)
        if task is not None and not task.done():
            task.cancel()

    async def progress(self, job: Job, reply: replies.Reply) -> bool:
        """A periodic update (carod.node.progress): journaled for its Sequence, published once, dropped on failure.

        Unlike :meth:`send` it never waits for the broker to come back: a
        later update supersedes it, and the final reply must not wait behind it.
        """
        await self.updates_sent(job)
        address = job.envelope.reply_to
        if address is None or job.unanswerable is not None:
            return False
        entry = await self.journal.add_reply(
            job.message_id, address.exchange, address.routing_key, dict(reply.headers), None, final=False
        )
        try:
            return await self._publish_once(job, reply.headers, b"")
        finally:
            await self.journal.confirmed(entry.id, job.message_id, final=False)  # sent or given up

    async def output(self, job: Job, headers: Mapping[str, Scalar], body: bytes) -> bool:
        """A chunk of live output (carod.node.progress), published once, not journaled. False: not delivered."""
        await self.updates_sent(job)
        return await self._publish_once(job, headers, body, message_type=replies.OUTPUT_TYPE)

    async def _publish_once(
        self, job: Job, headers: Mapping[str, Scalar], body: bytes, *, message_type: str | None = None
    ) -> bool:
        env = job.envelope
        if env.reply_to is None or job.unanswerable is not None:
            return False
        try:
            await self.broker.publish_reply(
                env.reply_to,
                correlation_id=env.message_id,
                headers=_for_client(job, replies.bound_headers(headers)),
                body=body,
                message_type=message_type,
            )
        except ReplyUndeliverable as exc:
            self._refused(job, exc)
            log.info("job=%s progress message dropped: %s", env.label, exc)
            return False
        except BrokerError as exc:
            log.info("job=%s progress message dropped: %s", env.label, exc)
            return False
        return True

    async def _publish(self, job: Job, headers: Mapping[str, Scalar], body: bytes) -> bool:
        """Publish a non-final reply until the broker confirms it, for at most reply_retry_s. False: not delivered."""
        env = job.envelope
        if env.reply_to is None or job.unanswerable is not None:
            return False
        headers = replies.bound_headers(headers)
        deadline = asyncio.get_running_loop().time() + self.config.broker.reply_retry_s
        attempt = 0
        while True:
            try:
                await self.broker.publish_reply(
                    env.reply_to, correlation_id=env.message_id, headers=_for_client(job, headers), body=body
                )
                return True
            except ReplyUnroutable as exc:  # the submitter's queue is gone; it may come back for the final reply
                self._refused(job, exc)
                log.warning("job=%s reply cannot be delivered: %s", env.label, exc)
                return False
            except ReplyUndeliverable as exc:
                self._refused(job, exc)
                log.warning("job=%s reply refused by the broker, not sent again: %s", env.label, exc)
                return False
            except BrokerError as exc:
                try:
                    attempt = await _pause_before_retry(env.label, "reply not confirmed", exc, attempt, deadline)
                except GaveUp as gave_up:
                    log.error("job=%s reply dropped: %s", env.label, gave_up)
                    self.metrics.replies_given_up.labels(kind="update").inc()
                    return False


async def _pause_before_retry(label: str, what: str, exc: BrokerError, attempt: int, deadline: float) -> int:
    """Log why a reply must be sent again, wait the attempt's delay; the next attempt's number.

    Raises GaveUp once the loop's clock passes ``deadline`` ([broker] reply_retry_s after the first try).
    """
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise GaveUp(f"{what} after {attempt + 1} attempt(s) within [broker] reply_retry_s; last error: {exc}")
    delay = min(_RETRY_S[min(attempt, len(_RETRY_S) - 1)], left)
    log.warning("job=%s %s (%s); retrying in %.1fs", label, what, exc, delay)
    await asyncio.sleep(delay)
    return attempt + 1


def _address(entry: OutboxEntry) -> ReplyAddress | None:
    """The address a journaled reply is for (None: its job had no reply_to)."""
    return ReplyAddress(entry.exchange, entry.routing_key) if entry.exchange or entry.routing_key else None


def _when(record: JobRecord | None) -> str:
    """When the job that first used a message_id was answered (or received), from its journal row."""
    if record is None:
        return ""
    if record.state == JobState.REPLIED and record.updated is not None:
        return f", answered at {_utc(record.updated)}"
    return f", received at {_utc(record.created)}" if record.created is not None else ""


def _answered_at(record: JobRecord) -> str:
    return f" at {_utc(record.updated)}" if record.updated is not None else ""


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _read_if_small(path: Path, limit: int) -> tuple[bytes | None, int]:
    """The file's bytes when it has at most ``limit`` of them, and its size (blocking)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        return (f.read() if size <= limit else None), size


def _read_part(f: BinaryIO, size: int, digest: hashlib._Hash) -> bytes:
    """The next part of a result and its contribution to the result's hash (blocking)."""
    chunk = f.read(size)
    digest.update(chunk)
    return chunk


def _for_client(job: Job, headers: Mapping[str, Scalar]) -> Mapping[str, Any]:
    """The reply's headers as the job's client reads them: for an AMQP 1.0 client, also as application-properties.

    The section goes in a binary header (an AMQP byte array), which RabbitMQ 3.x hands to the 1.0 client as
    its application-properties (carod.wire.amqp10).
    """
    if not job.envelope.amqp10:
        return headers
    return {**headers, amqp10.APP_PROPERTIES_HEADER: amqp10.app_properties_header(headers)}
