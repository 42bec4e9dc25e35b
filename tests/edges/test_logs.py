"""carod.edges.logs: a text line cannot be split by text a message chose (no broker)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from carod.edges import logs


@pytest.fixture(autouse=True)
def _loggers_restored() -> Iterator[None]:
    """logs.setup changes process-wide loggers: put them back as they were for the tests that follow."""
    names = ("carod", *logs.LIBRARY_LOGGERS)
    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def test_a_message_id_with_a_newline_cannot_forge_a_log_line() -> None:
    logs.setup("INFO", "text")
    handler = logging.getLogger("carod").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    forged = "x\n2026-11-29 18:00:00,000 ERROR carod.node: forged line\r\x1b[2K"
    logging.getLogger("carod.node").warning("job=%s state=duplicate", forged)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("carod.node").exception("job=%s failed", "y")
    lines = buffer.getvalue().splitlines()
    assert lines[0].endswith(
        "WARNING carod.node: job=x\\n2026-11-29 18:00:00,000 ERROR carod.node: forged line\\r\\x1b[2K state=duplicate"
    )
    assert not any(line.startswith("2026-11-29 18:00:00,000") for line in lines)
    assert lines[2] == "Traceback (most recent call last):"  # tracebacks keep their lines


def test_the_amqp_libraries_log_in_carods_format() -> None:
    """A forced disconnect's records from aiormq / aio-pika: carod's text or JSON lines, not Python's bare fallback."""
    for fmt in ("text", "json"):
        logs.setup("INFO", fmt)
        handler = logging.getLogger("carod").handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        buffer = io.StringIO()
        handler.setStream(buffer)
        try:
            raise ConnectionError("CONNECTION_FORCED - broker forced connection closure")
        except ConnectionError:
            logging.getLogger("aiormq.connection").error("Unexpected connection close from remote", exc_info=True)
        logging.getLogger("aio_pika.robust_connection").info("below WARNING: not shown")
        out = buffer.getvalue()
        assert "not shown" not in out
        if fmt == "text":
            first = out.splitlines()[0]
            assert first.endswith(" ERROR aiormq.connection: Unexpected connection close from remote")
            assert "Traceback (most recent call last):" in out
        else:
            (line,) = out.splitlines()
            entry = json.loads(line)
            assert entry["logger"] == "aiormq.connection" and entry["level"] == "ERROR"
            assert "CONNECTION_FORCED" in entry["exception"]
