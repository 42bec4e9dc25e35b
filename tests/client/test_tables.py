"""carod.client.tables: the pool status table `carod status` prints."""

from __future__ import annotations

from carod.client import tables
from carod.wire import adverts
from tests.helpers import advert


def test_status_table() -> None:
    known = {"n1": advert("n1", cpus=1, total_cpus=2, sent=98.0), "n2": advert("n2", adverts.DRAINING)}
    table = tables.status_table(known, {"n3": 90.0}, now=100.0)
    rows = [line.split() for line in table.splitlines()]
    assert rows[1] == ["n1", "Running", "1/2", "1024/1024", "1", "0.50", "2.0s"]
    assert rows[2][:2] == ["n2", "Draining"]
    assert rows[3] == ["n3", "Unresponsive", "-", "-", "-", "-", "10.0s"]
    assert "2 node(s) answering, 1 silent; cpus 3/4 free" in table
