"""The node's view of one job while it is handled here, and its log lines."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field

import aiormq
import classad2
from aio_pika.abc import AbstractIncomingMessage

from carod.node.admission import Ticket
from carod.sandbox.runner import JobProcess
from carod.wire import classads, jobad
from carod.wire.adverts import JobInfo
from carod.wire.jobad import Request
from carod.wire.message import Envelope

log = logging.getLogger("carod.job")


@dataclass
class Job:
    """The node's view of one job while it is handled here."""

    envelope: Envelope
    message: AbstractIncomingMessage
    #: its claim on the node's resources (carod.admission)
    ticket: Ticket
    received: float = field(default_factory=time.monotonic)
    sequence: int = 0
    run_count: int = 0
    process: JobProcess | None = None
    kill_sig: int = signal.SIGTERM
    evicted: str | None = None
    #: set by carod rm: the reason (the job is stopped and answered Removed)
    removed: str | None = None
    #: its process has ended (from here on it is answered as it ended, not removed)
    exited: bool = False
    redelivered: asyncio.Event = field(default_factory=asyncio.Event)
    #: finished, waiting for a live delivery to answer on
    waiting: bool = False
    ad: classad2.ClassAd | None = None
    info: JobInfo | None = None
    #: why nobody can ever be answered: the broker refused its reply address for good
    #: (carod.answer); the job is stopped, and settled without a reply
    unanswerable: str | None = None

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


def set_requests(ad: classad2.ClassAd, request: Request) -> None:
    """What the job reserves, in its ad, so Requirements and Start can use it (as condor_submit sets them)."""
    ad["RequestCpus"] = int(request.cpus) if request.cpus.is_integer() else request.cpus
    ad["RequestMemory"] = int(request.memory_mib) if request.memory_mib.is_integer() else request.memory_mib
    ad["RequestDisk"] = int(request.disk_kib) if request.disk_kib.is_integer() else request.disk_kib


def job_info(job: Job, spec: jobad.JobSpec, request: Request, started: float) -> JobInfo:
    owner = classads.evaluate(job.ad, "Owner") if job.ad is not None else None
    return JobInfo(
        message_id=job.message_id,
        owner=owner if isinstance(owner, str) else "",
        cmd=spec.cmd,
        started=started,
        cpus=request.cpus,
        memory_mib=request.memory_mib,
    )


#: A text field of a log line longer than this is cut (it may be job-chosen text, e.g. a HoldReason).
_LOG_TEXT_CHARS = 2000


def _short(value: object) -> object:
    if isinstance(value, str) and len(value) > _LOG_TEXT_CHARS:
        return f"{value[:_LOG_TEXT_CHARS]} ... [truncated, {len(value) - _LOG_TEXT_CHARS} characters]"
    return value


def log_state(env: Envelope, state: str, job: Job, **fields: object) -> None:
    fields = {k: _short(v) for k, v in fields.items()}
    extra = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in fields.items())
    elapsed = job.elapsed_s()
    log.info(
        "job=%s state=%s elapsed_s=%.6f %s",
        env.label,
        state,
        elapsed,
        extra,
        extra={"message_id": env.label, "job_state": state, "elapsed_s": round(elapsed, 6), "fields": fields},
    )
