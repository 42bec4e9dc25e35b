"""What the journal remembers: clean-up after a crash, and redeliveries of jobs it knows.

At start (:meth:`Recovery.recover`), before any job is taken: kill what
jobs of an earlier carod left running, mark their rows interrupted, remove
leftover sandboxes and result files nobody will send. While running
(:meth:`Recovery.known`): a redelivered ``message_id`` the journal knows is
answered from it: already answered -> acknowledged (a message that is not a
redelivery gets the final reply again, or a Held reply saying the id was
already answered: carod.node.answer.Answerer.answer_again); finished but not yet
answered -> its stored final reply is sent; interrupted -> cleaned up and
run again as a new attempt (``JobRunCount``), up to ``[node] max_attempts``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from carod.config import Config
from carod.edges.delivery import Settle
from carod.edges.journal import Journal
from carod.edges.metrics import Metrics
from carod.edges.records import JobRecord
from carod.errors import EXIT_SOFTWARE, JobHeld, StartupError
from carod.holdcodes import HoldCode
from carod.node.answer import Answerer
from carod.node.evaluator import Evaluator, EvaluatorError
from carod.node.job import Job, log_state
from carod.node.outcome import Held
from carod.node.removals import Removals
from carod.sandbox import workdir
from carod.sandbox.execute import Executor
from carod.states import JobState
from carod.wire import chirp

log = logging.getLogger("carod.job")


class Recovery:
    def __init__(
        self,
        config: Config,
        executor: Executor,
        journal: Journal,
        answer: Answerer,
        removals: Removals,
        evaluator: Evaluator,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.executor = executor
        self.journal = journal
        self.answer = answer
        self.removals = removals
        self.evaluator = evaluator
        self.metrics = metrics

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
            await self.clean_interrupted(record)
            await self.journal.set_state(record.message_id, JobState.INTERRUPTED)
        root = self.config.node.sandbox_root
        stale = await asyncio.to_thread(lambda: [p for p in root.iterdir()] if root.exists() else [])
        for path in stale:  # nothing runs yet: every sandbox left is an orphan
            await asyncio.to_thread(workdir.remove, path)
        await self.expire()
        keep = await self.journal.pending_files()
        results_dir = self.executor.results_dir
        orphans = await asyncio.to_thread(lambda: [p for p in results_dir.iterdir() if str(p) not in keep])
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
        """Forget removals and journal rows older than ``[node] journal_retention_s`` (and their result files)."""
        self.removals.expire(time.monotonic())
        for path in await self.journal.expire(self.config.node.journal_retention_s):
            await asyncio.to_thread(Path(path).unlink, missing_ok=True)

    async def clean_interrupted(self, record: JobRecord) -> None:
        if await self.executor.clean_interrupted(record.pid, record.pid_start, record.sandbox):
            log.warning("job=%s killed the processes left from its interrupted run", record.message_id)

    async def known(self, job: Job, record: JobRecord) -> bool:
        """A redelivery of a job the journal knows. True when it is fully handled."""
        env = job.envelope
        job.sequence = max(record.sequence, env.sequence)
        job.run_count = record.attempts + env.runs
        if record.chirped and len(record.chirped) <= chirp.MAX_ATTRS:  # the job's ad keeps them across its runs
            job.chirped = dict(record.chirped)
        if record.state == JobState.REPLIED:
            if not job.delivery.redelivered:  # a new message with the id: answered, never silence
                await self.answer.answer_again(job, record)
                return True
            log_state(job, JobState.DUPLICATE, self.metrics, note="already answered; acknowledged")
            await job.delivery.settle(Settle.ACK, label=env.label)
            return True
        if record.state == JobState.FINISHED:
            entry = await self.journal.pending_final(record.message_id)
            if entry is not None:
                log_state(
                    job, JobState.RESEND, self.metrics, note="finished here before; sending its stored final reply"
                )
                await self.answer.resend_final(job, entry)
            else:
                await job.delivery.settle(Settle.ACK, label=env.label)
            return True
        if record.state in (JobState.RUNNING, JobState.INTERRUPTED):
            await self.clean_interrupted(record)
            log_state(job, JobState.INTERRUPTED, self.metrics, attempts=record.attempts)
        limit = self.config.node.max_attempts
        if record.attempts >= limit:
            held = JobHeld(
                f"the job was started {record.attempts} times on node {self.config.node_name} and never finished "
                f"(the node or carod stopped while it ran); giving up after [node] max_attempts = {limit}",
                HoldCode.UNSPECIFIED,
            )
            await self.answer.conclude(job, Held(held))
            return True
        return False
