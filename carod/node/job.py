"""The node's view of one job while it is handled here, and its log lines."""

from __future__ import annotations

import enum
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import classad2

from carod.edges.delivery import Delivery
from carod.edges.metrics import Metrics
from carod.node.admission import Ticket
from carod.sandbox.runner import JobProcess
from carod.states import JobState
from carod.wire import classads, jobad
from carod.wire.adverts import JobInfo
from carod.wire.jobad import Request
from carod.wire.message import Envelope
from carod.wire.replies import ExitInfo

log = logging.getLogger("carod.job")


class Ending(enum.Enum):
    """Why a running job is being stopped before its process ends by itself."""

    #: carod rm: answered Removed
    REMOVED = "removed"
    #: carod hold: answered Held, its message kept by the broker (carod.node.holding)
    HELD = "held"
    #: the node is stopping: handed back to the queue
    EVICTED = "evicted"


@dataclass
class Job:
    """The node's view of one job while it is handled here."""

    envelope: Envelope
    delivery: Delivery
    #: its claim on the node's resources (carod.node.admission)
    ticket: Ticket
    received: float = field(default_factory=time.monotonic)
    #: where it is here: RECEIVED (matching) -> WAITING (for resources) -> RUNNING (its process) -> EXITED
    #: (its process ended; being answered)
    state: JobState = JobState.RECEIVED
    #: asked to stop (carod rm, or the node stopping), and why: (how it ends, the reason)
    ending: tuple[Ending, str] | None = None
    sequence: int = 0
    run_count: int = 0
    process: JobProcess | None = None
    #: when its process started (Unix time; 0: it has not run here), and its QDate (0: unknown)
    started: float = 0.0
    submitted: float = 0.0
    kill_sig: int = signal.SIGTERM
    ad: classad2.ClassAd | None = None
    info: JobInfo | None = None
    #: the job ad's headers and the input body, as the submitter sent them (an AMQP 1.0 message unpacked)
    headers: Mapping[str, object] = field(default_factory=dict)
    body: bytes = b""
    #: why the message cannot be read (an AMQP 1.0 section that does not decode): answered Held
    unreadable: str | None = None
    #: attributes the job chirped (condor_chirp set_job_attr): name -> ClassAd text, in the order first set
    chirped: dict[str, str] = field(default_factory=dict)
    #: why nobody can ever be answered: the broker refused its reply address for good
    #: (carod.node.answer); the job is stopped, and settled without a reply
    unanswerable: str | None = None

    @property
    def message_id(self) -> str:
        return self.envelope.message_id or ""

    @property
    def removed(self) -> str | None:
        """The reason of a carod rm, if one came."""
        return self.ending[1] if self.ending is not None and self.ending[0] is Ending.REMOVED else None

    @property
    def held(self) -> str | None:
        """The reason of a carod hold, if one came (and no removal after it)."""
        return self.ending[1] if self.ending is not None and self.ending[0] is Ending.HELD else None

    def end_with(self, how: Ending, reason: str) -> None:
        """Ask the job to end: the first request wins, except that a removal always does (it is answered),
        and a hold wins over an eviction (it is answered, and kept)."""
        if self.ending is None or how is Ending.REMOVED or (how is Ending.HELD and self.ending[0] is Ending.EVICTED):
            self.ending = (how, reason)

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence

    def elapsed_s(self) -> float:
        return time.monotonic() - self.received


def wants_chirp(job: Job) -> bool:
    """``WantIOProxy = TRUE`` in the job's ad (HTCondor's want_io_proxy): it gets condor_chirp."""
    return job.ad is not None and classads.is_true(classads.evaluate(job.ad, "WantIOProxy"))


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
        attrs={**job.chirped, "OwnerVerified": "true" if job.envelope.owner is not None else "false"},
    )


#: A text field of a log line longer than this is cut (it may be job-chosen text, e.g. a HoldReason).
_LOG_TEXT_CHARS = 2000


def _short(value: object) -> object:
    if isinstance(value, str) and len(value) > _LOG_TEXT_CHARS:
        return f"{value[:_LOG_TEXT_CHARS]} ... [truncated, {len(value) - _LOG_TEXT_CHARS} characters]"
    return value


def log_state(job: Job, state: JobState, metrics: Metrics, *, info: ExitInfo | None = None, **fields: object) -> None:
    """One job state change: its log line and its metrics (with how long it ran, when it did)."""
    if info is not None:
        fields["duration_s"] = round(info.duration_s, 6)
    if log.isEnabledFor(logging.INFO):  # the line is built only when it is written (bench runs at WARNING)
        fields = {k: _short(v) for k, v in fields.items()}
        extra = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in fields.items())
        elapsed = job.elapsed_s()
        label = job.envelope.label
        log.info(
            "job=%s state=%s elapsed_s=%.6f %s",
            label,
            state.value,
            elapsed,
            extra,
            extra={"message_id": label, "job_state": state.value, "elapsed_s": round(elapsed, 6), "fields": fields},
        )
    metrics.job_state(state, fields)
