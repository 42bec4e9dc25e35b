"""How one job ends on this node: one :data:`Outcome`, turned into its reply by :func:`reply_for`.

Pure: no I/O. The attempt (carod.node.attempt) and the node's early checks
(carod.node.arrival) return an outcome; carod.node.answer.Answerer.conclude
logs it, journals and sends its reply. Every way a job can end is one of
these classes, so a new one cannot be answered in only some places.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from carod.errors import JobHeld
from carod.sandbox.results import Results
from carod.wire import replies
from carod.wire.replies import ExitInfo


@dataclass(frozen=True)
class Exited:
    """The process ended by itself and its results are zipped at ``result_zip``: answered Exited (JobStatus 4)."""

    info: ExitInfo
    result_zip: Path
    results: Results


@dataclass(frozen=True)
class Held:
    """The job cannot run or finish (``held.reason`` says why): answered Held (JobStatus 5)."""

    held: JobHeld
    info: ExitInfo | None = None


@dataclass(frozen=True)
class Removed:
    """carod rm: answered Removed (JobStatus 3)."""

    reason: str
    info: ExitInfo | None = None


@dataclass(frozen=True)
class Evicted:
    """The node stopped it (it is stopping): an Idle update, and the message goes back to the queue."""

    reason: str
    info: ExitInfo


Outcome = Exited | Held | Removed | Evicted


def reply_for(outcome: Outcome, *, sequence: int, node: str, now: float, run_count: int) -> replies.Reply:
    """The reply that tells the submitter how the job ended (an Idle update for an eviction)."""
    match outcome:
        case Exited(info, result_zip, results):
            return replies.exited(
                sequence=sequence,
                node=node,
                now=now,
                info=info,
                body_path=result_zip,
                run_count=run_count,
                skipped=results.skipped,
            )
        case Held(held, info):
            return replies.held(
                sequence=sequence,
                node=node,
                now=now,
                reason=held.reason,
                code=held.code,
                subcode=held.subcode,
                info=info,
                run_count=run_count,
            )
        case Removed(reason, info):
            return replies.removed(sequence=sequence, node=node, now=now, reason=reason, info=info, run_count=run_count)
        case Evicted(reason, _info):
            return replies.idle(sequence=sequence, node=node, now=now, reason=reason, run_count=run_count)
