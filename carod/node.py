"""One job's path through the node: message -> job ad -> match -> sandbox -> run -> reply.

:meth:`Node.handle` owns a delivery from the moment it arrives until it is
settled. Every step is written to the journal first (docs/reliability.md):

* a reply is recorded in the journal's outbox, then published, then marked
  confirmed when the broker confirms it;
* a final reply (Completed or Held) is published only while the job has a
  live delivery, in one AMQP transaction with that delivery's ack;
* a redelivered ``message_id`` is recognised: still running here -> the new
  delivery is adopted; answered -> acknowledged; finished but not yet
  answered -> the stored final reply is sent; interrupted -> run again as a
  new attempt (``JobRunCount``), up to ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiormq
import classad2
from aio_pika.abc import AbstractIncomingMessage

from carod import classads, jobad, machine, replies, sandbox
from carod.broker import Broker, ReplyUndeliverable, reply_and_ack, settle
from carod.classads import Scalar
from carod.config import Config
from carod.errors import BrokerError, JobHeld
from carod.execute import Executor, Run
from carod.holdcodes import HoldCode
from carod.journal import (
    FINISHED,
    INTERRUPTED,
    RECEIVED,
    REPLIED,
    RUNNING,
    JobRecord,
    Journal,
    JournalError,
    OutboxEntry,
)
from carod.message import Envelope, parse_envelope
from carod.runner import JobProcess, process_start_time

log = logging.getLogger("carod.job")

#: Between retries of a reply the broker did not confirm.
_RETRY_S = (0.1, 0.5, 1.0, 2.0, 5.0)


@dataclass
class Job:
    """The node's view of one job while it is handled here."""

    envelope: Envelope
    message: AbstractIncomingMessage
    received: float = field(default_factory=time.monotonic)
    sequence: int = 0
    run_count: int = 0
    process: JobProcess | None = None
    kill_sig: int = signal.SIGTERM
    evicted: str | None = None
    redelivered: asyncio.Event = field(default_factory=asyncio.Event)
    #: finished, waiting for a live delivery to answer on
    waiting: bool = False

    @property
    def message_id(self) -> str:
        return self.envelope.message_id or ""

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence

    def elapsed_s(self) -> float:
        return time.monotonic() - self.received

    def adopt(self, message: AbstractIncomingMessage) -> None:
        """A new delivery of this job arrived (its old channel died): it is ours now."""
        self.message = message
        self.redelivered.set()

    def delivery_live(self) -> bool:
        try:
            self.message.channel  # noqa: B018 - raises when the delivery's channel is gone
        except aiormq.exceptions.ChannelInvalidStateError:
            return False
        return True

    async def wait_live(self, timeout_s: float, stopping: asyncio.Event) -> None:
        """Until the job has a delivery on an open channel.

        TimeoutError after ``timeout_s``, or at once when the node is stopping
        (the broker will not give the job back to a node that is leaving).
        """
        if self.delivery_live():
            return
        self.waiting = True
        try:
            async with asyncio.timeout(timeout_s):
                while not self.delivery_live():
                    if stopping.is_set():
                        raise TimeoutError
                    self.redelivered.clear()
                    waits = {asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(self.redelivered.wait())}
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiter in waits:
                            waiter.cancel()
        finally:
            self.waiting = False


class Node:
    """Runs jobs. Concurrency is bounded by the broker's prefetch (one place)."""

    def __init__(
        self, config: Config, machine_ad: classad2.ClassAd, broker: Broker, executor: Executor, journal: Journal
    ) -> None:
        self.config = config
        self.machine_ad = machine_ad
        self.broker = broker
        self.executor = executor
        self.journal = journal
        self.name = config.node_name
        self.results_dir = executor.results_dir
        self.jobs: dict[int, Job] = {}
        self.running: dict[str, Job] = {}
        #: set when the node shuts down: answers waiting for a redelivery stay in the journal
        self.stopping = asyncio.Event()

    # ------------------------------------------------------------ start-up

    async def recover(self) -> None:
        """Before consuming: clean up after a crash, as the journal tells it."""
        killed = await self.executor.clean_host()
        if killed:
            log.warning("killed %d process(es) left by jobs of an earlier carod", killed)
        interrupted = await self.journal.interrupted()
        for record in interrupted:
            await self._clean_interrupted(record)
            await self.journal.set_state(record.message_id, INTERRUPTED)
        root = self.config.node.sandbox_root
        stale = await asyncio.to_thread(lambda: [p for p in root.iterdir()] if root.exists() else [])
        for path in stale:  # nothing runs yet: every sandbox left is an orphan
            await asyncio.to_thread(sandbox.remove, path)
        await self.expire()
        keep = await self.journal.pending_files()
        orphans = await asyncio.to_thread(lambda: [p for p in self.results_dir.iterdir() if str(p) not in keep])
        for path in orphans:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        pending = await self.journal.pending_count()
        if interrupted or stale or pending:
            log.warning(
                "recovered: %d interrupted job(s) cleaned up (they run again when redelivered), "
                "%d leftover sandbox(es) removed, %d reply(ies) waiting for their job's redelivery",
                len(interrupted),
                len(stale),
                pending,
            )

    async def expire(self) -> None:
        for path in await self.journal.expire(self.config.node.journal_retention_s):
            await asyncio.to_thread(Path(path).unlink, missing_ok=True)

    # ------------------------------------------------------------ entry point

    async def handle(self, message: AbstractIncomingMessage) -> None:
        envelope = parse_envelope(message.message_id, message.reply_to, message.headers or {})
        mid = envelope.message_id
        if mid is not None and (live := self.running.get(mid)) is not None:
            if live.delivery_live():
                # A second message with the same message_id while the first is
                # still held: a duplicate submission, answered by the first.
                log.warning("job=%s state=duplicate: the same message_id is already running here; acknowledged", mid)
                await settle(message, "ack", label=mid)
                return
            live.adopt(message)
            log.info("job=%s state=adopted: redelivered while it runs here; the new delivery replaces the old", mid)
            return
        job = Job(envelope, message)
        key = id(job)
        self.jobs[key] = job
        if mid is not None:
            self.running[mid] = job
        try:
            await self._handle(job)
        except JournalError as exc:
            log.error("job=%s cannot be journaled (%s); offered to other nodes", envelope.label, exc)
            await self._pass_on(job, exc)
        except Exception:
            # A bug in carod, not a problem with the job: do not answer for it
            # and do not ack; count it so that a job that always hits the bug
            # is eventually Held instead of looping.
            log.exception("job=%s internal error; the message goes back to the queue", envelope.label)
            if mid is not None:
                with contextlib.suppress(JournalError):
                    await self.journal.count_failure(mid)
            await settle(job.message, "requeue", label=envelope.label)
        finally:
            del self.jobs[key]
            if mid is not None and self.running.get(mid) is job:
                del self.running[mid]

    async def _handle(self, job: Job) -> None:
        env = job.envelope
        _log_state(env, "received", job, offers=env.offers, redelivered=job.message.redelivered)
        if env.reply_to is None:
            log.warning("job=%s has no reply_to: nobody can be told about it; dropped", env.label)
            await settle(job.message, "ack", label=env.label)
            return
        if env.message_id is None:
            held = JobHeld("the job message has no message_id; carod needs one to identify the job")
            await self._commit_final(job, self._held(job, held).headers, b"")
            return
        record, new = await self.journal.receive(env.message_id)
        if not new and await self._known(job, record):
            return
        try:
            ad = classads.ad_from_headers(job.message.headers or {})
            jobad.apply_defaults(ad)
            spec = jobad.job_spec(ad)
        except JobHeld as held:
            await self._final(job, self._held(job, held))
            return
        job.kill_sig = spec.kill_sig
        machine.refresh(self.machine_ad, self.config)
        result = classads.match(ad, self.machine_ad)
        if not result.ok:
            await self._decline(job, ad, result.reason)
            return
        await self._run(job, spec)

    async def _known(self, job: Job, record: JobRecord) -> bool:
        """A redelivery of a job the journal knows. True when it is fully handled."""
        env = job.envelope
        job.sequence = record.sequence
        job.run_count = record.attempts
        if record.state == REPLIED:
            _log_state(env, "duplicate", job, note="already answered; acknowledged")
            await settle(job.message, "ack", label=env.label)
            return True
        if record.state == FINISHED:
            entry = await self.journal.pending_final(record.message_id)
            if entry is not None:
                _log_state(env, "resend", job, note="finished here before; sending its stored final reply")
                await self._resend_final(job, entry)
            else:
                await settle(job.message, "ack", label=env.label)
            return True
        if record.state in (RUNNING, INTERRUPTED):
            await self._clean_interrupted(record)
            _log_state(env, "interrupted", job, attempts=record.attempts)
        limit = self.config.node.max_attempts
        if record.attempts >= limit:
            held = JobHeld(
                f"the job was started {record.attempts} times on node {self.name} and never finished "
                f"(the node or carod stopped while it ran); giving up after [node] max_attempts = {limit}",
                HoldCode.UNSPECIFIED,
            )
            await self._final(job, self._held(job, held))
            return True
        return False

    async def _clean_interrupted(self, record: JobRecord) -> None:
        if await self.executor.clean_interrupted(record.pid, record.pid_start, record.sandbox):
            log.warning("job=%s killed the processes left from its interrupted run", record.message_id)

    async def _pass_on(self, job: Job, error: JournalError) -> None:
        """Give a job this node cannot record to another node; Held after max_offers."""
        offers = job.envelope.offers + 1
        limit = self.config.broker.max_offers
        if limit and offers >= limit:
            held = JobHeld(f"no node could record the job after {offers} offers (last, {self.name}: {error})")
            await self._commit_final(job, self._held(job, held).headers, b"")
            return
        try:
            await self.broker.offer_later(job.message, offers)
        except BrokerError:
            await settle(job.message, "requeue", label=job.envelope.label)
            return
        await settle(job.message, "ack", label=job.envelope.label)

    # ------------------------------------------------------------ declining

    async def _decline(self, job: Job, ad: classad2.ClassAd, reason: str) -> None:
        env = job.envelope
        offers = env.offers + 1
        limit = self.config.broker.max_offers
        if limit and offers >= limit:
            held = JobHeld(
                f"no execute node matched the job's Requirements after {offers} offers "
                f"(Requirements = {classads.expr_text(ad, 'Requirements')}; last node {self.name}: {reason})",
                HoldCode.UNSPECIFIED,
            )
            await self._final(job, self._held(job, held))
            return
        try:
            await self.broker.offer_later(job.message, offers)
        except BrokerError as exc:
            log.warning("job=%s could not be parked for another node (%s); requeued", env.label, exc)
            await settle(job.message, "requeue", label=env.label)
            return
        await self.journal.forget(job.message_id)
        _log_state(env, "declined", job, reason=reason, offers=offers)
        await settle(job.message, "ack", label=env.label)

    # ------------------------------------------------------------ running

    async def _run(self, job: Job, spec: jobad.JobSpec) -> None:
        env = job.envelope
        run = await self.executor.begin()
        try:
            try:
                box = await self.executor.create_box(run, job.message_id)
            except JobHeld as held:
                await self._final(job, self._held(job, held))
                return
            job.run_count = await self.journal.start_attempt(job.message_id, str(box))
            memory_mib = classads.evaluate(self.machine_ad, "Memory")
            try:
                process = await self.executor.start(
                    run, spec, job.message.body, memory_mib if isinstance(memory_mib, int) else 0
                )
            except JobHeld as held:
                await self._final(job, self._held(job, held))
                return
            job.process = process
            await self.journal.set_pid(job.message_id, process.pid, process_start_time(process.pid))
            _log_state(
                env,
                "running",
                job,
                pid=process.pid,
                user=run.user.name,
                run=job.run_count,
                start_latency_s=round(job.elapsed_s(), 6),
            )
            running = replies.running(
                sequence=job.next_sequence(),
                node=self.name,
                now=time.time(),
                start_date=process.start_time,
                pid=process.pid,
                run_count=job.run_count,
            )
            await self._send(job, running)
            info, exceeded = await self.executor.watch(run, job.kill_sig)
            if job.evicted is not None:
                await self.executor.end(run)
                await self._evicted(job)
                return
            if exceeded is not None:
                await self.executor.end(run)
                await self._final(job, self._held(job, exceeded, info=info))
                return
            await self._finish(job, spec, run, info)
        finally:
            # With a live process only when the task was cancelled (forced
            # exit): the job dies with it and the broker requeues it.
            await self.executor.end(run)

    async def _finish(self, job: Job, spec: jobad.JobSpec, run: Run, info: replies.ExitInfo) -> None:
        try:
            result_zip, results = await self.executor.collect(run, spec)
        except JobHeld as held:
            await self.executor.end(run)
            await self._final(job, self._held(job, held, info=info))
            return
        # The job is over and its results are safe: free its sandbox and user
        # now, not after the final reply (which may wait for a redelivery).
        await self.executor.end(run)
        if results.skipped:
            log.info(
                "job=%s result zip skipped non-regular, foreign or undecodable entries: %s",
                job.envelope.label,
                ", ".join(results.skipped[:20]),
            )
        reply = replies.exited(
            sequence=job.next_sequence(),
            node=self.name,
            now=time.time(),
            info=info,
            body_path=result_zip,
            run_count=job.run_count,
            skipped=results.skipped,
        )
        _log_state(
            job.envelope,
            "exited",
            job,
            exit_code=info.exit_code,
            exit_signal=info.exit_signal,
            duration_s=round(info.duration_s, 6),
            result_bytes=results.bytes,
        )
        await self._final(job, reply)

    async def _evicted(self, job: Job) -> None:
        reason = job.evicted or "evicted"
        reply = replies.idle(
            sequence=job.next_sequence(), node=self.name, now=time.time(), reason=reason, run_count=job.run_count
        )
        _log_state(job.envelope, "evicted", job, reason=reason)
        await self._send(job, reply)
        # Not an interruption: the next delivery runs it afresh.
        await self.journal.set_state(job.message_id, RECEIVED)
        await settle(job.message, "requeue", label=job.envelope.label)

    # ------------------------------------------------------------ replies

    def _held(self, job: Job, held: JobHeld, *, info: replies.ExitInfo | None = None) -> replies.Reply:
        _log_state(job.envelope, "held", job, code=int(held.code), reason=held.reason)
        return replies.held(
            sequence=job.next_sequence(),
            node=self.name,
            now=time.time(),
            reason=held.reason,
            code=held.code,
            subcode=held.subcode,
            info=info,
            run_count=job.run_count,
        )

    async def _final(self, job: Job, reply: replies.Reply) -> None:
        """Journal the final reply, then send it and ack. A cancel must not split these."""
        address = job.envelope.reply_to
        entry = await self.journal.add_reply(
            job.message_id,
            address.exchange if address else "",
            address.routing_key if address else "",
            dict(reply.headers),
            str(reply.body_path) if reply.body_path else None,
            final=True,
        )
        await self._resend_final(job, entry)

    async def _resend_final(self, job: Job, entry: OutboxEntry) -> None:
        body = await asyncio.to_thread(Path(entry.body_path).read_bytes) if entry.body_path else b""
        await asyncio.shield(self._send_final_and_ack(job, entry, body))

    async def _send_final_and_ack(self, job: Job, entry: OutboxEntry, body: bytes) -> None:
        try:
            committed_on = await self._commit_final(job, entry.headers, body)
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
        await self.journal.confirmed(entry.id, entry.message_id, final=True)
        # From here on a redelivery is answered from the journal (acked), not adopted.
        if self.running.get(entry.message_id) is job:
            del self.running[entry.message_id]
        if job.message is not committed_on:
            await settle(job.message, "ack", label=job.envelope.label)
        if entry.body_path:
            await asyncio.to_thread(Path(entry.body_path).unlink, missing_ok=True)

    async def _commit_final(
        self, job: Job, headers: Mapping[str, Scalar], body: bytes
    ) -> AbstractIncomingMessage | None:
        """Publish the final reply and ack the job in one transaction, retrying until it commits.

        Only on a live delivery: if the delivery died with its channel, this
        waits for the broker to deliver the job again (to this node); if it
        went to another node instead, that node answers and this reply stays
        unsent, so the submitter never gets two final replies. Returns the
        delivery that was acked with the reply (None when the reply could not
        be delivered).
        """
        env = job.envelope
        address = env.reply_to
        if address is None:
            await settle(job.message, "ack", label=env.label)
            return job.message
        attempt = 0
        while True:
            await job.wait_live(self.config.node.redelivery_wait_s, self.stopping)
            delivery = job.message
            try:
                await reply_and_ack(
                    self.broker,
                    delivery,
                    address,
                    correlation_id=env.message_id,
                    headers=headers,
                    body=body,
                    timeout_s=self.config.broker.confirm_timeout_s,
                )
                break
            except ReplyUndeliverable as exc:
                # Checked before the transaction: the delivery is intact, ack it alone.
                log.warning("job=%s final reply cannot be delivered: %s", env.label, exc)
                await settle(delivery, "ack", label=env.label)
                return delivery
            except BrokerError as exc:
                delay = _RETRY_S[min(attempt, len(_RETRY_S) - 1)]
                attempt += 1
                log.warning("job=%s final reply not committed (%s); retrying in %.1fs", env.label, exc, delay)
                await asyncio.sleep(delay)
        return delivery

    async def _send(self, job: Job, reply: replies.Reply) -> None:
        """A non-final reply: journaled, published until confirmed."""
        address = job.envelope.reply_to
        if address is None:
            return
        entry = await self.journal.add_reply(
            job.message_id, address.exchange, address.routing_key, dict(reply.headers), None, final=False
        )
        await self._publish(job, reply.headers, b"")
        await self.journal.confirmed(entry.id, job.message_id, final=False)

    async def _publish(self, job: Job, headers: Mapping[str, Scalar], body: bytes) -> None:
        """Publish a non-final reply until the broker confirms it (or says nobody can receive it)."""
        env = job.envelope
        if env.reply_to is None:
            return
        attempt = 0
        while True:
            try:
                await self.broker.publish_reply(env.reply_to, correlation_id=env.message_id, headers=headers, body=body)
                return
            except ReplyUndeliverable as exc:
                log.warning("job=%s reply cannot be delivered: %s", env.label, exc)
                return
            except BrokerError as exc:
                delay = _RETRY_S[min(attempt, len(_RETRY_S) - 1)]
                attempt += 1
                log.warning("job=%s reply not confirmed (%s); retrying in %.1fs", env.label, exc, delay)
                await asyncio.sleep(delay)

    # ------------------------------------------------------------ draining

    def counts(self) -> tuple[int, int]:
        """(jobs with a running process, finished jobs waiting for a delivery to answer on)."""
        waiting = sum(1 for job in self.jobs.values() if job.waiting)
        running = sum(1 for job in self.jobs.values() if job.process is not None and not job.waiting)
        return running, waiting

    async def evict_all(self, reason: str) -> None:
        """Stop every running job with its KillSig; their messages go back to the queue."""
        stops = []
        for job in list(self.jobs.values()):
            if job.process is not None and job.evicted is None:
                job.evicted = reason
                stops.append(job.process.stop(job.kill_sig, self.config.node.kill_grace_s))
        if stops:
            await asyncio.gather(*stops)


def _log_state(env: Envelope, state: str, job: Job, **fields: object) -> None:
    extra = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in fields.items())
    log.info("job=%s state=%s elapsed_s=%.6f %s", env.label, state, job.elapsed_s(), extra)
