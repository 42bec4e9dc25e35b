"""carod.wire.adverts: pool adverts encoded, decoded and checked (no broker)."""

from __future__ import annotations

import json

import pytest

from carod.node import pool
from carod.wire import adverts
from tests.helpers import advert, forged, machine_text, q


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


# ---------------------------------------------------------------- forged adverts (issue 14)


def test_forged_advert_checks() -> None:
    def advert(**extra: str) -> adverts.Advert:
        return adverts.Advert("n", "grid", adverts.RUNNING, 1.0, 5.0, machine_text(**extra))

    assert adverts.checked_ad(advert()) is not None
    with pytest.raises(adverts.AdvertError, match="calls sprintf"):
        adverts.checked_ad(advert(Start='sprintf("%d", TARGET.X) == ""'))
    with pytest.raises(adverts.AdvertError, match="only Start, Requirements and Rank"):
        adverts.checked_ad(advert(Cpus="TARGET.RequestCpus"))
    with pytest.raises(adverts.AdvertError, match="bytes long"):
        adverts.checked_ad(advert(Pad=q("y" * 5000)))
    with pytest.raises(adverts.AdvertError, match="at most 10"):
        adverts.decode(forged("n", "grid", machine_text()), max_bytes=10)
    view = pool.PoolView("grid", "me", timeout_s=10, max_nodes=1)
    assert view.heard(adverts.Advert("a", "grid", adverts.RUNNING, 1.0, 5.0, machine_text()), now=0)
    with pytest.raises(adverts.AdvertError, match="max_nodes"):
        view.heard(adverts.Advert("b", "grid", adverts.RUNNING, 1.0, 5.0, machine_text()), now=1)
    assert view.heard(adverts.Advert("b", "grid", adverts.RUNNING, 1.0, 5.0, machine_text()), now=11)  # "a" timed out
