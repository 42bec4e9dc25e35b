"""systemd: the unit file, and the notify protocol through a real NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from carod.edges.notify import Notifier, parse_address, parse_watchdog_s
from tests.helpers import start_daemon, write_config

UNIT = Path(__file__).parents[2] / "systemd" / "carod.service"


class NotifySocket:
    """What systemd listens on: a datagram socket, read by a thread that timestamps each message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        return list(self.messages)

    async def wait_for(self, key: str, timeout_s: float = 20) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for _, fields in self.drain():
                if key in fields:
                    return fields
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {key} notification; got {[m for _, m in self.messages]}")

    def close(self) -> None:
        self._stop.set()
        self._reader.join()
        self.sock.close()


@pytest.fixture
def notify_socket(base: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(base / "notify.sock")
    yield sock
    sock.close()


# ------------------------------------------------------------------ pure


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


# ------------------------------------------------------------ the daemon


async def test_carod_notifies_ready_status_watchdog_and_stopping(
    queue: str, base: Path, notify_socket: NotifySocket
) -> None:
    config = write_config(base, queue)
    daemon = await start_daemon(config, env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"})
    try:
        ready = await notify_socket.wait_for("READY")
        assert ready["READY"] == "1"
        assert ready["STATUS"] == "0 job(s) running on 2 slot(s); connected"
        await asyncio.sleep(1.0)
        beats = [t for t, fields in notify_socket.drain() if fields.get("WATCHDOG") == "1"]
        assert len(beats) >= 3  # every 0.2 s
    finally:
        code = await daemon.stop()
    assert code == 0
    stopping = await notify_socket.wait_for("STOPPING")
    assert stopping["STATUS"].startswith("draining: 0 job(s) running")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    carod = Path(sys.executable).with_name("carod")
    unit = tmp_path / "carod.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/carod", str(carod)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    # verify only warns about unknown keys or bad values: any output is a defect.
    assert done.stderr.strip() == "" and done.stdout.strip() == "", done.stderr + done.stdout
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Delegate=yes", "KillMode=mixed", "ExecReload=", "StateDirectory="):
        assert line in text
