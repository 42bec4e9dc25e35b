"""Control of jobs by ``message_id`` (``carod rm``): the messages, pure, no I/O.

A request is published to the pool exchange (``[pool] exchange``) with the
routing key ``control``; every node listens there. It is a JSON object::

    {"v": 1, "action": "rm", "message_id": "...", "reason": "...", "by": "alice@host"}

The node running (or holding) the job answers to the request's
``reply_to`` with ``{"v": 1, "node": "n1", "message_id": "...", "state": "running"}``;
nodes that do not have it stay silent, and remember the removal for
``[node] journal_retention_s`` in case the job reaches them later
(docs/operations.md, "Removing jobs"): at most ``[node] max_removals`` of
them, the oldest forgotten first (:class:`carod.node.removals.Removals`).

Anyone who may publish to the pool exchange may remove any job (docs/security.md);
what one request can cost a node is bounded: a body of at most
:data:`MAX_REQUEST_BYTES` (refused before it is decoded), a ``message_id`` of at
most :data:`MAX_ID_BYTES` (AMQP's own limit for a message id: a longer one
cannot name a job), a reason of at most :data:`MAX_REASON` characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from carod.errors import CarodError
from carod.wire.adverts import json_object
from carod.wire.message import SHORTSTR_BYTES

VERSION = 1
CONTROL_KEY = "control"
ACTIONS = ("rm",)
#: Longest reason kept (it goes into the Removed reply's RemoveReason).
MAX_REASON = 500
#: Longest ``by`` kept.
MAX_BY = 100
#: Longest message_id, in UTF-8 bytes: an AMQP 0-9-1 message-id is a short string.
MAX_ID_BYTES = SHORTSTR_BYTES
#: Largest request body read at all.
MAX_REQUEST_BYTES = 8 * 1024


class ControlError(CarodError):
    """A control message that cannot be read."""


@dataclass(frozen=True)
class Request:
    action: str
    message_id: str
    reason: str
    by: str = ""

    def remove_reason(self) -> str:
        by = f" by {self.by}" if self.by else ""
        return f"removed{by} via carod rm: {self.reason}" if self.reason else f"removed{by} via carod rm"


@dataclass(frozen=True)
class Answer:
    node: str
    message_id: str
    #: what the job was doing here: running, waiting (for resources), received, finished
    state: str


def encode_request(request: Request) -> bytes:
    return json.dumps(
        {
            "v": VERSION,
            "action": request.action,
            "message_id": request.message_id,
            "reason": request.reason,
            "by": request.by,
        }
    ).encode()


def decode_request(body: bytes) -> Request:
    """Read a request. Raises ControlError naming what is wrong (a body over MAX_REQUEST_BYTES is not decoded)."""
    if len(body) > MAX_REQUEST_BYTES:
        raise ControlError(f"a body of {len(body)} bytes (at most {MAX_REQUEST_BYTES})")
    data = json_object(body, VERSION, ControlError)
    action, message_id = data.get("action"), data.get("message_id")
    if action not in ACTIONS:
        raise ControlError(f"unknown action {str(action)[:40]!r} (known: {', '.join(ACTIONS)})")
    if not isinstance(message_id, str) or not message_id:
        raise ControlError("no message_id")
    if len(message_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise ControlError(f"a message_id longer than {MAX_ID_BYTES} bytes cannot name a job")
    reason, by = data.get("reason", ""), data.get("by", "")
    if not isinstance(reason, str) or not isinstance(by, str):
        raise ControlError("reason and by must be strings")
    return Request(action, message_id, reason[:MAX_REASON], by[:MAX_BY])


def encode_answer(answer: Answer) -> bytes:
    return json.dumps(
        {"v": VERSION, "node": answer.node, "message_id": answer.message_id, "state": answer.state}
    ).encode()


def decode_answer(body: bytes) -> Answer:
    data = json_object(body, VERSION, ControlError)
    node, message_id, state = data.get("node"), data.get("message_id"), data.get("state")
    if not all(isinstance(v, str) for v in (node, message_id, state)):
        raise ControlError("an answer needs node, message_id and state strings")
    return Answer(str(node), str(message_id), str(state))
