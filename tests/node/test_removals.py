"""carod.node.removals: removals of jobs not on the node are remembered within a cap and for a while (issue 14)."""

from __future__ import annotations

from carod.node import removals


def test_removals_cap_and_expiry() -> None:
    memo = removals.Removals(max_count=3, keep_s=10)
    for i in range(5):
        memo.add(f"m{i}", f"r{i}", now=float(i))
    assert len(memo) == 3 and memo.dropped == 2
    assert memo.get("m0", now=5) is None and memo.get("m4", now=5) == "r4"
    assert memo.get("m2", now=13) is None  # older than keep_s
    memo.expire(now=13.5)
    assert len(memo) == 1 and memo.get("m4", now=13.5) == "r4"
    memo.add("m3", "again", now=14)  # re-added: the newest
    memo.expire(now=14.5)
    assert memo.get("m3", now=14.5) == "again"


def test_holds_are_remembered_with_their_requester_and_a_release_forgets_them() -> None:
    memo = removals.Removals(max_count=3, keep_s=10)
    memo.add("m1", "held by alice", now=0, action="hold", requester="alice")
    pending = memo.pending("m1", now=1)
    assert pending is not None
    assert (pending.action, pending.requester, pending.reason) == ("hold", "alice", "held by alice")
    memo.add("m1", "removed by ops", now=2, action="rm", requester="ops")  # the newest first, alice's kept
    assert [(p.action, p.requester) for p in memo.pendings("m1", now=3)] == [("rm", "ops"), ("hold", "alice")]
    assert len(memo) == 2
    memo.add("m1", "held again", now=4, action="hold", requester="alice")  # alice's own: replaced
    assert [(p.reason, p.requester) for p in memo.pendings("m1", now=5)] == [
        ("held again", "alice"),
        ("removed by ops", "ops"),
    ]
    memo.discard("m1")
    assert memo.pending("m1", now=5) is None and memo.get("m1", now=5) is None and len(memo) == 0


def test_one_requester_neither_replaces_nor_undoes_anothers_request() -> None:
    memo = removals.Removals(max_count=10, keep_s=10)
    memo.add("m1", "held by alice", now=0, action="hold", requester="alice")
    memo.add("m1", "rm by eve", now=1, action="rm", requester="eve")
    memo.discard("m1", "eve")  # eve's release: her own request only
    assert [(p.reason, p.requester) for p in memo.pendings("m1", now=2)] == [("held by alice", "alice")]
    memo.discard("m1", "mallory")
    assert memo.get("m1", now=2) == "held by alice"
    memo.discard("m1", "alice")
    assert memo.pendings("m1", now=2) == [] and len(memo) == 0


def test_the_cap_and_expiry_count_each_requesters_request() -> None:
    memo = removals.Removals(max_count=2, keep_s=10)
    memo.add("m1", "a", now=0, requester="alice")
    memo.add("m1", "e", now=1, requester="eve")
    memo.add("m2", "x", now=2, requester="eve")
    assert memo.dropped == 1 and [p.reason for p in memo.pendings("m1", now=3)] == ["e"]
    memo.expire(now=11.5)
    assert memo.pendings("m1", now=11.5) == [] and memo.get("m2", now=11.5) == "x" and len(memo) == 1
