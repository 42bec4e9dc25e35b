"""Control of jobs (``carod rm``, ``carod hold``, ``carod release``): the messages and the rule, pure, no I/O.

A request is published to the pool exchange (``[pool] exchange``) with the
routing key ``control``; every node listens there. It is a JSON object::

    {"v": 1, "action": "hold", "message_id": "...", "reason": "...", "by": "alice@host"}
    {"v": 1, "action": "rm", "constraint": "Owner == \\"alice\\"", "reason": "..."}

``action`` is ``rm``, ``hold`` or ``release``. A request names one job
(``message_id``) or every job a ``constraint`` (ClassAd expression text,
evaluated against each job's :func:`carod.wire.adverts.query_ad`) is true for;
``carod rm -a`` sends the constraint ``TRUE``.

**Who may act** (:func:`refusal`): the requester is the request message's
``user_id`` property, which RabbitMQ validates against the publishing
connection's user; ``by`` is only a label for the reason. A node acts for the
job's owner (its verified ``Owner``: the job message's validated ``user_id``,
carod.wire.message) or for a user listed in ``[node] admins``. A request with
no ``user_id`` is refused; so is one for a job with no verified owner, unless
the requester is an admin. Refusals of a request that names a job are answered
(``ok`` false, ``reason``) and logged; a constraint acts on the jobs the
requester may act on and passes the others over in silence.

The node that has the job (running, waiting there, or held by it) answers to
the request's ``reply_to``::

    {"v": 1, "node": "n1", "message_id": "...", "state": "running", "action": "hold", "ok": true, "reason": ""}

Nodes that do not have a job a request names stay silent and remember an ``rm``
or a ``hold`` (with its requester, checked when the job arrives) for
``[node] journal_retention_s`` (docs/operations.md), at most ``[node]
max_removals`` of them (carod.node.removals).

What one request can cost a node is bounded: a body of at most
:data:`MAX_REQUEST_BYTES` (refused before it is decoded), a ``message_id`` of at
most :data:`MAX_ID_BYTES`, a constraint of at most :data:`MAX_CONSTRAINT_BYTES`
whose evaluation is bounded by construction (carod.wire.adcost), a reason of at
most :data:`MAX_REASON` characters.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass

import classad2

from carod.errors import CarodError
from carod.wire import adcost
from carod.wire.adverts import json_object
from carod.wire.message import SHORTSTR_BYTES

VERSION = 1
CONTROL_KEY = "control"
RM, HOLD, RELEASE = "rm", "hold", "release"
ACTIONS = (RM, HOLD, RELEASE)
#: Longest reason kept (it goes into the reply's RemoveReason, HoldReason or LastVacateReason).
MAX_REASON = 500
#: Longest ``by`` kept.
MAX_BY = 100
#: Longest message_id, in UTF-8 bytes: an AMQP 0-9-1 message-id is a short string.
MAX_ID_BYTES = SHORTSTR_BYTES
#: Longest constraint, in UTF-8 bytes.
MAX_CONSTRAINT_BYTES = 4096
#: Largest request body read at all.
MAX_REQUEST_BYTES = 8 * 1024
#: The constraint of ``-a``: every job the requester may act on.
ALL = "TRUE"
_PAST = {RM: "removed", HOLD: "held", RELEASE: "released"}


class ControlError(CarodError):
    """A control message that cannot be read."""


@dataclass(frozen=True)
class Request:
    action: str
    #: the job (empty when ``constraint`` selects them)
    message_id: str
    reason: str
    by: str = ""
    #: ClassAd expression text selecting jobs (None: ``message_id`` names one)
    constraint: str | None = None

    def why(self, requester: str | None = None) -> str:
        """The reason the job's reply carries: what was done, by whom, and the requester's reason."""
        who = self.by or requester or ""
        if requester and self.by and requester != self.by:
            who = f"{self.by} (broker user {requester})"
        by = f" by {who}" if who else ""
        text = f"{_PAST[self.action]}{by} via carod {self.action}"
        return f"{text}: {self.reason}" if self.reason else text

    def remove_reason(self) -> str:
        return self.why()


@dataclass(frozen=True)
class Answer:
    node: str
    message_id: str
    #: what the job was doing here: running, waiting (for resources), received, finished, held, released
    state: str
    action: str = RM
    #: the node acted (False: refused, ``reason`` says why)
    ok: bool = True
    reason: str = ""


def refusal(requester: str | None, owner: str | None, admins: Collection[str]) -> str | None:
    """Why ``requester`` may not act on a job owned by ``owner`` (None: it may).

    ``requester``: the request's validated user_id; ``owner``: the job's verified owner (None: nobody in particular).
    """
    if not requester:
        return "the request has no user_id (the broker validates it; carod's client sets it): nobody to act for"
    if requester in admins:
        return None
    if owner is None:
        return f"the job has no verified owner, so only an admin ([node] admins) may act on it; {requester} is not one"
    if requester != owner:
        return f"the job belongs to {owner}; {requester} is neither its owner nor an admin ([node] admins)"
    return None


def check_constraint(text: str) -> classad2.ExprTree:
    """The constraint parsed, if it is small and cheap to evaluate by construction. Raises ControlError."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONSTRAINT_BYTES:
        raise ControlError(f"a constraint of {size} bytes (at most {MAX_CONSTRAINT_BYTES})")
    try:
        expr = classad2.ExprTree(text)
    except (classad2.ClassAdException, ValueError) as exc:
        raise ControlError(f"the constraint does not parse: {str(exc)[:100]}") from exc
    found = adcost.problem({"Constraint": text}, forbidden=frozenset())
    if found is not None:
        raise ControlError(f"the constraint {found[1]}")
    return expr


def encode_request(request: Request) -> bytes:
    data: dict[str, object] = {
        "v": VERSION,
        "action": request.action,
        "message_id": request.message_id,
        "reason": request.reason,
        "by": request.by,
    }
    if request.constraint is not None:
        data["constraint"] = request.constraint
    return json.dumps(data).encode()


def decode_request(body: bytes) -> Request:
    """Read a request. Raises ControlError naming what is wrong (a body over MAX_REQUEST_BYTES is not decoded)."""
    if len(body) > MAX_REQUEST_BYTES:
        raise ControlError(f"a body of {len(body)} bytes (at most {MAX_REQUEST_BYTES})")
    data = json_object(body, VERSION, ControlError)
    action, message_id, constraint = data.get("action"), data.get("message_id", ""), data.get("constraint")
    if action not in ACTIONS:
        raise ControlError(f"unknown action {str(action)[:40]!r} (known: {', '.join(ACTIONS)})")
    if not isinstance(message_id, str):
        raise ControlError("message_id must be a string")
    if constraint is not None:
        if not isinstance(constraint, str):
            raise ControlError("constraint must be a string")
        if message_id:
            raise ControlError("a request has a message_id or a constraint, not both")
        check_constraint(constraint)
    elif not message_id:
        raise ControlError("no message_id")
    if len(message_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise ControlError(f"a message_id longer than {MAX_ID_BYTES} bytes cannot name a job")
    reason, by = data.get("reason", ""), data.get("by", "")
    if not isinstance(reason, str) or not isinstance(by, str):
        raise ControlError("reason and by must be strings")
    return Request(str(action), message_id, reason[:MAX_REASON], by[:MAX_BY], constraint)


def encode_answer(answer: Answer) -> bytes:
    return json.dumps(
        {
            "v": VERSION,
            "node": answer.node,
            "message_id": answer.message_id,
            "state": answer.state,
            "action": answer.action,
            "ok": answer.ok,
            "reason": answer.reason,
        }
    ).encode()


def decode_answer(body: bytes) -> Answer:
    data = json_object(body, VERSION, ControlError)
    node, message_id, state = data.get("node"), data.get("message_id"), data.get("state")
    action, ok, reason = data.get("action", RM), data.get("ok", True), data.get("reason", "")
    if not all(isinstance(v, str) for v in (node, message_id, state, action, reason)) or not isinstance(ok, bool):
        raise ControlError("an answer needs node, message_id, state, action and reason strings and a boolean ok")
    return Answer(str(node), str(message_id), str(state), str(action), ok, str(reason))
