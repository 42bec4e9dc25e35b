"""Issue 18 review: hostile AMQP 1.0 sections, decoded without a broker (carod.wire.amqp10)."""

from __future__ import annotations

import contextlib
import time

import pytest
from proton import ulong

from carod.errors import JobHeld
from carod.wire import amqp10, classads
from tests.helpers import amqp10_app_properties


def test_a_body_of_many_empty_sections_is_read_in_time_linear_in_its_size() -> None:
    """decode_body copies the rest of the body for every section: 1 MiB of 4-byte sections took ~8 s.

    Bodies up to 1 MiB are decoded on carod's event loop (carod.node.arrival), whose budget is 20 ms p99.
    """
    body = b"\x00\x53\x77\x40" * (1024 * 1024 // 4)
    started = time.perf_counter()
    with contextlib.suppress(amqp10.Amqp10Error):  # refusing so many sections is an answer too
        amqp10.decode_body(body)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{elapsed:.1f} s for one 1 MiB body"


def test_a_ulong_beyond_a_classad_integer_is_held_naming_the_attribute() -> None:
    """classad2 raises SystemError (not JobHeld) on an int above 2**63-1, which only a 1.0 ulong can bring."""
    headers = amqp10.decode_application_properties(
        amqp10_app_properties({"Cmd": '"/bin/true"', "Big": ulong(2**64 - 1)})
    )
    with pytest.raises(JobHeld, match="Big"):
        classads.ad_from_headers(headers)
