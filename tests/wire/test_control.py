"""carod.wire.control: control messages (carod rm) encoded and decoded, bounded before they are read."""

from __future__ import annotations

import json

import pytest

from carod.wire import control


def test_control_messages_round_trip_and_bad_ones_are_named() -> None:
    request = control.Request("rm", "job-1", "wrong input", "alice@host")
    assert control.decode_request(control.encode_request(request)) == request
    assert request.remove_reason() == "removed by alice@host via carod rm: wrong input"
    answer = control.Answer("n1", "job-1", "running")
    assert control.decode_answer(control.encode_answer(answer)) == answer
    for body, why in (
        (b"nope", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"v": 1, "action": "explode", "message_id": "x"}', "unknown action"),
        (b'{"v": 1, "action": "rm"}', "no message_id"),
        (b'{"v": 2, "action": "rm", "message_id": "x"}', "unknown version"),
    ):
        with pytest.raises(control.ControlError, match=why):
            control.decode_request(body)


def rm(message_id: str, reason: str = "test") -> bytes:
    return control.encode_request(control.Request("rm", message_id, reason, "mallory"))


# ---------------------------------------------------------------- pure


# ---------------------------------------------------------------- bounds (issue 14)


def test_decode_request_bounds() -> None:
    assert control.decode_request(rm("m" * 255)).message_id == "m" * 255
    with pytest.raises(control.ControlError, match="longer than 255 bytes"):
        control.decode_request(rm("é" * 128))  # 256 bytes in UTF-8
    with pytest.raises(control.ControlError, match="a body of"):
        control.decode_request(rm("m", reason="r" * 10_000))
    body = json.dumps({"v": 1, "action": "x" * 5000, "message_id": "m"}).encode()
    with pytest.raises(control.ControlError, match="unknown action") as info:
        control.decode_request(body)
    assert len(str(info.value)) < 200  # what is logged stays short
    long_reason = json.dumps({"v": 1, "action": "rm", "message_id": "m", "reason": "r" * 2000, "by": "b" * 500})
    request = control.decode_request(long_reason.encode())
    assert len(request.reason) == control.MAX_REASON and len(request.by) == control.MAX_BY


# ---------------------------------------------------------------- hold, release, constraints, who may act (issue 17)


def test_hold_release_and_constraint_requests_round_trip() -> None:
    for request in (
        control.Request(control.HOLD, "job-1", "maintenance", "alice@host"),
        control.Request(control.RELEASE, "job-1", "", ""),
        control.Request(control.RM, "", "all of mine", "alice@host", control.ALL),
        control.Request(control.HOLD, "", "", "", 'Owner == "alice" && JobStatus == 2'),
    ):
        assert control.decode_request(control.encode_request(request)) == request
    answer = control.Answer("n1", "job-1", "running", control.HOLD, False, "not yours")
    assert control.decode_answer(control.encode_answer(answer)) == answer
    # An answer from an older node (rm only, no action/ok/reason) still reads as a done removal.
    old = control.decode_answer(b'{"v": 1, "node": "n1", "message_id": "m", "state": "running"}')
    assert (old.action, old.ok, old.reason) == ("rm", True, "")


def test_the_reason_says_what_was_done_by_whom() -> None:
    hold = control.Request(control.HOLD, "m", "maintenance", "alice@host")
    assert hold.why("alice") == "held by alice@host (broker user alice) via carod hold: maintenance"
    assert hold.why() == "held by alice@host via carod hold: maintenance"
    assert control.Request(control.RELEASE, "m", "", "").why("bob") == "released by bob via carod release"
    rm = control.Request(control.RM, "m", "x", "alice@host")
    assert rm.why("alice@host") == "removed by alice@host via carod rm: x"


def test_who_may_act_owner_or_admin_never_without_user_id() -> None:
    admins = ("ops",)
    assert control.refusal("alice", "alice", admins) is None
    assert control.refusal("ops", "alice", admins) is None
    assert control.refusal("ops", None, admins) is None
    refused = control.refusal("eve", "alice", admins)
    assert refused is not None and "belongs to alice; eve is neither its owner nor an admin" in refused
    refused = control.refusal("alice", None, admins)
    assert refused is not None and "no verified owner" in refused
    for nobody in (None, ""):
        refused = control.refusal(nobody, "alice", admins)
        assert refused is not None and "no user_id" in refused


def test_constraints_are_bounded_before_any_node_evaluates_them() -> None:
    def request(constraint: object, **more: object) -> bytes:
        return json.dumps({"v": 1, "action": "rm", "constraint": constraint, **more}).encode()

    assert control.decode_request(request("TRUE")).constraint == "TRUE"
    for body, why in (
        (request("Owner =="), "does not parse"),
        (request(7), "must be a string"),
        (request("TRUE", message_id="m"), "not both"),
        (request('size("' + "x" * 4100 + '") > 0'), "a constraint of"),
        (b'{"v": 1, "action": "rm", "message_id": ""}', "no message_id"),
    ):
        with pytest.raises(control.ControlError, match=why):
            control.decode_request(body)
    # Cheap by construction (carod.wire.adcost): a constraint that would cost a node too much is refused.
    costly = "strcat(" + ", ".join(['"' + "y" * 60 + '"'] * 40) + ")"
    doubled = " + ".join([f"size({costly})"] * 30) + " > 0"
    with pytest.raises(control.ControlError):
        control.check_constraint(doubled)
