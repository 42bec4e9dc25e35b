"""carod.edges.logs: a text line cannot be split by text a message chose (no broker)."""

from __future__ import annotations

import io
import logging

from carod.edges import logs


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
    logs.setup("INFO", "text")
