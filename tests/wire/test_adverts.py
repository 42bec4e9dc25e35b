"""carod.wire.adverts: pool adverts encoded, decoded and checked (no broker)."""

from __future__ import annotations

import json

import pytest

from carod.wire import adverts
from tests.helpers import advert


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
