"""The pool's pure parts, without a broker: resources, flow, adverts, the pool view."""

from __future__ import annotations

import datetime
import json

import classad2
import pytest

from carod import config as configuration
from carod.client import tables
from carod.errors import ConfigError
from carod.node import machine, pool
from carod.node.resources import Resources, Totals, flow
from carod.wire import adverts
from carod.wire.classads import ad_from_headers
from carod.wire.jobad import Request, job_spec
from carod.wire.message import FIRST_OFFER_HEADER, OFFERS_HEADER, parse_envelope

TOTALS = Totals(cpus=4, memory_mib=4096, disk_kib=1_000_000, slots=4)


def test_reservations_count_against_the_totals() -> None:
    res = Resources(TOTALS)
    big = Request(cpus=3, memory_mib=1000, disk_kib=500_000)
    assert res.fits(big)
    res.reserve("a", big)
    free = res.free()
    assert (free.cpus, free.memory_mib, free.disk_kib, free.slots) == (1, 3096, 500_000, 3)
    assert not res.fits(Request(cpus=2, memory_mib=10))
    assert res.fits(Request(cpus=1, memory_mib=3096, disk_kib=500_000))
    assert not res.fits(Request(cpus=1, memory_mib=10, disk_kib=200), disk_available_kib=100)  # a fuller disk
    res.release("a")
    res.release("a")  # idempotent
    assert res.free().cpus == 4 and res.running == 0
    with pytest.raises(ValueError, match="already"):
        res.reserve("b", big)
        res.reserve("b", big)


def test_never_fits_names_what_is_too_big() -> None:
    res = Resources(TOTALS)
    assert res.never_fits(Request(cpus=4, memory_mib=4096, disk_kib=1_000_000)) is None
    why = res.never_fits(Request(cpus=8, memory_mib=5000, disk_kib=1))
    assert why == "RequestCpus 8 > TotalCpus 4; RequestMemory 5000 > TotalMemory 4096"


def test_room_is_counted_in_default_jobs_and_bounded_by_slots() -> None:
    res = Resources(Totals(cpus=8, memory_mib=1024, disk_kib=0, slots=6))
    assert res.room(Request(1, 128)) == 6  # slots bind
    assert res.room(Request(1, 512)) == 2  # memory binds
    res.reserve("x", Request(7, 100))
    assert res.room(Request(1, 128)) == 1  # cpus bind


def test_request_defaults_come_from_the_node() -> None:
    spec = job_spec(ad_from_headers({"Cmd": '"/bin/true"'}))
    request = Request.for_job(spec, 256)
    assert (request.cpus, request.memory_mib, request.disk_kib) == (1, 256, 0)
    assert "default_request_memory_mib" in request.memory_source
    asked = Request.for_job(job_spec(ad_from_headers({"Cmd": '"/bin/true"', "RequestMemory": 64})), 256)
    assert (asked.memory_mib, asked.memory_source) == (64, "RequestMemory")


@pytest.mark.parametrize(
    ("consuming", "credit", "capacity", "expected"),
    [
        (True, 2, 2, None),  # in step: leave it
        (True, 0, 0, None),  # full and nothing more will come
        (True, 2, 0, 0),  # the broker could send what cannot start: stop
        (True, 2, 1, 1),  # ... or send less
        (True, 0, 3, 3),  # nothing would come though three could start: consume again
        (True, 1, 3, None),  # something still comes; resize when it has
        (False, 0, 0, None),
        (False, 0, 2, 2),
        (False, 0, -1, None),
    ],
)
def test_flow(consuming: bool, credit: int, capacity: int, expected: int | None) -> None:
    assert flow(consuming=consuming, credit=credit, capacity=capacity) == expected


# ---------------------------------------------------------------- machine ad


def config_with(**machine_attrs: str) -> configuration.Config:
    text = "[machine]\n" + "".join(f"{k} = {v}\n" for k, v in machine_attrs.items())
    return configuration.parse(text, environ={})


def test_totals_come_from_the_configured_ad() -> None:
    cfg = config_with(Cpus="3", Memory="2048", Disk="100")
    totals = machine.totals(machine.detect(cfg), cfg)
    assert totals == Totals(cpus=3, memory_mib=2048, disk_kib=100, slots=3)
    assert machine.disk_is_fixed(cfg)


@pytest.mark.parametrize(("name", "value"), [("Cpus", "0"), ("Memory", '"lots"'), ("Disk", "-1")])
def test_totals_refuse_what_is_not_a_resource(name: str, value: str) -> None:
    cfg = config_with(**{name: value})
    with pytest.raises(ConfigError, match=f"\\[machine\\] {name}"):
        machine.totals(machine.detect(cfg), cfg)


def test_live_ad_shows_free_and_total() -> None:
    cfg = config_with(Cpus="4", Memory="4096", Disk="1000000", BigFree="Memory >= 4000")
    ad = machine.detect(cfg)
    res = Resources(machine.totals(ad, cfg))
    res.reserve("job", Request(cpus=1.5, memory_mib=1000))
    machine.update(ad, res, disk_available_kib=None)
    values = {k: ad.eval(k) for k in ("Cpus", "Memory", "TotalCpus", "TotalMemory", "JobsRunning", "BigFree", "State")}
    assert values == {
        "Cpus": 2.5,
        "Memory": 3096,
        "TotalCpus": 4,
        "TotalMemory": 4096,
        "JobsRunning": 1,
        "BigFree": False,
        "State": "Claimed",
    }
    assert 0 <= ad.eval("ClockMin") < 1440 and 0 <= ad.eval("ClockDay") <= 6
    machine.update(ad, res, disk_available_kib=None, idle=True)
    assert (ad.eval("Cpus"), ad.eval("JobsRunning"), ad.eval("BigFree")) == (4, 0, True)


# ---------------------------------------------------------------- envelope


def test_offers_and_first_offer_come_from_carods_headers() -> None:
    env = parse_envelope("m", "q", {OFFERS_HEADER: 3, FIRST_OFFER_HEADER: 1_700_000_000})
    assert (env.offers, env.first_offer, env.delivery_limited, env.deliveries) == (3, 1_700_000_000.0, 0, 0)


def test_delivery_limit_deaths_of_the_job_queue_are_counted() -> None:
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    death = [
        {"queue": "grid", "reason": "delivery_limit", "count": 1, "time": when},
        {"queue": "grid.unmatched", "reason": "expired", "count": 1, "time": when},
        {"queue": "other", "reason": "delivery_limit", "count": 5},
    ]
    env = parse_envelope("m", "q", {"x-death": death, "x-delivery-count": 2}, queue="grid")
    assert (env.delivery_limited, env.deliveries) == (1, 2)
    assert parse_envelope("m", "q", {"x-death": "junk"}).delivery_limited == 0


# ---------------------------------------------------------------- adverts and the pool view


def node_ad(name: str, *, cpus: int, total_cpus: int, memory: int, **extra: object) -> str:
    ad = classad2.ClassAd()
    ad.update({"Name": name, "Cpus": cpus, "TotalCpus": total_cpus, "Memory": memory, "TotalMemory": memory})
    ad.update({"Disk": 1000, "TotalDisk": 1000, "LoadAvg": 0.5, "Start": classad2.ExprTree("TRUE")})
    ad.update(extra)
    return str(ad)


def advert(
    name: str, state: str = adverts.RUNNING, *, queue: str = "grid", sent: float = 100.0, **ad: int
) -> adverts.Advert:
    text = node_ad(name, **{"cpus": 2, "total_cpus": 2, "memory": 1024, **ad})
    job = adverts.JobInfo("job-1", "alice", "/bin/sleep", 90.0, 1, 128)
    return adverts.Advert(name, queue, state, sent, 5.0, text, (job,), {"other": 99.0})


def test_adverts_round_trip() -> None:
    original = advert("n1")
    again = adverts.decode(adverts.encode(original))
    assert again == original
    assert again.machine_ad().eval("Cpus") == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"v": 2}).encode(), "version"),
        (json.dumps({"v": 1, "node": "n", "queue": "q", "ad": "[]", "state": "Gone"}).encode(), "state"),
        (json.dumps({"v": 1, "node": "n", "queue": "q", "ad": "[]", "state": "Running", "sent": "x"}).encode(), "sent"),
    ],
)
def test_bad_adverts_are_named(body: bytes, message: str) -> None:
    with pytest.raises(adverts.AdvertError, match=message):
        adverts.decode(body)


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


def test_status_table() -> None:
    known = {"n1": advert("n1", cpus=1, total_cpus=2, sent=98.0), "n2": advert("n2", adverts.DRAINING)}
    table = tables.status_table(known, {"n3": 90.0}, now=100.0)
    rows = [line.split() for line in table.splitlines()]
    assert rows[1] == ["n1", "Running", "1/2", "1024/1024", "1", "0.50", "2.0s"]
    assert rows[2][:2] == ["n2", "Draining"]
    assert rows[3] == ["n3", "Unresponsive", "-", "-", "-", "-", "10.0s"]
    assert "2 node(s) answering, 1 silent; cpus 3/4 free" in table
