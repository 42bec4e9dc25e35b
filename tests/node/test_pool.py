"""carod.node.pool: the pool view of the other nodes, and the bounds on passing a job on (no broker)."""

from __future__ import annotations

from carod.node import pool
from carod.wire import adverts
from carod.wire.classads import ad_from_headers
from carod.wire.jobad import Request
from tests.helpers import advert


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
