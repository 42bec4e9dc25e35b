"""carod.client.tables: the pool status table `carod status` prints."""

from __future__ import annotations

import time

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


def test_queue_table_as_condor_q() -> None:
    when = time.mktime((2026, 11, 30, 9, 5, 0, 0, 0, -1))
    jobs = [
        ("n1", adverts.JobInfo("run-1", "alice", "/bin/sleep", when + 10, 1, 128, 2, when)),
        ("n1", adverts.JobInfo("held-1", "bob", "/bin/sh", 0.0, 1, 64.5, 5, when + 60)),
        ("n2", adverts.JobInfo("wait-1", "nobody", "/bin/true", 0.0, 1, 128, 1, when + 120)),
    ]
    table = tables.queue_table(jobs, now=when + 10 + 90061, queued=4)
    assert table.splitlines() == [
        " ID       OWNER            SUBMITTED     RUN_TIME ST   SIZE CMD",
        " run-1    alice          11/30 09:05   1+01:01:01 R   128.0 /bin/sleep",
        " held-1   bob            11/30 09:06   0+00:00:00 H    64.5 /bin/sh",
        " wait-1   nobody         11/30 09:07   0+00:00:00 I   128.0 /bin/true",
        "",
        "7 jobs; 5 idle, 1 running, 1 held",
    ]


def test_queue_table_escapes_a_forged_command() -> None:
    job = adverts.JobInfo("x" * 40, "o\nwner", "/bin/evil\n\x1b[2J fake line", 1.0, 1, 1, 2, 1.0)
    table = tables.queue_table([("n", job)], now=2.0)
    assert len(table.splitlines()) == 4
    assert "\x1b" not in table and "/bin/evil\\n\\x1b[2J fake line" in table
    assert table.splitlines()[-1] == "1 jobs; 0 idle, 1 running, 0 held"
