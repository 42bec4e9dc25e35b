"""carod.node.outcome: every way a job can end on a node gets its own reply (pure, no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.node.outcome import Evicted, Exited, Held, Outcome, Removed, reply_for
from carod.sandbox.results import Results
from carod.wire.replies import ExitInfo

INFO = ExitInfo(exit_code=0, exit_signal=None, duration_s=1.5, user_cpu_s=0.2, sys_cpu_s=0.1, max_rss_kib=2048)


def reply(outcome: Outcome) -> dict[str, object]:
    made = reply_for(outcome, sequence=5, node="n1", now=1_700_000_000.0, run_count=2)
    assert made.headers["Sequence"] == 5 and made.headers["JobRunCount"] == 2
    return dict(made.headers)


def test_exited_is_status_4_with_its_exit_code_and_the_zip_as_body(tmp_path: Path) -> None:
    zipped = tmp_path / "result.zip"
    made = reply_for(
        Exited(INFO, zipped, Results(files=1, bytes=3, skipped=("fifo",))),
        sequence=5,
        node="n1",
        now=1_700_000_000.0,
        run_count=2,
    )
    assert made.headers["JobStatus"] == 4 and made.headers["ExitCode"] == 0
    assert made.body_path == zipped
    assert "fifo" in str(made.headers["SkippedOutput"])


def test_held_is_status_5_with_reason_code_and_subcode() -> None:
    headers = reply(Held(JobHeld("Cmd not found", HoldCode.FAILED_TO_CREATE_PROCESS, 2)))
    assert headers["JobStatus"] == 5
    assert "Cmd not found" in str(headers["HoldReason"])
    assert headers["HoldReasonCode"] == int(HoldCode.FAILED_TO_CREATE_PROCESS) and headers["HoldReasonSubCode"] == 2


def test_held_after_the_process_ran_still_says_how_it_ended() -> None:
    headers = reply(Held(JobHeld("too much memory", HoldCode.JOB_OUT_OF_RESOURCES), INFO))
    assert headers["JobStatus"] == 5 and headers["RemoteWallClockTime"] == pytest.approx(1.5)


def test_removed_is_status_3_with_the_reason() -> None:
    headers = reply(Removed("removed by alice@h via carod rm"))
    assert headers["JobStatus"] == 3 and "alice" in str(headers["RemoveReason"])


def test_evicted_is_an_idle_update_not_a_final_reply() -> None:
    headers = reply(Evicted("the node is stopping", INFO))
    assert headers["JobStatus"] == 1
    assert "stopping" in str(headers["LastVacateReason"])
