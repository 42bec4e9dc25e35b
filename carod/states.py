"""The one vocabulary of job states: the journal's rows, the log lines' ``state=`` and the metrics' counters.

A log line's ``job_state`` (docs/operations.md, "Logs") is one of these
values; the journal stores the five that outlive a restart
(:data:`JOURNALED`); carod.edges.metrics counts each state it names. A new
state is added here or nowhere, so a typo cannot silently drop a metric.
"""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    #: the message arrived (journaled: recorded, not yet started)
    RECEIVED = "received"
    #: fits the machine, not what is free now: waits for resources here
    WAITING = "waiting"
    #: its process started (journaled: a restart finds it interrupted)
    RUNNING = "running"
    #: its process ended and its results are zipped: answered Exited
    EXITED = "exited"
    #: answered Held (HoldReason says why)
    HELD = "held"
    #: answered Removed (carod rm)
    REMOVED = "removed"
    #: stopped because the node is stopping; the message goes back to the queue
    EVICTED = "evicted"
    #: given back to the queue for a node with room now
    HANDED_BACK = "handed-back"
    #: does not match here but another node's advert matches: back to the queue
    PASSED = "passed"
    #: does not match here: parked in the delay queue, offered again later
    DECLINED = "declined"
    #: a second message with a message_id running here, or a redelivery of one already answered: acknowledged;
    #: a new message (not redelivered) with an id already answered: answered Held (or its final reply again)
    DUPLICATE = "duplicate"
    #: redelivered while it runs here: the new delivery replaces the old
    ADOPTED = "adopted"
    #: finished here before: its stored final reply is sent again
    RESEND = "resend"
    #: a message_id first used with another reply_to: not run, answered Held at its own reply_to
    REUSED_ID = "reused-id"
    #: a run cut short by a crash or a lost node (journaled); it runs again when redelivered
    INTERRUPTED = "interrupted"
    #: the broker refuses every reply to its address: acknowledged without one
    UNANSWERED = "unanswered"
    #: a bug in carod while handling it: the message goes back to the queue
    ERROR = "error"
    #: journaled only: the final reply is stored, not yet confirmed
    FINISHED = "finished"
    #: journaled only: the final reply is confirmed
    REPLIED = "replied"


#: The states a journal row can be in.
JOURNALED = frozenset({JobState.RECEIVED, JobState.RUNNING, JobState.FINISHED, JobState.INTERRUPTED, JobState.REPLIED})

#: States after which the job's message goes back to the queue, with the metrics' reason label.
REQUEUED = {
    JobState.EVICTED: "evicted",
    JobState.HANDED_BACK: "handed_back",
    JobState.PASSED: "passed",
    JobState.DECLINED: "declined",
    JobState.ERROR: "internal_error",
}

#: States that end a run: the run's duration is observed.
RUN_ENDS = frozenset({JobState.EXITED, JobState.HELD, JobState.REMOVED, JobState.EVICTED})
