"""One job's path through the node: message -> job ad -> match -> sandbox -> run -> reply.

:meth:`Node.handle` owns a delivery from the moment it arrives until it is
settled. Every step is written to the journal first (docs/reliability.md):

* a reply is recorded in the journal's outbox, then published, then marked
  confirmed when the broker confirms it (carod.answer);
* what may run at once is decided by carod.admission: a job that does not
  fit what is free waits, unless another node could start it sooner;
  a job that would never run here is declined to the delay queue;
* a redelivered ``message_id`` is recognised: still running here -> the new
  delivery is adopted; answered -> acknowledged; finished but not yet
  answered -> the stored final reply is sent; interrupted -> run again as a
  new attempt (``JobRunCount``), up to ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import classad2
from aio_pika.abc import AbstractIncomingMessage

from carod.config import Config
from carod.edges.broker import Broker, park, settle
from carod.edges.journal import (
    FINISHED,
    INTERRUPTED,
    RECEIVED,
    REPLIED,
    RUNNING,
    JobRecord,
    Journal,
    JournalError,
)
from carod.edges.metrics import Metrics
from carod.errors import EXIT_SOFTWARE, BrokerError, JobHeld, StartupError
from carod.holdcodes import HoldCode
from carod.node import machine, pool
from carod.node.admission import Admission
from carod.node.answer import Answerer
from carod.node.evaluator import Evaluator, EvaluatorError
from carod.node.job import Job, job_info, log_state, set_requests
from carod.node.pool import HandBacks, PoolView
from carod.node.progress import Progress
from carod.node.removals import Removals
from carod.sandbox import results
from carod.sandbox import workdir as sandbox
from carod.sandbox.execute import Executor, Run
from carod.sandbox.procfs import process_start_time
from carod.wire import classads, jobad, replies
from carod.wire.adverts import JobInfo
from carod.wire.jobad import Request
from carod.wire.message import parse_envelope

log = logging.getLogger("carod.job")


class Node:
    """Runs jobs. What runs at once is decided in one place: :class:`~carod.admission.Admission`."""

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
        self.results_dir = executor.results_dir
        self.jobs: dict[int, Job] = {}
        self.running: dict[str, Job] = {}
        #: set when the node shuts down: answers waiting for a redelivery stay in the journal
        self.stopping = asyncio.Event()
        self.answer = Answerer(config, broker, journal, self.running, self.stopping, metrics)
        self._handed_back = HandBacks()
        #: carod rm of jobs that may reach this node later
        self.removals = Removals(config.node.max_removals, config.node.journal_retention_s)
        self.evaluator = Evaluator.for_node(config, metrics)
        self._stops: set[asyncio.Task[replies.ExitInfo]] = set()
        self._disk_fixed = machine.disk_is_fixed(config)
        admission.disk_available = self.disk_available

    # ------------------------------------------------------------ start-up

    async def recover(self) -> None:
        """Before consuming: clean up after a crash, as the journal tells it; start the ClassAd evaluator."""
        try:
            await self.evaluator.start()
        except EvaluatorError as exc:
            raise StartupError(str(exc), EXIT_SOFTWARE) from exc
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
        self.removals.expire(time.monotonic())
        for path in await self.journal.expire(self.config.node.journal_retention_s):
            await asyncio.to_thread(Path(path).unlink, missing_ok=True)

    # ------------------------------------------------------------ entry point

    async def handle(self, message: AbstractIncomingMessage) -> None:
        envelope = parse_envelope(
            message.message_id, message.reply_to, message.headers or {}, queue=self.config.broker.queue
        )
        mid = envelope.message_id
        if mid is not None and (live := self.running.get(mid)) is not None:
            if live.delivery_live() or live.envelope.reply_to != envelope.reply_to:
                # A second message with the same message_id while the first is still held, or
                # one with another reply_to: a duplicate, answered by nobody (docs/protocol.md).
                log.warning("job=%s state=duplicate: the same message_id is already running here; acknowledged", mid)
                self.admission.hold(message)
                await settle(message, "ack", label=mid)
                self.admission.done(message)
                return
            self.admission.hold(message)  # held by the running job from now on
            live.adopt(message)
            log.info("job=%s state=adopted: redelivered while it runs here; the new delivery replaces the old", mid)
            return
        job = Job(envelope, message, self.admission.arrive(message))
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
            self.metrics.job_state("error", {})
            if mid is not None:
                with contextlib.suppress(JournalError):
                    await self.journal.count_failure(mid)
            await settle(job.message, "requeue", label=envelope.label)
        finally:
            del self.jobs[key]
            if mid is not None and self.running.get(mid) is job:
                del self.running[mid]
            job.ticket.close()
            self.admission.done(message)
            self.admission.done(job.message)

    async def _handle(self, job: Job) -> None:
        env = job.envelope
        self._state(job, "received", offers=env.offers, redelivered=job.message.redelivered)
        if env.reply_to is None:
            log.warning("job=%s has no reply_to: nobody can be told about it; dropped", env.label)
            await settle(job.message, "ack", label=env.label)
            return
        if env.message_id is None:
            held = JobHeld("the job message has no message_id; carod needs one to identify the job")
            await self.answer.commit_final(job, self._held(job, held).headers, b"")
            return
        record, new = await self.journal.receive(env.message_id, str(env.reply_to))
        if not new and (await self.answer.reused_id(job, record.reply_to) or await self._known(job, record)):
            return
        removal = self.removals.get(env.message_id, time.monotonic())
        if removal is not None:
            await self.answer.final(job, self._removed(job, removal))
            return
        if env.delivery_limited:
            held = JobHeld(
                f"the broker gave up delivering the job: it reached the queue's delivery limit "
                f"([broker] delivery_limit = {self.config.broker.delivery_limit}) {env.delivery_limited} time(s), "
                "each delivery ending without an answer (nodes failed, were stopped, or handed it back)"
            )
            await self.answer.final(job, self._held(job, held))
            return
        try:
            # Evaluated on this loop only when bounded; else reduced by the bounded evaluator first.
            ad = await self.evaluator.job_ad(classads.ad_from_headers(job.message.headers or {}), self.live_ad)
            jobad.apply_defaults(ad)
            spec = jobad.job_spec(ad)
        except JobHeld as held:
            await self.answer.final(job, self._held(job, held))
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
            await self.answer.final(job, self._removed(job, job.removed))
            return
        await self._run(job, spec, request)

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
        result = classads.match(ad, self.live_ad(idle=True))
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
            self._state(job, "waiting", note="for resources held by running jobs")
            if await self.admission.wait(job.ticket, request, lambda: self._ready(ad, request), job=job):
                return True
            others = self._sooner_elsewhere(job, request)
        if job.removed is not None:
            await self.answer.final(job, self._removed(job, job.removed))
            return False
        self._handed_back.mark(job.message_id, time.monotonic())
        self._state(job, "handed-back", to=",".join(others) or "the queue (node stopping)")
        await self.journal.forget(job.message_id)
        await settle(job.message, "requeue", label=job.envelope.label)
        return False

    def reconsider(self) -> None:
        """The pool changed: hand back waiting jobs another node can now start sooner."""
        for waiting in self.admission.waiting():
            job = waiting.job
            if isinstance(job, Job) and self._sooner_elsewhere(job, waiting.request):
                waiting.give_up()

    def job_infos(self) -> list[JobInfo]:
        return [job.info for job in self.jobs.values() if job.info is not None and job.process is not None]

    async def _known(self, job: Job, record: JobRecord) -> bool:
        """A redelivery of a job the journal knows. True when it is fully handled."""
        env = job.envelope
        job.sequence = record.sequence
        job.run_count = record.attempts
        if record.state == REPLIED:
            self._state(job, "duplicate", note="already answered; acknowledged")
            await settle(job.message, "ack", label=env.label)
            return True
        if record.state == FINISHED:
            entry = await self.journal.pending_final(record.message_id)
            if entry is not None:
                self._state(job, "resend", note="finished here before; sending its stored final reply")
                await self.answer.resend_final(job, entry)
            else:
                await settle(job.message, "ack", label=env.label)
            return True
        if record.state in (RUNNING, INTERRUPTED):
            await self._clean_interrupted(record)
            self._state(job, "interrupted", attempts=record.attempts)
        limit = self.config.node.max_attempts
        if record.attempts >= limit:
            held = JobHeld(
                f"the job was started {record.attempts} times on node {self.name} and never finished "
                f"(the node or carod stopped while it ran); giving up after [node] max_attempts = {limit}",
                HoldCode.UNSPECIFIED,
            )
            await self.answer.final(job, self._held(job, held))
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
            await self.answer.commit_final(job, self._held(job, held).headers, b"")
            return
        await self._park(job, offers)

    async def _park(self, job: Job, offers: int) -> bool:
        """Into the delay queue, to be offered again after unmatched_delay_s. False when it stays here."""
        env = job.envelope
        first = int(env.first_offer) if env.first_offer is not None else int(time.time())
        try:
            await park(
                job.message,
                self.broker.unmatched_queue_name,
                offers=offers,
                first_offer=first,
                timeout_s=self.config.broker.confirm_timeout_s,
            )
        except BrokerError as exc:
            log.warning("job=%s could not be parked for another node (%s); it will be redelivered", env.label, exc)
            return False
        return True

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
                self._state(job, "passed", reason=reason, to=",".join(elsewhere))
                await settle(job.message, "requeue", label=env.label)
            elif await self._park(job, env.offers):
                # Bounced between nodes that do not match it: wait in the delay queue, not counted.
                self._state(job, "declined", reason=reason, offers=env.offers, waits_for=",".join(elsewhere))
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
            await self.answer.final(job, self._held(job, held))
            return
        if await self._park(job, offers):
            self._state(job, "declined", reason=reason, offers=offers)

    # ------------------------------------------------------------ running

    async def _run(self, job: Job, spec: jobad.JobSpec, request: Request) -> None:
        run = await self.executor.begin()
        try:
            try:
                box = await self.executor.create_box(run, job.message_id)
            except JobHeld as held:
                await self._end(job, run)
                await self.answer.final(job, self._held(job, held))
                return
            job.run_count = await self.journal.start_attempt(job.message_id, str(box))
            try:
                process = await self.executor.start(run, spec, job.message.body, request)
            except JobHeld as held:
                await self._end(job, run)
                await self.answer.final(job, self._held(job, held))
                return
            job.info = job_info(job, spec, request, process.start_time)
            job.process = process
            await self.journal.set_pid(job.message_id, process.pid, process_start_time(process.pid))
            self._state(
                job,
                "running",
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
            await self.answer.send(job, running)
            if job.removed is not None or job.unanswerable is not None:  # carod rm, or nobody to answer
                self._stop(job)
            progress = Progress.for_job(self.config, job, process, run.streams, self.answer)
            try:
                info, exceeded = await self.executor.watch(run, job.kill_sig)
                job.exited = True
                await progress.finish()
            finally:
                progress.cancel()
            if job.removed is not None:
                await self._end(job, run)
                await self.answer.final(job, self._removed(job, job.removed, info=info))
                return
            if job.evicted is not None:
                await self._end(job, run)
                await self._evicted(job, info)
                return
            if exceeded is not None:
                await self._end(job, run)
                await self.answer.final(job, self._held(job, exceeded, info=info))
                return
            await self._finish(job, spec, run, info)
        finally:
            # With a live process only when the task was cancelled (forced
            # exit): the job dies with it and the broker requeues it.
            await self._end(job, run)

    # ------------------------------------------------------------ removing (carod rm)

    def remove(self, message_id: str, reason: str) -> str | None:
        """Stop the job and answer it Removed. Returns what it was doing here; None when it is not here.

        Remembered (``journal_retention_s``, at most ``max_removals``) either
        way: a job still in the queue is answered Removed when it reaches this node.
        """
        self.removals.add(message_id, reason, time.monotonic())  # forgotten by expire()
        job = self.running.get(message_id)
        if job is None:
            return None
        if job.exited:
            return "finished"  # its final reply is on its way
        job.removed = reason
        if job.process is not None:
            self._stop(job)
            return "running"
        for waiting in self.admission.waiting():
            if waiting.job is job:
                waiting.give_up()
                return "waiting"
        return "received"

    def _stop(self, job: Job) -> None:
        if job.process is None:
            return
        stop = asyncio.create_task(job.process.stop(job.kill_sig, self.config.node.kill_grace_s))
        self._stops.add(stop)
        stop.add_done_callback(self._stops.discard)

    def _removed(self, job: Job, reason: str, *, info: replies.ExitInfo | None = None) -> replies.Reply:
        self._state(job, "removed", reason=reason, info=info)
        return replies.removed(
            sequence=job.next_sequence(),
            node=self.name,
            now=time.time(),
            reason=reason,
            info=info,
            run_count=job.run_count,
        )

    async def _end(self, job: Job, run: Run) -> None:
        """The run is over: clean it up, then free its resources for the next job."""
        await self.executor.end(run)
        job.info = None
        job.ticket.release()

    async def _finish(self, job: Job, spec: jobad.JobSpec, run: Run, info: replies.ExitInfo) -> None:
        try:
            result_zip, results = await self.executor.collect(run, spec)
        except JobHeld as held:
            await self._end(job, run)
            await self.answer.final(job, self._held(job, held, info=info))
            return
        # The job is over and its results are safe: free its sandbox, user and
        # resources while the final reply goes out, not after it (it may wait
        # for a redelivery); the reply does not wait for the sandbox's removal.
        cleanup = asyncio.create_task(self._end(job, run))
        try:
            await self._answer_exited(job, info, result_zip, results)
        finally:
            await cleanup

    async def _answer_exited(
        self, job: Job, info: replies.ExitInfo, result_zip: Path, results: results.Results
    ) -> None:
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
        self._state(
            job,
            "exited",
            exit_code=info.exit_code,
            exit_signal=info.exit_signal,
            duration_s=round(info.duration_s, 6),
            result_bytes=results.bytes,
        )
        await self.answer.final(job, reply)

    async def _evicted(self, job: Job, info: replies.ExitInfo) -> None:
        reason = job.evicted or "evicted"
        reply = replies.idle(
            sequence=job.next_sequence(), node=self.name, now=time.time(), reason=reason, run_count=job.run_count
        )
        self._state(job, "evicted", reason=reason, info=info)
        await self.answer.send(job, reply)
        # Not an interruption: the next delivery runs it afresh.
        await self.journal.set_state(job.message_id, RECEIVED)
        await settle(job.message, "requeue", label=job.envelope.label)

    # ------------------------------------------------------------ replies

    def _state(self, job: Job, state: str, *, info: replies.ExitInfo | None = None, **fields: object) -> None:
        """One job state change: its log line and its metrics (with how long it ran, when it did)."""
        if info is not None:
            fields["duration_s"] = round(info.duration_s, 6)
        log_state(job.envelope, state, job, **fields)
        self.metrics.job_state(state, fields)

    def _held(self, job: Job, held: JobHeld, *, info: replies.ExitInfo | None = None) -> replies.Reply:
        self._state(job, "held", code=int(held.code), reason=held.reason, info=info)
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
