"""carod.node.answer on its own: how each outcome is answered, and what happens when the broker says no (no broker).

The collaborators are small fakes that record what they are asked: the
job's Delivery (settle, reply_and_ack), the journal (outbox and states) and
the broker edge (confirmed publishing of non-final replies).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest

from carod import config as configuration
from carod.edges.amqp import ReplyRefused, ReplyUndeliverable, ReplyUnroutable
from carod.edges.broker import Broker
from carod.edges.delivery import Delivery, Parking, Settle
from carod.edges.journal import Journal
from carod.edges.metrics import Metrics
from carod.edges.records import JobRecord, OutboxEntry
from carod.errors import BrokerError, JobHeld
from carod.holdcodes import HoldCode
from carod.node.admission import Admission
from carod.node.answer import Answerer
from carod.node.job import Job
from carod.node.outcome import Evicted, Exited, Held, Outcome, Removed
from carod.node.resources import Resources, Totals
from carod.sandbox.results import Results
from carod.states import JobState
from carod.wire import replies
from carod.wire.classads import Scalar
from carod.wire.jobad import Request
from carod.wire.message import ReplyAddress, parse_envelope
from carod.wire.replies import ExitInfo

REPLY_TO = "replies-q"
INFO = ExitInfo(exit_code=3, exit_signal=None, duration_s=0.5, user_cpu_s=0.1, sys_cpu_s=0.0, max_rss_kib=1024)


class FakeDelivery:
    """A job's delivery: records settlements and committed final replies; ``failures`` are raised in turn."""

    def __init__(self, *, live: bool = True) -> None:
        self.consumer_tag = "c1"
        self.acked = False
        self.waiting = False
        self.is_live = live
        self.settled: list[Settle] = []
        self.committed: list[tuple[ReplyAddress, dict[str, Scalar], bytes]] = []
        self.failures: list[BaseException] = []
        self.redelivered = False

    def live(self) -> bool:
        return self.is_live

    async def wait_live(self, timeout_s: float, stopping: asyncio.Event) -> None:
        if not self.is_live:
            raise TimeoutError

    async def settle(self, how: Settle, *, label: str, parking: Parking | None = None) -> bool:
        self.settled.append(how)
        if how is Settle.ACK:
            self.acked = True
        return True

    async def reply_and_ack(
        self,
        address: ReplyAddress,
        *,
        correlation_id: str | None,
        headers: Mapping[str, Scalar],
        body: bytes,
        timeout_s: float,
    ) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.committed.append((address, dict(headers), body))
        self.acked = True


class FakeJournal:
    def __init__(self) -> None:
        self.entries: list[OutboxEntry] = []
        self.confirmed_ids: list[int] = []
        self.states: list[JobState] = []

    async def add_reply(
        self,
        message_id: str,
        exchange: str,
        routing_key: str,
        headers: dict[str, Any],
        body_path: str | None,
        *,
        final: bool,
        reply_to: str | None = None,
        wait: bool = True,
    ) -> OutboxEntry:
        entry = OutboxEntry(len(self.entries) + 1, message_id, exchange, routing_key, headers, body_path, final)
        self.entries.append(entry)
        return entry

    async def confirmed(self, entry_id: int, message_id: str, *, final: bool) -> None:
        """As the journal does: a confirmed final reply's result file goes once that is recorded."""
        self.confirmed_ids.append(entry_id)
        entry = next(e for e in self.entries if e.id == entry_id)
        if final and entry.body_path:
            Path(entry.body_path).unlink(missing_ok=True)

    async def set_state(self, message_id: str, state: JobState) -> None:
        self.states.append(state)

    async def last_final(self, message_id: str) -> OutboxEntry | None:
        finals = [e for e in self.entries if e.message_id == message_id and e.final]
        return finals[-1] if finals else None


class FakeBroker:
    """Confirmed publishing of non-final replies."""

    def __init__(self) -> None:
        self.published: list[dict[str, Scalar]] = []
        self.failures: list[BaseException] = []

    async def publish_reply(
        self,
        address: ReplyAddress,
        *,
        correlation_id: str | None,
        headers: Mapping[str, Scalar],
        body: bytes,
        message_type: str | None = None,
    ) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.published.append(dict(headers))


class Scene:
    """One Answerer and one job, with its fakes."""

    def __init__(self, *, reply_retry_s: float = 5.0, live: bool = True, message_id: str = "job-1") -> None:
        self.config = configuration.parse(
            f"[node]\nname = n1\nredelivery_wait_s = 0.1\n[broker]\nreply_retry_s = {reply_retry_s}\n",
            source="test",
            environ={},
        )
        self.delivery = FakeDelivery(live=live)
        self.journal = FakeJournal()
        self.broker = FakeBroker()
        self.metrics = Metrics()
        self.running: dict[str, Job] = {}
        self.answer = Answerer(
            self.config,
            cast(Broker, self.broker),
            cast(Journal, self.journal),
            self.running,
            asyncio.Event(),
            self.metrics,
        )
        admission = Admission(Resources(Totals(1, 100, 100, 1)), Request(), max_prefetch=1)
        envelope = parse_envelope(message_id, REPLY_TO, {})
        self.job = Job(envelope, cast(Delivery, self.delivery), admission.arrive(self.delivery))
        self.running[message_id] = self.job

    def counter(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def conclude(self, outcome: Outcome) -> None:
        await asyncio.wait_for(self.answer.conclude(self.job, outcome), 10)


def held_outcome() -> Held:
    return Held(JobHeld("the job asked for too much", HoldCode.JOB_POLICY, 7), INFO)


async def test_a_held_job_gets_one_final_reply_committed_with_its_ack() -> None:
    scene = Scene()
    await scene.conclude(held_outcome())
    assert len(scene.delivery.committed) == 1
    address, headers, body = scene.delivery.committed[0]
    assert address == ReplyAddress("", REPLY_TO)
    assert headers["JobStatus"] == 5 and headers["HoldReasonCode"] == int(HoldCode.JOB_POLICY)
    assert headers["HoldReasonSubCode"] == 7 and "too much" in str(headers["HoldReason"])
    assert body == b""
    [entry] = scene.journal.entries
    assert entry.final and scene.journal.confirmed_ids == [entry.id], "journaled before, confirmed after"
    assert scene.delivery.settled == [], "acked with the reply, not again alone"
    assert "job-1" not in scene.running, "a redelivery is answered from the journal from now on"
    assert scene.counter("carod_jobs_held_total", code="job_policy") == 1


async def test_an_exited_job_sends_its_result_zip_and_the_file_is_removed() -> None:
    scene = Scene()
    fd, name = tempfile.mkstemp(suffix=".zip")
    os.close(fd)
    result = Path(name)
    with zipfile.ZipFile(result, "w") as archive:
        archive.writestr("out.txt", "hello\n")
    zipped = result.read_bytes()
    await scene.conclude(Exited(INFO, result, Results(files=1, bytes=6, skipped=())))
    [(_address, headers, body)] = scene.delivery.committed
    assert headers["JobStatus"] == 4 and headers["ExitCode"] == 3
    assert body == zipped
    assert not result.exists(), "the result file goes once the broker has the reply"
    assert scene.counter("carod_jobs_completed_total") == 1


async def test_a_removed_job_is_answered_removed_with_the_reason() -> None:
    scene = Scene()
    await scene.conclude(Removed("removed by alice via carod rm"))
    [(_address, headers, _body)] = scene.delivery.committed
    assert headers["JobStatus"] == 3
    assert "alice" in str(headers["RemoveReason"])


async def test_an_evicted_job_gets_an_idle_update_and_goes_back_to_the_queue() -> None:
    scene = Scene()
    await scene.conclude(Evicted("the node is stopping", INFO))
    assert scene.delivery.committed == [], "no final reply: another node will run it"
    [update] = scene.broker.published
    assert update["JobStatus"] == 1
    assert scene.journal.states == [JobState.RECEIVED], "not an interruption: the next delivery runs it afresh"
    assert scene.delivery.settled == [Settle.REQUEUE]
    assert scene.counter("carod_jobs_requeued_total", reason="evicted") == 1


async def test_a_final_reply_the_broker_did_not_take_is_sent_again_once_it_does() -> None:
    scene = Scene()
    scene.delivery.failures = [BrokerError("connection lost"), BrokerError("no confirm")]
    await scene.conclude(held_outcome())
    assert len(scene.delivery.committed) == 1, "exactly one final reply"
    assert scene.journal.confirmed_ids == [scene.journal.entries[0].id]


async def test_a_reply_too_large_for_the_broker_is_replaced_by_a_small_held_one() -> None:
    scene = Scene()
    scene.delivery.failures = [ReplyRefused("a message of 200 bytes is larger than the broker's max_message_size")]
    await scene.conclude(held_outcome())
    [(_address, headers, body)] = scene.delivery.committed
    assert headers["JobStatus"] == 5 and body == b""
    assert "the broker refused this job's" in str(headers["HoldReason"])
    assert scene.counter("carod_replies_refused_total", reason="size") == 1


async def test_an_address_that_refuses_every_reply_is_settled_without_one() -> None:
    scene = Scene()
    scene.delivery.failures = [ReplyUndeliverable("there is no exchange 'gone'")]
    await scene.conclude(held_outcome())
    assert scene.delivery.committed == []
    assert scene.delivery.settled == [Settle.ACK], "acked alone: retrying cannot help"
    assert scene.job.unanswerable is not None
    assert scene.counter("carod_jobs_unanswered_total") == 1


async def test_a_final_reply_given_up_stays_in_the_journal_and_the_message_is_requeued() -> None:
    scene = Scene(reply_retry_s=0.2)
    scene.delivery.failures = [BrokerError("the broker is away")] * 100
    await scene.conclude(held_outcome())
    assert scene.delivery.committed == []
    assert scene.journal.confirmed_ids == [], "not confirmed: its next delivery is answered from the journal"
    assert scene.delivery.settled == [Settle.REQUEUE]
    assert scene.counter("carod_replies_given_up_total", kind="final") == 1


async def test_with_no_live_delivery_the_answer_waits_in_the_journal() -> None:
    scene = Scene(live=False)
    await scene.conclude(held_outcome())
    assert scene.delivery.committed == [] and scene.delivery.settled == []
    assert scene.journal.confirmed_ids == []
    assert "job-1" not in scene.running


# ---------------------------------------------------------------- a message_id used again

#: 2026-03-04 05:06:07 UTC
WHEN = 1772600767.0


def record(state: JobState, reply_to: str | None, *, sequence: int = 3, attempts: int = 1) -> JobRecord:
    return JobRecord("job-1", state, attempts, sequence, None, None, None, reply_to, WHEN - 60, WHEN)


async def test_a_reused_message_id_from_another_reply_to_is_answered_held_at_its_own_address() -> None:
    scene = Scene()
    assert await scene.answer.reused_id(scene.job, record(JobState.REPLIED, "another-queue"))
    [(address, headers, body)] = scene.delivery.committed
    assert address == ReplyAddress("", REPLY_TO), "its own reply_to, never the first job's"
    assert headers["JobStatus"] == 5 and headers["HoldReasonCode"] == 0 and body == b""
    reason = str(headers["HoldReason"])
    assert "already used by another job" in reason and "answered at 2026-03-04 05:06:07 UTC" in reason
    assert "journal_retention_s = 86400 s" in reason and "new message_id" in reason
    assert headers["Sequence"] == 1 and headers["JobRunCount"] == 0, "nothing of the first job's"
    assert scene.delivery.settled == [], "acked with its reply"
    assert scene.journal.entries == [] and scene.journal.confirmed_ids == [], "the row is the first job's"
    assert scene.counter("carod_jobs_reused_id_total") == 1
    assert scene.counter("carod_jobs_held_total", code="unspecified") == 0, "not a held job: it never was one"


async def test_a_reused_id_of_a_job_not_yet_answered_says_when_it_was_received() -> None:
    scene = Scene()
    assert await scene.answer.reused_id(scene.job, record(JobState.RUNNING, "another-queue"))
    [(_address, headers, _body)] = scene.delivery.committed
    assert "received at 2026-03-04 05:05:07 UTC" in str(headers["HoldReason"])


@pytest.mark.parametrize("first", [REPLY_TO, None])
async def test_the_same_reply_to_or_an_unknown_one_is_not_a_reused_id(first: str | None) -> None:
    scene = Scene()
    assert not await scene.answer.reused_id(scene.job, record(JobState.REPLIED, first))
    assert scene.delivery.committed == [] and scene.delivery.settled == []
    assert scene.counter("carod_jobs_reused_id_total") == 0


async def test_sent_again_an_answered_job_without_a_result_gets_its_final_reply_again() -> None:
    scene = Scene()
    stored = {"JobStatus": 5, "Sequence": 3, "HoldReason": "the job asked for too much", "HoldReasonCode": 3}
    await scene.journal.add_reply("job-1", "", REPLY_TO, stored, None, final=True)
    await scene.answer.answer_again(scene.job, record(JobState.REPLIED, REPLY_TO))
    [(address, headers, body)] = scene.delivery.committed
    assert address == ReplyAddress("", REPLY_TO) and body == b""
    assert headers == stored
    assert len(scene.journal.entries) == 1 and scene.journal.confirmed_ids == [], "not journaled again"


async def test_sent_again_an_answered_job_whose_result_is_gone_is_told_so() -> None:
    scene = Scene()
    await scene.journal.add_reply("job-1", "", REPLY_TO, {"JobStatus": 4, "Sequence": 3}, "/gone.zip", final=True)
    scene.job.sequence = 3  # as carod.node.recovery sets it from the journal
    await scene.answer.answer_again(scene.job, record(JobState.REPLIED, REPLY_TO))
    [(address, headers, body)] = scene.delivery.committed
    assert address == ReplyAddress("", REPLY_TO) and body == b""
    assert headers["JobStatus"] == 5 and headers["HoldReasonCode"] == 0 and headers["Sequence"] == 4
    reason = str(headers["HoldReason"])
    assert "already answered at 2026-03-04 05:06:07 UTC" in reason and "result is no longer kept" in reason
    assert "new message_id" in reason
    assert scene.counter("carod_jobs_reused_id_total") == 0


async def test_sent_again_an_id_whose_answer_went_to_another_address_is_a_reused_id() -> None:
    """A row kept by an older carod has no address; the stored final reply's address tells."""
    scene = Scene()
    await scene.journal.add_reply("job-1", "", "another-queue", {"JobStatus": 5, "Sequence": 2}, None, final=True)
    await scene.answer.answer_again(scene.job, record(JobState.REPLIED, None))
    [(address, headers, _body)] = scene.delivery.committed
    assert address == ReplyAddress("", REPLY_TO)
    assert headers["JobStatus"] == 5 and "already used by another job" in str(headers["HoldReason"])
    assert scene.counter("carod_jobs_reused_id_total") == 1


async def test_a_stored_final_reply_for_another_address_is_never_sent_to_this_one() -> None:
    scene = Scene()
    stored = {"JobStatus": 4, "Sequence": 2, "ExitCode": 0}
    entry = await scene.journal.add_reply("job-1", "", "another-queue", stored, None, final=True)
    await scene.answer.resend_final(scene.job, entry)
    [(address, headers, _body)] = scene.delivery.committed
    assert address == ReplyAddress("", REPLY_TO) and headers["JobStatus"] == 5 and "ExitCode" not in headers
    assert scene.journal.confirmed_ids == [], "the stored reply still waits for its own job's delivery"


async def test_a_reply_to_a_reused_id_the_broker_never_takes_requeues_the_message() -> None:
    scene = Scene(reply_retry_s=0.2)
    scene.delivery.failures = [BrokerError("the broker is away")] * 100
    await asyncio.wait_for(scene.answer.reused_id(scene.job, record(JobState.REPLIED, "another-queue")), 10)
    assert scene.delivery.committed == [] and scene.delivery.settled == [Settle.REQUEUE]


async def test_an_update_the_broker_refuses_for_good_is_dropped_not_retried() -> None:
    scene = Scene()
    scene.broker.failures = [ReplyUndeliverable("there is no exchange 'gone'")]
    running = scene.answer.reply(scene.job, Removed("x"))  # any reply will do as an update here
    assert not await scene.answer.send(scene.job, running)
    assert scene.broker.published == []
    assert scene.job.unanswerable is not None, "nothing more is sent for this job"
    assert not await scene.answer.send(scene.job, running)


@pytest.mark.parametrize("outcome", [held_outcome(), Removed("r")])
async def test_every_final_outcome_is_logged_once_with_its_state(
    outcome: Outcome, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="carod.job")
    scene = Scene()
    await scene.conclude(outcome)
    states = [getattr(r, "job_state", None) for r in caplog.records if getattr(r, "job_state", None)]
    expected = JobState.HELD if isinstance(outcome, Held) else JobState.REMOVED
    assert states == [expected.value]


# ---------------------------------------------------------------- the Running reply, sent without waiting


def running_reply(scene: Scene) -> replies.Reply:
    return replies.running(
        sequence=scene.job.next_sequence(), node="n1", now=WHEN, start_date=WHEN, pid=42, run_count=1
    )


def final_after_updates(scene: Scene) -> list[int]:
    """How many updates the broker had taken at each final reply's commit."""
    seen: list[int] = []
    commit = scene.delivery.reply_and_ack

    async def recording(address: ReplyAddress, **kwargs: Any) -> None:
        seen.append(len(scene.broker.published))
        await commit(address, **kwargs)

    scene.delivery.reply_and_ack = recording  # type: ignore[method-assign]
    return seen


async def test_a_running_reply_the_broker_nacks_is_sent_again_before_the_final_reply() -> None:
    scene = Scene()
    scene.broker.failures = [BrokerError("the broker did not accept the message (nack)")]
    seen = final_after_updates(scene)
    assert scene.answer.send_soon(scene.job, running_reply(scene)) is not None, "the job does not wait for it"
    await scene.conclude(held_outcome())
    assert seen == [1], "the final reply went out after the Running reply was confirmed, once"
    [update] = scene.broker.published
    assert update["JobStatus"] == 2 and update["Sequence"] == 1
    [(_address, headers, _body)] = scene.delivery.committed
    assert headers["JobStatus"] == 5 and headers["Sequence"] == 2
    assert scene.journal.confirmed_ids == [e.id for e in scene.journal.entries], "both rows confirmed"


async def test_an_unroutable_running_reply_still_leads_to_exactly_one_final_reply() -> None:
    scene = Scene()
    scene.broker.failures = [ReplyUnroutable("no queue is bound for replies-q")]
    seen = final_after_updates(scene)
    scene.answer.send_soon(scene.job, running_reply(scene))
    await scene.conclude(held_outcome())
    assert scene.broker.published == [] and seen == [0]
    assert len(scene.delivery.committed) == 1 and scene.delivery.settled == []
    assert scene.counter("carod_replies_refused_total", reason="unroutable") == 1


async def test_a_running_reply_to_an_address_that_refuses_it_leaves_the_job_unanswered() -> None:
    scene = Scene()
    scene.broker.failures = [ReplyUndeliverable("there is no exchange 'gone'")]
    scene.answer.send_soon(scene.job, running_reply(scene))
    await scene.conclude(held_outcome())
    assert scene.delivery.committed == [] and scene.delivery.settled == [Settle.ACK], "acked alone, once"
    assert scene.job.unanswerable is not None
    assert scene.counter("carod_jobs_unanswered_total") == 1


async def test_an_eviction_s_idle_reply_comes_after_the_running_reply_it_follows() -> None:
    scene = Scene()
    scene.broker.failures = [BrokerError("no confirm")]
    scene.answer.send_soon(scene.job, running_reply(scene))
    await scene.conclude(Evicted("the node is stopping", INFO))
    assert [u["JobStatus"] for u in scene.broker.published] == [2, 1]
    assert scene.delivery.settled == [Settle.REQUEUE]
