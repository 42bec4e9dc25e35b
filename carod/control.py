"""Control of jobs by ``message_id`` (``carod rm``): the messages, pure, no I/O.

A request is published to the pool exchange (``[pool] exchange``) with the
routing key ``control``; every node listens there. It is a JSON object::

    {"v": 1, "action": "rm", "message_id": "...", "reason": "...", "by": "alice@host"}

The node running (or holding) the job answers to the request's
``reply_to`` with ``{"v": 1, "node": "n1", "message_id": "...", "state": "running"}``;
nodes that do not have it stay silent, and remember the removal for
``[node] journal_retention_s`` in case the job reaches them later
(docs/operations.md, "Removing jobs").
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from carod.errors import CarodError
from carod.pool import json_object

VERSION = 1
CONTROL_KEY = "control"
ACTIONS = ("rm",)
#: Longest reason kept (it goes into the Removed reply's RemoveReason).
MAX_REASON = 500


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
    data = json_object(body, VERSION, ControlError)
    action, message_id = data.get("action"), data.get("message_id")
    if action not in ACTIONS:
        raise ControlError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    if not isinstance(message_id, str) or not message_id:
        raise ControlError("no message_id")
    reason, by = data.get("reason", ""), data.get("by", "")
    if not isinstance(reason, str) or not isinstance(by, str):
        raise ControlError("reason and by must be strings")
    return Request(action, message_id, reason[:MAX_REASON], by[:100])


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
