"""Logging: plain text on a terminal, one JSON object a line when asked."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

#: Control characters (a message_id or a HoldReason may carry any): in a text line each is escaped,
#: so that text a message chose cannot start a forged log line of its own.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message`` on one line; the message's control characters escaped (tracebacks kept)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escape, record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # A job's state change (carod.node.job.log_state) carries its fields as well, for ELK and journald.
        for key in ("message_id", "job_state", "elapsed_s"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if isinstance(fields := getattr(record, "fields", None), dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


#: The AMQP client libraries' loggers: their records (a forced disconnect, a callback error) go
#: through carod's handler and format too, at WARNING and above, instead of Python's bare fallback.
LIBRARY_LOGGERS = ("aiormq", "aio_pika", "pamqp")


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger("carod")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers[:] = [handler]
        library.setLevel(logging.WARNING)
        library.propagate = False


def set_level(level: str) -> None:
    logging.getLogger("carod").setLevel(level.upper())
