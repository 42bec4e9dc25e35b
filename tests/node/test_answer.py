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
from carod.edges.amqp import ReplyRefused, ReplyUndeliverable
from carod.edges.broker import Broker
from carod.edges.delivery import Delivery, Parking, Settle
from carod.edges.journal import Journal, OutboxEntry
from carod.edges.metrics import Metrics
from carod.errors import BrokerError, JobHeld
from carod.holdcodes import HoldCode
from carod.node.admission import Admission
from carod.node.answer import Answerer
from carod.node.job import Job
from carod.node.outcome import Evicted, Exited, Held, Outcome, Removed
from carod.node.resources import Resources, Totals
from carod.sandbox.results import Results
from carod.states import JobState
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
    ) -> OutboxEntry:
        entry = OutboxEntry(len(self.entries) + 1, message_id, exchange, routing_key, headers, body_path, final)
        self.entries.append(entry)
        return entry

    async def confirmed(self, entry_id: int, message_id: str, *, final: bool) -> None:
        self.confirmed_ids.append(entry_id)

    async def set_state(self, message_id: str, state: JobState) -> None:
        self.states.append(state)


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


async def test_a_reused_message_id_is_acked_and_never_answered() -> None:
    scene = Scene()
    assert await scene.answer.reused_id(scene.job, "another-queue")
    assert scene.delivery.settled == [Settle.ACK]
    assert scene.delivery.committed == [] and scene.broker.published == []
    assert not await scene.answer.reused_id(scene.job, REPLY_TO)


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
