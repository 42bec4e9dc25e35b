"""carod.node.holding: a held job's journal row reads back as it was written (the node's restart relies on it)."""

from __future__ import annotations

from carod.edges.broker import held_queue_name
from carod.node.holding import HELD, HeldJob
from carod.wire import adverts
from carod.wire.adverts import JobInfo


def test_a_held_row_round_trips_and_its_queue_is_named_after_the_job() -> None:
    info = JobInfo("m-1", "alice", "/bin/sleep", 0.0, 1.0, 128.0, status=adverts.HELD, attrs={"HoldReasonCode": "1"})
    held = HeldJob("m-1", HELD, held_queue_name("grid", "m-1"), "replies", "alice", "held by alice", 1, 3, info)
    assert HeldJob.from_row("m-1", HELD, held.to_json()) == held
    nobody = HeldJob("m-2", HELD, held_queue_name("grid", "m-2"), "ex/key", None, "held", 0, 1, info)
    assert HeldJob.from_row("m-2", HELD, nobody.to_json()).owner is None
    name = held_queue_name("grid", "m-1")
    assert name.startswith("grid.held.") and len(name) == len("grid.held.") + 32
    assert held_queue_name("grid", "m-2") != name
