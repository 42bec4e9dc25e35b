"""carod.wire.adcost: the pure bound on what a ClassAd may cost to evaluate (issue 14)."""

from __future__ import annotations

from carod.wire import adcost
from tests.helpers import q, strcat_doublings, sum_doublings

# ---------------------------------------------------------------- the pure bound


def test_adcost_bounds_the_reported_shapes() -> None:
    assert adcost.problem({k: str(v) for k, v in strcat_doublings(12).items()}) is not None
    assert adcost.problem({k: str(v) for k, v in sum_doublings(30).items()}) is not None
    assert adcost.problem({"X": 'sprintf("%999999999d", 1)'}) == ("X", "calls sprintf()")
    assert adcost.problem({"X": "[a = 1; b = a].b"}) == ("X", "contains a nested ClassAd")
    assert adcost.problem({"X": "Y", "Y": "X + 1"}) is not None
    assert adcost.problem({"R": "TARGET.Start"}) == ("R", "refers to the other ad's Start")
    # What clients send is bounded, and costs nothing to check twice.
    plain = {"Cmd": q("/bin/echo"), "L": "{1, 2}[0]", "Requirements": "TARGET.Memory >= RequestMemory"}
    assert adcost.problem({**plain, "RequestMemory": "128"}) is None
    chain = {"A0": "1", **{f"A{i}": f"A{i - 1}" for i in range(1, 5000)}}  # deep, not recursive
    assert adcost.problem(chain) is not None
    assert adcost.is_literal("-12") and adcost.is_literal('"x"') and not adcost.is_literal("A + 1")
