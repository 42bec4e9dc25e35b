"""carod.node.holding: a held job's journal row reads back as it was written (the node's restart relies on it)."""

from __future__ import annotations

from carod.edges.broker import held_queue_name
from carod.node import holding
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


def test_a_held_jobs_header_text_is_evaluated_only_when_it_is_a_literal() -> None:
    """Hostile header text is never evaluated by the node beyond a literal (sprintf could allocate gigabytes)."""
    assert holding._header_text('"/bin/echo"') == "/bin/echo"
    costly = 'sprintf("%999999999d", 1)'
    assert holding._header_text(costly) == costly
    assert holding._header_text("x" * 5000) == ""
