"""carod.wire.control: control messages (carod rm) encoded and decoded, bounded before they are read."""

from __future__ import annotations

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
