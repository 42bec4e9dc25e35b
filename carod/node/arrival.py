"""A job's arrival and placement: message -> job ad -> match -> here, later, elsewhere, or never.

:meth:`Node.handle` owns a delivery from the moment it arrives until it is
settled. Every step that matters after a crash is written to the journal
first (docs/reliability.md):

* a redelivered ``message_id`` is recognised: still running here -> the new
  delivery is adopted; known to the journal -> carod.node.recovery answers it;
  the same id with another ``reply_to`` is another job's: answered Held, not run;
* what may run at once is decided by carod.node.admission: a job that does
  not fit what is free waits, unless another node could start it sooner;
  a job that would never run here is passed on or declined to the delay queue;
* a job placed here runs once (carod.node.attempt), and how it ended is
  answered by carod.node.answer.Answerer.conclude.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

import classad2

from carod.config import Config
from carod.edges.broker import Broker
from carod.edges.delivery import Delivery, Parking, Settle
from carod.edges.journal import Journal, JournalError
from carod.edges.metrics import Metrics
from carod.errors import BrokerError, JobHeld
from carod.holdcodes import HoldCode
from carod.node import machine, pool
from carod.node.admission import Admission
from carod.node.answer import Answerer
from carod.node.attempt import Attempt
from carod.node.evaluator import Evaluator
from carod.node.holding import RELEASING, HeldJob, Holding
from carod.node.job import Ending, Job, log_state, set_requests
from carod.node.outcome import Held, Removed
from carod.node.pool import HandBacks, PoolView
from carod.node.recovery import Recovery
from carod.node.removals import Pending, Removals
from carod.sandbox.execute import Executor
from carod.states import JobState
from carod.wire import amqp10, classads, control, jobad
from carod.wire.adverts import JobInfo
from carod.wire.jobad import Request
from carod.wire.message import Envelope, parse_envelope

log = logging.getLogger("carod.job")

#: An AMQP 1.0 message with more than this to decode (its 1.0 headers, or a body sent as 1.0 sections) is
#: decoded in a thread, not on the event loop: a 60 KB section of 4,000 properties takes about 45 ms to read.
_DECODE_ON_LOOP_BYTES = 4 * 1024


class Node:
    """Takes jobs in and places them.

    What runs at once is decided in one place: :class:`~carod.node.admission.Admission`.
    """

    def __init__(
        self,
        config: Config,
        machine_ad: classad2.ClassAd,
        broker: Broker,
        executor: Executor,
        journal: Journal,
        admission: Admission,
        pool: PoolView,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.machine_ad = machine_ad
        self.broker = broker
        self.executor = executor
        self.journal = journal
        self.admission = admission
        self.resources = admission.resources
        self.pool = pool
        self.metrics = metrics
        self.name = config.node_name
        self.jobs: dict[int, Job] = {}
        self.running: dict[str, Job] = {}
        #: set when the node shuts down: answers waiting for a redelivery stay in the journal
        self.stopping = asyncio.Event()
        self.answer = Answerer(config, broker, journal, self.running, self.stopping, metrics)
        self._handed_back = HandBacks()
        #: carod rm of jobs that may reach this node later
        self.removals = Removals(config.node.max_removals, config.node.journal_retention_s)
        #: jobs held here (carod hold): kept by the broker, advertised, released or removed here
        self.holding = Holding(config, broker, journal)
        self.evaluator = Evaluator.for_node(config, metrics)
        self.attempt = Attempt(config, executor, journal, self.answer, metrics)
        self.attempt.advertise = admission.changed.set  # a chirped attribute: in the advert at once
        self.recovery = Recovery(config, executor, journal, self.answer, self.removals, self.evaluator, metrics)
        self._disk_fixed = machine.disk_is_fixed(config)
        admission.disk_available = self.disk_available

    # ------------------------------------------------------------ entry point

    async def handle(self, delivery: Delivery) -> None:
        message_id, reply_to, headers, body = delivery.message_id, delivery.reply_to, delivery.headers, delivery.body
        unreadable = None
        from_amqp10 = amqp10.is_amqp10(headers)
        if from_amqp10:
            try:
                if amqp10.work_bytes(headers, body) > _DECODE_ON_LOOP_BYTES:
                    incoming = await asyncio.to_thread(amqp10.unpack, message_id, reply_to, headers, body)
                else:
                    incoming = amqp10.unpack(message_id, reply_to, headers, body)
                message_id, reply_to, headers, body = (
                    incoming.message_id,
                    incoming.reply_to,
                    incoming.headers,
                    incoming.body,
                )
            except amqp10.Amqp10Error as exc:
                unreadable = f"the job message came from an AMQP 1.0 client, and {exc}"
        envelope = parse_envelope(
            message_id,
            reply_to,
            headers,
            queue=self.config.broker.queue,
            user_id=delivery.user_id,
            node_user=self.holding.node_user,
        )
        if from_amqp10:
            envelope = dataclasses.replace(envelope, amqp10=True)
        mid = envelope.message_id
        live = self.running.get(mid) if mid is not None else None
        if live is not None and envelope.reply_to_problem is not None:
            live = None  # nobody can be told: handled as any unusable reply_to, never as this job's
            mid = None
        same_sender = live is not None and live.envelope.owner == envelope.owner
        if mid is not None and live is not None and live.envelope.reply_to == envelope.reply_to and same_sender:
            if live.delivery.live():
                # A second message with the same message_id and reply_to while the first is
                # still held: the running job answers that address (docs/protocol.md).
                log.warning(
                    "job=%s state=%s: the same message_id is already running here; acknowledged",
                    mid,
                    JobState.DUPLICATE.value,
                )
                self.admission.hold(delivery)
                await delivery.settle(Settle.ACK, label=mid)
                self.admission.done(delivery)
                return
            live.delivery.adopt(delivery)
            self.admission.hold(live.delivery)  # held by the running job from now on (the new consumer tag)
            log.info(
                "job=%s state=%s: redelivered while it runs here; the new delivery replaces the old",
                mid,
                JobState.ADOPTED.value,
            )
            return
        job = Job(
            envelope,
            delivery,
            self.admission.arrive(delivery),
            headers=headers,
            body=body,
            unreadable=unreadable,
            sequence=envelope.sequence,
            run_count=envelope.runs,
        )
        key = id(job)
        self.jobs[key] = job
        if mid is not None and live is None:
            self.running[mid] = job
        try:
            if live is not None:  # another job's message_id, from another reply_to: answered Held, not run
                await self.answer.refuse_reused(job, await self.journal.get(live.message_id))
            else:
                await self._handle(job)
        except JournalError as exc:
            log.error("job=%s cannot be journaled (%s); offered to other nodes", envelope.label, exc)
            await self._pass_on(job, exc)
        except Exception:
            # A bug in carod, not a problem with the job: do not answer for it
            # and do not ack; count it so that a job that always hits the bug
            # is eventually Held instead of looping.
            log.exception("job=%s internal error; the message goes back to the queue", envelope.label)
            self.metrics.job_state(JobState.ERROR, {})
            if mid is not None and live is None:  # the row is this job's (not another one's)
                with contextlib.suppress(JournalError):
                    await self.journal.count_failure(mid, reply_to=_reply_to(envelope))
            await delivery.settle(Settle.REQUEUE, label=envelope.label)
        finally:
            del self.jobs[key]
            if mid is not None and self.running.get(mid) is job:
                del self.running[mid]
            job.ticket.close()
            self.admission.done(delivery)

    async def _handle(self, job: Job) -> None:
        env = job.envelope
        self._state(job, JobState.RECEIVED, offers=env.offers, redelivered=job.delivery.redelivered)
        if env.reply_to_problem is not None:
            log.warning(
                "job=%s has an unusable reply_to %s: nobody can be told about it; dropped",
                env.label,
                env.reply_to_problem,
            )
            self.metrics.jobs_unanswered.inc()
            await job.delivery.settle(Settle.ACK, label=env.label)
            return
        if env.reply_to is None:
            log.warning("job=%s has no reply_to: nobody can be told about it; dropped", env.label)
            await job.delivery.settle(Settle.ACK, label=env.label)
            return
        if job.unreadable is not None:
            await self.answer.commit_final(job, self.answer.reply(job, Held(JobHeld(job.unreadable))).headers, b"")
            return
        if env.message_id is None:
            held = JobHeld("the job message has no message_id; carod needs one to identify the job")
            await self.answer.commit_final(job, self.answer.reply(job, Held(held)).headers, b"")
            return
        kept = self.holding.get(env.message_id)
        if kept is not None and kept.state == RELEASING:
            await self.holding.finish_release(env.message_id)  # released: its message came back before the row went
        elif kept is not None:
            await self._held_again(job, kept)
            return
        # Not a commit the job waits for: the row is committed with the job's start (or its answer).
        record, new = await self.journal.receive(env.message_id, str(env.reply_to))
        if not new and (await self.answer.reused_id(job, record) or await self.recovery.known(job, record)):
            return
        pending = self._pending(job)
        if pending is not None and pending.action == control.RM:
            await self.answer.conclude(job, Removed(pending.reason))
            return
        if pending is not None and pending.action == control.HOLD:
            job.end_with(Ending.HELD, pending.reason)
            await self._hold_now(job)
            return
        if env.delivery_limited:
            held = JobHeld(
                f"the broker gave up delivering the job: it reached the queue's delivery limit "
                f"([broker] delivery_limit = {self.config.broker.delivery_limit}) {env.delivery_limited} time(s), "
                "each delivery ending without an answer (nodes failed, were stopped, or handed it back)"
            )
            await self.answer.conclude(job, Held(held))
            return
        try:
            raw = classads.ad_from_headers(job.headers)
            jobad.set_owner(raw, env.owner)
            # Evaluated on this loop only when bounded; else reduced by the bounded evaluator first.
            ad = await self.evaluator.job_ad(raw, self.live_ad)
            jobad.apply_defaults(ad)
            spec = jobad.job_spec(ad)
        except JobHeld as held:
            await self.answer.conclude(job, Held(held))
            return
        job.kill_sig = spec.kill_sig
        request = Request.for_job(spec, self.config.node.default_request_memory_mib)
        set_requests(ad, request)
        job.ad = ad
        never = self._never_runs_here(ad, request)
        if never is not None:
            await self._decline(job, ad, never, request)
            return
        ready = self.admission.reserve_now(job.ticket, request, lambda: self._ready(ad, request))
        if not ready and not await self._wait_for_room(job, ad, request):
            return
        if job.removed is not None:  # carod rm while it was matched and admitted
            await self.answer.conclude(job, Removed(job.removed))
            return
        if job.held is not None:  # carod hold while it was matched and admitted
            await self._hold_now(job)
            return
        async with self.attempt.run(job, spec, request) as outcome:
            if isinstance(outcome, Held) and outcome.held.code is HoldCode.USER_REQUEST:  # carod hold while it ran
                await self._hold_now(job, outcome)
            else:
                await self.answer.conclude(job, outcome)

    # ------------------------------------------------------------ matching and room

    def disk_available(self) -> float | None:
        return None if self._disk_fixed else float(machine.disk_kib(self.config.node.sandbox_root))

    def live_ad(
        self, *, state: str = "Running", idle: bool = False, disk_available_kib: float | None = None
    ) -> classad2.ClassAd:
        """The machine ad with the node's live values written in (see machine.update).

        ``disk_available_kib``: the filesystem's free space when the caller already read it.
        """
        disk = self.disk_available() if disk_available_kib is None else disk_available_kib
        machine.update(self.machine_ad, self.resources, disk_available_kib=disk, state=state, idle=idle)
        return self.machine_ad

    def _never_runs_here(self, ad: classad2.ClassAd, request: Request) -> str | None:
        """Why the job would not run here even on an idle node (None: it could)."""
        too_big = self.resources.never_fits(request)
        if too_big is not None:
            return f"the job does not fit this machine ({too_big})"
        # As if idle: the totals are written, not what is free, so the filesystem need not be read (a statvfs).
        result = classads.match(ad, self.live_ad(idle=True, disk_available_kib=0.0))
        return None if result.ok else result.reason

    def _ready(self, ad: classad2.ClassAd, request: Request) -> bool:
        """The job fits what is free now and matches the live machine ad."""
        disk = self.disk_available()  # one statvfs for both checks
        return self.resources.fits(request, disk) and classads.match(ad, self.live_ad(disk_available_kib=disk)).ok

    def _sooner_elsewhere(self, job: Job, request: Request) -> list[str]:
        """Other nodes that advertise room for the job now and match it."""
        now = time.monotonic()
        if job.ad is None or not self._handed_back.may(job.message_id, job.envelope.deliveries, now):
            return []
        return self.pool.could_run_now(job.ad, request, now)

    async def _wait_for_room(self, job: Job, ad: classad2.ClassAd, request: Request) -> bool:
        """The job fits this machine but not what is free now: wait, unless another node could start it sooner."""
        others = self._sooner_elsewhere(job, request)
        if not others and not self.stopping.is_set():
            job.state = JobState.WAITING
            self._state(job, JobState.WAITING, note="for resources held by running jobs")
            if await self.admission.wait(job.ticket, request, lambda: self._ready(ad, request), job=job):
                return True
            others = self._sooner_elsewhere(job, request)
        if job.removed is not None:
            await self.answer.conclude(job, Removed(job.removed))
            return False
        if job.held is not None:
            await self._hold_now(job)
            return False
        self._handed_back.mark(job.message_id, time.monotonic())
        self._state(job, JobState.HANDED_BACK, to=",".join(others) or "the queue (node stopping)")
        await self.journal.forget(job.message_id)
        await job.delivery.settle(Settle.REQUEUE, label=job.envelope.label)
        return False

    def reconsider(self) -> None:
        """The pool changed: hand back waiting jobs another node can now start sooner."""
        for waiting in self.admission.waiting():
            job = waiting.job
            if isinstance(job, Job) and self._sooner_elsewhere(job, waiting.request):
                waiting.give_up()

    def job_infos(self) -> list[JobInfo]:
        """Running jobs, and the jobs held here (JobStatus 5)."""
        running = [job.info for job in self.jobs.values() if job.info is not None and job.process is not None]
        return running + self.holding.infos()

    async def _pass_on(self, job: Job, error: JournalError) -> None:
        """Give a job this node cannot record to another node; Held after max_offers."""
        offers = job.envelope.offers + 1
        limit = self.config.broker.max_offers
        if limit and offers >= limit:
            held = JobHeld(f"no node could record the job after {offers} offers (last, {self.name}: {error})")
            await self.answer.commit_final(job, self.answer.reply(job, Held(held)).headers, b"")
            return
        await self._park(job, offers)

    async def _park(self, job: Job, offers: int) -> bool:
        """Into the delay queue, to be offered again after unmatched_delay_s. False when it stays here."""
        env = job.envelope
        first = int(env.first_offer) if env.first_offer is not None else int(time.time())
        parking = Parking(self.broker.unmatched_queue_name, offers, first, self.config.broker.confirm_timeout_s)
        return await job.delivery.settle(Settle.PARK, label=env.label, parking=parking)

    # ------------------------------------------------------------ declining

    async def _decline(self, job: Job, ad: classad2.ClassAd, reason: str, request: Request) -> None:
        """Not for this node. Another node's advert matches it: pass it on. None does: count an offer, park it."""
        env, now = job.envelope, time.monotonic()
        elsewhere = self.pool.could_ever_run(ad, request, now)
        await self.journal.forget(job.message_id)
        over_s = time.time() - env.first_offer if env.first_offer is not None else 0.0
        if elsewhere and pool.may_pass(over_s, self.config.broker.max_pass_s):  # adverts may be forged
            if self._handed_back.may(job.message_id, env.deliveries, now):
                # Straight back to the queue, where a node that matches can take it now.
                self._handed_back.mark(job.message_id, now)
                self._state(job, JobState.PASSED, reason=reason, to=",".join(elsewhere))
                await job.delivery.settle(Settle.REQUEUE, label=env.label)
            elif await self._park(job, env.offers):
                # Bounced between nodes that do not match it: wait in the delay queue, not counted.
                self._state(job, JobState.DECLINED, reason=reason, offers=env.offers, waits_for=",".join(elsewhere))
            return
        offers = env.offers + 1
        limit = self.config.broker.max_offers
        if limit and offers >= limit:
            held = JobHeld(
                f"no execute node matched the job's Requirements after {offers} offers over {over_s:.0f} seconds "
                f"(Requirements = {classads.expr_text(ad, 'Requirements')}; last node {self.name}: {reason})"
                + pool.unclaimed(elsewhere, self.config.broker.max_pass_s),
                HoldCode.UNSPECIFIED,
            )
            await self.answer.conclude(job, Held(held))
            return
        if await self._park(job, offers):
            self._state(job, JobState.DECLINED, reason=reason, offers=offers)

    # ------------------------------------------------------------ removing (carod rm)

    def remove(self, message_id: str, reason: str, *, how: Ending = Ending.REMOVED) -> str | None:
        """Stop the job and answer it Removed (or Held, kept: ``how``). Returns what it was doing here;
        None when it is not here. (carod.node.actions checks who asked, and remembers it for a job not here.)"""
        job = self.running.get(message_id)
        if job is None:
            return None
        if job.state is JobState.EXITED:
            return "finished"  # its final reply is on its way
        job.end_with(how, reason)
        if job.process is not None:
            self.attempt.stop(job)
            return "running"
        for waiting in self.admission.waiting():
            if waiting.job is job:
                waiting.give_up()
                return "waiting"
        return "received"

    # ------------------------------------------------------------ holding (carod hold)

    def _pending(self, job: Job) -> Pending | None:
        """A carod rm or hold that came before the job (the newest) whose requester may act on the job."""
        for pending in self.removals.pendings(job.message_id, time.monotonic()):
            refused = None  # the node's own (a hold it could not finish): not checked
            if pending.requester is not None:
                refused = control.refusal(pending.requester, job.envelope.owner, self.config.node.admins)
            if refused is None:
                return pending
            log.warning("job=%s carod %s before it came here refused: %s", job.envelope.label, pending.action, refused)
        return None

    async def _hold_now(self, job: Job, outcome: Held | None = None) -> None:
        """carod hold: the job's message kept by the broker, then the Held reply and the ack (carod.node.holding)."""
        reason = job.held or "held"
        try:
            await self.holding.keep(job, reason)
        except BrokerError as exc:
            # Not held, not lost: back to the queue; the hold is remembered for when it comes back here.
            log.error("job=%s could not be held (%s); its message goes back to the queue", job.envelope.label, exc)
            self.removals.add(job.message_id, reason, time.monotonic(), action=control.HOLD, requester=None)
            await job.delivery.settle(Settle.REQUEUE, label=job.envelope.label)
            return
        self.admission.changed.set()  # advertised soon: carod q shows it held
        await self.answer.conclude(job, outcome or Held(JobHeld(reason, HoldCode.USER_REQUEST)))

    async def _held_again(self, job: Job, held: HeldJob) -> None:
        """A message of a job held here: never run; its copy kept again, answered as the journal says."""
        if held.reply_to != str(job.envelope.reply_to) or held.owner != job.envelope.owner:
            # Another job's message (another reply_to, or another broker user's): its copy would go into
            # this job's held queue as this job's, and run as its owner's when released.
            await self.answer.refuse_reused(job, None)
            return
        try:
            await self.holding.keep_copy(job, held)
        except BrokerError as exc:
            log.error("job=%s is held, and its copy could not be kept again (%s); requeued", job.envelope.label, exc)
            await job.delivery.settle(Settle.REQUEUE, label=job.envelope.label)
            return
        record, _new = await self.journal.receive(job.message_id, held.reply_to)
        if not await self.recovery.known(job, record):
            await self.answer.conclude(job, Held(JobHeld(held.reason, HoldCode.USER_REQUEST)))

    # ------------------------------------------------------------ draining

    def counts(self) -> tuple[int, int]:
        """(jobs with a running process, finished jobs waiting for a delivery to answer on)."""
        waiting = sum(1 for job in self.jobs.values() if job.delivery.waiting)
        running = sum(1 for job in self.jobs.values() if job.process is not None and not job.delivery.waiting)
        return running, waiting

    async def evict_all(self, reason: str) -> None:
        """Stop every running job with its KillSig; their messages go back to the queue."""
        stops = []
        for job in list(self.jobs.values()):
            if job.process is not None and job.ending is None:
                job.end_with(Ending.EVICTED, reason)
                stops.append(job.process.stop(job.kill_sig, self.config.node.kill_grace_s))
        if stops:
            await asyncio.gather(*stops)

    # ------------------------------------------------------------ log lines

    def _state(self, job: Job, state: JobState, **fields: object) -> None:
        log_state(job, state, self.metrics, info=None, **fields)


def _reply_to(envelope: Envelope) -> str | None:
    """The address a failed job's row is made with (None: no usable one, and no row is made)."""
    if envelope.reply_to is None or envelope.reply_to_problem is not None:
        return None
    return str(envelope.reply_to)
