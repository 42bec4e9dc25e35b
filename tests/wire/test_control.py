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
