"""``[node] event_loop``: carod on asyncio's loop or uvloop's, as an operator sees it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from carod import cli
from tests.helpers import SEED, Submitter, q, seed_runs, start_daemon, write_config


def test_a_uvloop_that_cannot_be_imported_stops_carod_naming_the_key(
    base: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    monkeypatch.delenv("CAROD_NODE_EVENT_LOOP", raising=False)
    config = write_config(base, "not-used", node={"event_loop": "uvloop"})
    assert cli.main(["--config", str(config)]) == 78
    error = capsys.readouterr().err
    assert "config error: [node] event_loop: uvloop cannot be imported" in error


async def test_carod_runs_jobs_on_uvloop(base: Path, queue: str, submitter: Submitter) -> None:
    daemon = await start_daemon(write_config(base, queue, node={"event_loop": "uvloop"}))
    try:
        maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()
        assert "/uvloop/loop." in maps
        await seed_runs(submitter)
        # an ad whose cost its text does not bound: evaluated in the evaluator child first
        costly = {**SEED, "Cmd": 'replaceAll("x", "/bin/xcho", "e")', "Arguments": q("costly")}
        final = (await submitter.run(costly, timeout_s=30))[-1]
        assert final.status == 4 and final.headers["ExitCode"] == 0, final.headers
        assert final.zip_read("job.out") == b"costly\n"
    finally:
        assert await daemon.stop() == 0
