"""carod.edges.notify: the systemd notify protocol (addresses, watchdog, heartbeat) through a real
NOTIFY_SOCKET (no broker)."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from carod.edges.notify import Notifier, parse_address, parse_watchdog_s
from tests.helpers import NotifySocket


@pytest.mark.parametrize(
    ("value", "address"),
    [("/run/systemd/notify", "/run/systemd/notify"), ("@abstract", "\0abstract"), ("", None), (None, None)],
)
def test_notify_socket_addresses(value: str | None, address: str | None) -> None:
    assert parse_address(value) == address


def test_watchdog_applies_only_to_its_pid() -> None:
    assert parse_watchdog_s("30000000", None, 42) == 30.0
    assert parse_watchdog_s("30000000", "42", 42) == 30.0
    assert parse_watchdog_s("30000000", "43", 42) is None
    assert parse_watchdog_s("bogus", None, 42) is None
    assert parse_watchdog_s(None, None, 42) is None


def test_outside_systemd_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


async def test_the_heartbeat_stops_while_the_event_loop_is_stuck(notify_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "100000"})
    beat = asyncio.create_task(notifier.heartbeat(lambda: "fine"))
    await asyncio.sleep(0.3)
    time.sleep(0.6)  # the point: the loop is stuck
    await asyncio.sleep(0.3)
    beat.cancel()
    notifier.close()
    beats = [t for t, fields in notify_socket.drain() if fields.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert len(beats) >= 5
    assert max(gaps) >= 0.55  # nothing while the loop was blocked
    assert sorted(gaps)[len(gaps) // 2] < 0.1  # every 50 ms otherwise
