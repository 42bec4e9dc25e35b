"""systemd: the unit file, and a real carod's notifications (ready, status, watchdog, stopping)
through a real NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from carod.config import broker_address
from tests.helpers import BROKER_URL, NotifySocket, start_daemon, write_config

UNIT = Path(__file__).parents[2] / "systemd" / "carod.service"


# ------------------------------------------------------------ the daemon


async def test_carod_notifies_ready_status_watchdog_and_stopping(
    queue: str, base: Path, notify_socket: NotifySocket
) -> None:
    config = write_config(base, queue)
    daemon = await start_daemon(config, env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"})
    try:
        ready = await notify_socket.wait_for("READY")
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"0 job(s) running on 2 slot(s); connected to {broker_address(BROKER_URL)}"
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
