"""carod.sandbox.execute: what zipfile refuses while collecting results is a Held job, not an internal error
(issue 14; no broker)."""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import pytest

from carod import config as configuration
from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import execute, results
from carod.sandbox.execute import Executor, Run
from carod.sandbox.isolation import Layers
from carod.sandbox.users import JobUser, UserPool
from tests.helpers import config_text, plain_spec


@pytest.mark.parametrize(
    "error",
    [
        struct.error("ushort format requires 0 <= number <= 65535"),  # a name past 65,535 bytes
        zipfile.LargeZipFile("Filesize would require ZIP64 extensions"),
        ValueError("a zipfile refusal"),
    ],
)
async def test_what_zipfile_refuses_is_held_not_an_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """struct.error from zipfile was an internal error (requeue, then a wrong Held): now TRANSFER_OUTPUT_ERROR."""
    config = configuration.parse(config_text("q", tmp_path), source="test", environ={})
    user = JobUser("job", os.getuid(), os.getgid(), switch=False)
    layers = Layers(bwrap=None, cgroups=None, network="none", tmp_bytes=0, hidden=(), setpriv="")
    executor = Executor(config, layers, UserPool([user], dedicated=False))
    run = Run(user, box=tmp_path / "box")
    executor.results_dir.mkdir(parents=True)

    def refuse(*_args: object, **_kwargs: object) -> results.Results:
        (executor.results_dir / "box.zip").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(execute, "collect_results", refuse)  # where execute looks it up
    with pytest.raises(JobHeld) as info:
        await executor.collect(run, plain_spec())
    assert info.value.code == HoldCode.TRANSFER_OUTPUT_ERROR
    assert info.value.reason.startswith("carod could not zip the job's results: "), info.value.reason
    assert not (executor.results_dir / "box.zip").exists()  # no partial zip left behind
