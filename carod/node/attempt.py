"""One attempt at running a job: sandbox -> start -> watch -> results, ending in one :data:`Outcome`.

:meth:`Attempt.run` never answers the job; it says how the attempt ended
and the caller answers that (carod.node.answer.Answerer.conclude). Used as
``async with attempt.run(job, spec, request) as outcome``: the sandbox, the
job user and the job's resources are given back when the block ends, and
for an Exited job already while its answer goes out (its results are safe
in the state directory by then), so the reply never waits for a sandbox's
removal. A forced exit (the task cancelled) still ends the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from carod.config import Config
from carod.edges.journal import Journal
from carod.edges.metrics import Metrics
from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.node.answer import Answerer
from carod.node.chirp import ChirpServer, JobChirp
from carod.node.job import Ending, Job, job_info, log_state, wants_chirp
from carod.node.outcome import Evicted, Exited, Held, Outcome, Removed
from carod.node.progress import Progress
from carod.sandbox.execute import Executor, Run
from carod.sandbox.procfs import process_start_time
from carod.states import JobState
from carod.wire import jobad, replies
from carod.wire.jobad import Request


class Attempt:
    """Runs attempts of jobs on this node's executor."""

    def __init__(
        self, config: Config, executor: Executor, journal: Journal, answer: Answerer, metrics: Metrics
    ) -> None:
        self.config = config
        self.executor = executor
        self.journal = journal
        self.answer = answer
        self.metrics = metrics
        self._stops: set[asyncio.Task[replies.ExitInfo]] = set()
        #: called when what the node advertises about a job changed (a chirped attribute)
        self.advertise: Callable[[], None] = lambda: None

    @contextlib.asynccontextmanager
    async def run(self, job: Job, spec: jobad.JobSpec, request: Request) -> AsyncIterator[Outcome]:
        """Run the job once; the block gets its outcome. The run is cleaned up when the block ends."""
        run = await self.executor.begin()
        cleanup: asyncio.Task[None] | None = None
        try:
            outcome = await self._attempt(job, spec, request, run)
            if isinstance(outcome, Exited):
                # The job is over and its results are safe: free its sandbox, user and
                # resources while the final reply goes out, not after it (it may wait
                # for a redelivery).
                cleanup = asyncio.create_task(self._end(job, run))
            else:
                await self._end(job, run)
            yield outcome
        finally:
            self.answer.drop_updates(job)  # answered by now, or its handling failed
            if cleanup is not None:
                await cleanup
            else:
                # Again only when the attempt raised or was cancelled (a forced exit):
                # the job dies with it and the broker requeues it.
                await self._end(job, run)

    async def _attempt(self, job: Job, spec: jobad.JobSpec, request: Request, run: Run) -> Outcome:
        try:
            box = await self.executor.create_box(run, job.message_id)
        except JobHeld as held:
            return Held(held)
        # The job's one journal commit before it runs: its row (made here if new), the run counted, and
        # the Sequence of its Running reply, which is published before its own row is committed.
        # A released job (carod release) goes on counting from its runs before the hold.
        job.run_count = job.envelope.runs + await self.journal.start_attempt(
            job.message_id, str(box), reply_to=str(job.envelope.reply_to), sequence=job.sequence + 1
        )
        server: ChirpServer | None = None
        if wants_chirp(job):
            try:
                server = await self._chirp(job, run)
            except JobHeld as held:
                return Held(held)
        try:
            return await self._run(job, spec, request, run, server)
        finally:
            if server is not None:
                await server.close()

    async def _chirp(self, job: Job, run: Run) -> ChirpServer:
        """The job's chirp tools and socket (carod.node.chirp), before it starts. Raises JobHeld."""
        path = await self.executor.chirp(run)
        chirps = JobChirp(job, self.journal, self.answer, self.config.node_name, lambda: self.advertise())
        server = ChirpServer(
            path,
            run.user.uid if run.user.switch else None,
            on_set=chirps.set,
            on_get=chirps.get,
            label=job.envelope.label,
        )
        try:
            await server.start()
        except OSError as exc:
            raise JobHeld(
                f"carod could not open the job's chirp socket: {exc.strerror}",
                HoldCode.FAILED_TO_CREATE_PROCESS,
                exc.errno or 0,
            ) from exc
        return server

    async def _run(
        self, job: Job, spec: jobad.JobSpec, request: Request, run: Run, server: ChirpServer | None
    ) -> Outcome:
        """Start the job in its sandbox, watch it, collect its results."""
        try:
            process = await self.executor.start(run, spec, job.body, request)
        except JobHeld as held:
            return Held(held)
        job.info = job_info(job, spec, request, process.start_time)
        job.started = process.start_time
        job.process = process
        job.state = JobState.RUNNING
        await self.journal.set_pid(job.message_id, process.pid, process_start_time(process.pid))  # not waited for
        log_state(
            job,
            JobState.RUNNING,
            self.metrics,
            pid=process.pid,
            user=run.user.name,
            run=job.run_count,
            start_latency_s=round(job.elapsed_s(), 6),
        )
        running = replies.running(
            sequence=job.next_sequence(),
            node=self.config.node_name,
            now=time.time(),
            start_date=process.start_time,
            pid=process.pid,
            run_count=job.run_count,
        )
        running = replies.with_attrs(running, job.chirped)  # what an earlier run chirped (carod.node.recovery)
        update = self.answer.send_soon(job, running)  # the job goes on; its final reply waits for this one
        if server is not None:  # its chirps now: their updates come after Running
            server.ready.set()
        if update is not None:
            update.add_done_callback(lambda _: self._stop_unanswerable(job))
        if job.removed is not None or job.held is not None or job.unanswerable is not None:  # rm, hold, nobody
            self.stop(job)
        progress = Progress.for_job(self.config, job, process, run.streams, self.answer)
        try:
            info, exceeded = await self.executor.watch(run, job.kill_sig)
            job.state = JobState.EXITED
            await progress.finish()
        finally:
            progress.cancel()
        if job.ending is not None:
            how, reason = job.ending
            if how is Ending.HELD:
                return Held(JobHeld(reason, HoldCode.USER_REQUEST), info)
            return Removed(reason, info) if how is Ending.REMOVED else Evicted(reason, info)
        if exceeded is not None:
            return Held(exceeded, info)
        try:
            result_zip, results = await self.executor.collect(run, spec)
        except JobHeld as held:
            return Held(held, info)
        return Exited(info, result_zip, results)

    def _stop_unanswerable(self, job: Job) -> None:
        """The broker refused the job's reply address for good while it runs: stop it (nobody can be told)."""
        if job.unanswerable is not None and job.state is JobState.RUNNING:
            self.stop(job)

    def stop(self, job: Job) -> None:
        """Stop the job's process with its KillSig (SIGKILL after kill_grace_s), without waiting."""
        if job.process is None:
            return
        stop = asyncio.create_task(job.process.stop(job.kill_sig, self.config.node.kill_grace_s))
        self._stops.add(stop)
        stop.add_done_callback(self._stops.discard)

    async def _end(self, job: Job, run: Run) -> None:
        """The run is over: clean it up, then free its resources for the next job. Idempotent."""
        await self.executor.end(run)
        job.info = None
        job.ticket.release()
