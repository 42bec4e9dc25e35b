"""``carod rm``, ``hold`` and ``release`` on this node: who asked, which jobs, and what was done.

The messages and the rule are carod.wire.control; this applies them to the
jobs the node has: running or waiting here (carod.node.arrival.Node) and held
here (carod.node.holding). Every act and every refusal is logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import classad2

from carod.errors import BrokerError
from carod.node import removals
from carod.node.arrival import Node
from carod.node.holding import HeldJob
from carod.node.job import Ending, Job
from carod.wire import adverts, classads, control
from carod.wire.adverts import JobInfo
from carod.wire.control import Answer, Request

log = logging.getLogger("carod.pool")


@dataclass(frozen=True)
class _Target:
    """One job a request may act on: live here (``job``) or held here (``held``)."""

    message_id: str
    owner: str | None
    job: Job | None = None
    held: HeldJob | None = None


async def act(node: Node, request: Request, requester: str | None) -> list[Answer]:
    """Apply ``request`` (from the broker user ``requester``) to this node's jobs; the answers for its caller.

    A request naming a job this node does not have is remembered (rm, hold) and not answered.
    """
    if request.constraint is None:
        target = _named(node, request.message_id)
        if target is None:
            if request.action == control.RELEASE and requester:
                # A hold still waiting for the job: undone, the requester's own (an admin's: every one).
                # Whose job it is is not known yet: another user's release must not undo the owner's hold.
                mine = removals.EVERYONE if requester in node.config.node.admins else requester
                node.removals.discard(request.message_id, mine)
            elif requester:
                why, now = request.why(requester), time.monotonic()
                node.removals.add(request.message_id, why, now, action=request.action, requester=requester)
            return []
        targets = [target]
    else:
        # A constraint selects the jobs the action applies to: release held ones, hold the others.
        targets = [
            target
            for target in _matching(node, request.constraint)
            if request.action == control.RM or (target.held is not None) == (request.action == control.RELEASE)
        ]
    answers = []
    for target in targets:
        refused = control.refusal(requester, target.owner, node.config.node.admins)
        if refused is not None:
            if request.constraint is None:  # a constraint passes over the jobs the requester may not act on
                log.warning(
                    "job=%s carod %s by %s (%s) refused: %s",
                    target.message_id,
                    request.action,
                    requester,
                    request.by or "?",
                    refused,
                )
                answers.append(Answer(node.name, target.message_id, _state(target), request.action, False, refused))
            continue
        answers.append(await _apply(node, request, requester, target))
    return answers


async def _apply(node: Node, request: Request, requester: str | None, target: _Target) -> Answer:
    why = request.why(requester)
    state, ok, reason = _state(target), True, ""
    if request.action == control.RELEASE:
        node.removals.discard(target.message_id)  # a hold remembered here must not hold it again when it comes back
    held = node.holding.get(target.message_id) if target.held is not None else None  # as it is now
    if target.held is not None:
        if held is None or request.action == control.HOLD or held.message_id in node.holding.busy:
            done = "held" if held is not None and request.action == control.HOLD else "being released or removed"
            ok, reason = False, f"it is already {done} on {node.name}"
        else:
            try:
                if request.action == control.RELEASE:
                    state = await node.holding.release(held, why)
                else:
                    state = await node.holding.remove(held, why)
                node.admission.changed.set()  # advertised soon: carod q no longer shows it held
            except BrokerError as exc:
                ok, reason = False, f"the broker did not take it ({exc}); try again"
    elif request.action == control.RELEASE:
        ok, reason = False, f"it is not held (it is {state} on {node.name})"
    else:
        how = Ending.HELD if request.action == control.HOLD else Ending.REMOVED
        state = node.remove(target.message_id, why, how=how) or state
        if state == "finished":
            ok, reason = False, "it has finished; its final reply is on its way"
        else:  # also remembered: a job handed on before it ran (declined, parked) is acted on when it is back
            node.removals.add(target.message_id, why, time.monotonic(), action=request.action, requester=requester)
    log.info(
        "job=%s carod %s by %s (%s): %s%s",
        target.message_id,
        request.action,
        requester,
        request.by or "?",
        state,
        "" if ok else f", not done: {reason}",
    )
    return Answer(node.name, target.message_id, state, request.action, ok, reason)


def _state(target: _Target) -> str:
    if target.held is not None:
        return target.held.state
    job = target.job
    if job is None or job.ending is not None:
        return "stopping"
    return job.state.value


def _named(node: Node, message_id: str) -> _Target | None:
    held = node.holding.get(message_id)
    if held is not None:
        return _Target(message_id, held.owner, held=held)
    job = node.running.get(message_id)
    if job is not None:
        return _Target(message_id, job.envelope.owner, job=job)
    return None


def _matching(node: Node, constraint: str) -> list[_Target]:
    """Every job here (running, waiting, held) the constraint is true for, against its carod q ad."""
    expr = control.check_constraint(constraint)  # checked when the request was read
    found = []
    for held in list(node.holding.held.values()):
        if held.message_id not in node.holding.busy and _true(expr, adverts.query_ad(node.name, held.info)):
            found.append(_Target(held.message_id, held.owner, held=held))
    for mid, job in list(node.running.items()):
        if mid in node.holding.held or job.ending is not None:
            continue
        if _true(expr, adverts.query_ad(node.name, _info(job))):
            found.append(_Target(mid, job.envelope.owner, job=job))
    return found


def _info(job: Job) -> JobInfo:
    """What carod q shows of a live job: its advertised info once it runs; before, from its ad."""
    if job.info is not None:
        return job.info
    ad = job.ad
    owner = classads.evaluate(ad, "Owner") if ad is not None else job.envelope.owner
    cmd = classads.evaluate(ad, "Cmd") if ad is not None else ""
    return JobInfo(
        message_id=job.message_id,
        owner=owner if isinstance(owner, str) else "",
        cmd=cmd if isinstance(cmd, str) else "",
        started=0.0,
        cpus=0.0,
        memory_mib=0.0,
        status=adverts.IDLE,
        attrs={"OwnerVerified": "true" if job.envelope.owner is not None else "false"},
    )


def _true(expr: classad2.ExprTree, ad: classad2.ClassAd) -> bool:
    try:
        return expr.eval(ad) is True
    except (classad2.ClassAdException, ValueError):
        return False
