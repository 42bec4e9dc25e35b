"""carod.node.pool: the pool view of the other nodes, and the bounds on passing a job on (no broker)."""

from __future__ import annotations

from carod.node import pool
from carod.wire import adverts
from carod.wire.classads import ad_from_headers
from carod.wire.jobad import Request
from tests.helpers import advert, machine_text, q


def test_pool_view_knows_who_could_run_a_job() -> None:
    view = pool.PoolView("grid", "me", timeout_s=10)
    assert not view.heard(advert("me"), now=0)  # itself
    assert not view.heard(advert("stranger", queue="other"), now=0)  # another queue's pool
    assert view.heard(advert("busy", cpus=0, total_cpus=2), now=0)
    assert view.heard(advert("idle", cpus=2, total_cpus=2), now=5)
    assert view.heard(advert("leaving", adverts.DRAINING), now=5)
    job = ad_from_headers({"Cmd": '"/bin/true"', "Requirements": "TARGET.TotalCpus >= 2"})
    assert view.could_run_now(job, Request(1, 128), now=6) == ["idle"]
    assert sorted(view.could_ever_run(job, Request(2, 128), now=6)) == ["busy", "idle"]
    assert view.could_ever_run(job, Request(4, 128), now=6) == []  # bigger than any node
    assert set(view.last_heard()) == {"busy", "idle", "leaving"}
    assert view.expire(now=12) == ["busy"]
    view.heard(advert("idle", adverts.OFFLINE), now=13)
    assert set(view.peers) == {"leaving"}


# ---------------------------------------------------------------- forged adverts and time boxes (issue 14)


def test_matching_against_many_adverts_is_time_boxed() -> None:
    ticks = iter(range(1_000_000))
    view = pool.PoolView("grid", "me", timeout_s=10, clock=lambda: float(next(ticks)))  # each reading: 1 s later
    for name in ("a", "b", "c"):
        assert view.heard(adverts.Advert(name, "grid", adverts.RUNNING, 1.0, 5.0, machine_text()), now=0)
    job = ad_from_headers({"Cmd": q("/bin/true"), "Requirements": "TARGET.HasGPU"})
    # Over budget after each node: one node per call, taking turns, so none is hidden for good.
    seen = [view.could_ever_run(job, Request(1, 128), now=1) for _ in range(4)]
    assert seen == [["a"], ["b"], ["c"], ["a"]]


def test_a_node_not_heard_recently_does_not_count() -> None:
    view = pool.PoolView("grid", "me", timeout_s=10)
    assert view.heard(adverts.Advert("ghost", "grid", adverts.RUNNING, 1.0, 5.0, machine_text()), now=0)
    job = ad_from_headers({"Cmd": q("/bin/true"), "Requirements": "TARGET.HasGPU"})
    assert view.could_ever_run(job, Request(1, 128), now=9) == ["ghost"]
    # Not yet expired from the view (the advertiser's loop does that), but silent too long: it does not count.
    assert view.could_ever_run(job, Request(1, 128), now=11) == []
    assert view.could_run_now(job, Request(1, 128), now=11) == []


def test_passes_on_are_bounded_even_with_a_forged_first_offer() -> None:
    assert pool.may_pass(0, 3600) and pool.may_pass(3600, 3600)
    assert not pool.may_pass(3601, 3600)  # passed on for too long: declines count again
    assert not pool.may_pass(-86400, 3600)  # x-carod-first-offer set a day ahead by the submitter
