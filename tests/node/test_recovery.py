"""carod.node.recovery on its own: a message whose message_id the journal knows as answered (no broker).

A redelivery (the broker's ``redelivered`` flag) of an answered job is its
lost ack: acknowledged without a reply. A new message with the id is a
client sending it again: it is answered (carod.node.answer.Answerer.answer_again).
"""

from __future__ import annotations

from typing import cast

from carod.edges.delivery import Settle
from carod.edges.journal import Journal
from carod.node.evaluator import Evaluator
from carod.node.recovery import Recovery
from carod.node.removals import Removals
from carod.sandbox.execute import Executor
from carod.states import JobState
from tests.node.test_answer import REPLY_TO, Scene, record


def recovery(scene: Scene) -> Recovery:
    # Only the answer and the metrics are used for an answered job.
    return Recovery(
        scene.config,
        cast(Executor, None),
        cast(Journal, scene.journal),
        scene.answer,
        cast(Removals, None),
        cast(Evaluator, None),
        scene.metrics,
    )


async def test_a_redelivery_of_an_answered_job_is_acknowledged_without_a_reply() -> None:
    scene = Scene()
    scene.delivery.redelivered = True
    await scene.journal.add_reply("job-1", "", REPLY_TO, {"JobStatus": 5, "Sequence": 2}, None, final=True)
    assert await recovery(scene).known(scene.job, record(JobState.REPLIED, REPLY_TO))
    assert scene.delivery.committed == [] and scene.delivery.settled == [Settle.ACK]


async def test_a_new_message_with_an_answered_id_is_answered() -> None:
    scene = Scene()
    stored = {"JobStatus": 5, "Sequence": 2, "HoldReason": "the first answer", "HoldReasonCode": 3}
    await scene.journal.add_reply("job-1", "", REPLY_TO, stored, None, final=True)
    assert await recovery(scene).known(scene.job, record(JobState.REPLIED, REPLY_TO))
    [(_address, headers, _body)] = scene.delivery.committed
    assert headers == stored
    assert scene.delivery.settled == [], "acked with its reply"
