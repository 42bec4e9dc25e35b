"""carod.wire.amqp10: AMQP 1.0 sections as RabbitMQ 3.x packs them into headers, both ways (pure, no broker).

The sections are built with Qpid Proton, as a 1.0 client's library builds them.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from typing import Any

import pytest
from proton import Data, Message, symbol, ulong

from carod.errors import JobHeld
from carod.wire import amqp10
from carod.wire.classads import ad_from_headers, evaluate, header_to_value


def section(code: int, value: Any) -> bytes:
    data = Data()
    data.put_described()
    data.enter()
    data.put_ulong(code)
    data.put_object(value)
    data.exit()
    return bytes(data.encode())


def app_properties(props: dict[Any, Any]) -> bytes:
    return section(0x74, props)


def properties_of(message: Message) -> bytes:
    """The properties section of a 1.0 message, as the plugin puts it in x-amqp-1.0-properties."""
    encoded = bytes(message.encode())
    data = Data()
    offset = 0
    while offset < len(encoded):
        data.clear()
        used = data.decode(encoded[offset:])
        data.rewind()
        data.next()
        if data.get_object().descriptor == ulong(0x73):
            return encoded[offset : offset + used]
        offset += used
    raise AssertionError("no properties section")


def test_the_job_ad_comes_from_the_application_properties() -> None:
    blob = app_properties({"Cmd": '"/bin/echo"', "Arguments": '"Hello Grid!"', "RequestCpus": 1, "Flag": True})
    incoming = amqp10.unpack("mid", "replies", {amqp10.APP_PROPERTIES_HEADER: blob, "x-delivery-count": 0}, b"PK")
    assert incoming.headers == {
        "Cmd": '"/bin/echo"',
        "Arguments": '"Hello Grid!"',
        "RequestCpus": 1,
        "Flag": True,
        "x-delivery-count": 0,
    }
    ad = ad_from_headers(incoming.headers)
    assert evaluate(ad, "Cmd") == "/bin/echo" and evaluate(ad, "RequestCpus") == 1
    assert incoming.body == b"PK" and incoming.message_id == "mid" and incoming.reply_to == "replies"


def test_the_0_9_1_properties_win_and_the_1_0_ones_fill_the_gaps() -> None:
    message = Message(id="from-1.0", reply_to="/queue/r10", correlation_id="c")
    headers = {amqp10.PROPERTIES_HEADER: properties_of(message)}
    assert amqp10.unpack(None, None, headers, b"").message_id == "from-1.0"
    assert amqp10.unpack(None, None, headers, b"").reply_to == "/queue/r10"
    assert amqp10.unpack("from-0-9-1", "q", headers, b"").message_id == "from-0-9-1"
    assert amqp10.unpack("from-0-9-1", "q", headers, b"").reply_to == "q"
    numbered = {amqp10.PROPERTIES_HEADER: properties_of(Message(id=ulong(42)))}
    assert amqp10.unpack(None, None, numbered, b"").message_id == "42"


def test_symbols_and_binary_are_text_and_other_types_are_named_in_the_hold_reason() -> None:
    blob = app_properties({"S": symbol('"sym"'), "B": b'"bin"', "U": uuid.UUID(int=1), "N": None, "D": 1.5})
    headers = amqp10.decode_application_properties(blob)
    assert headers["S"] == '"sym"' and headers["B"] == b'"bin"' and headers["D"] == 1.5
    with pytest.raises(JobHeld, match=r"the job attribute U has an AMQP type .*\(AMQP 1\.0 uuid\)"):
        header_to_value("U", headers["U"])
    with pytest.raises(JobHeld, match=r"\(AMQP 1\.0 null\)"):
        header_to_value("N", headers["N"])


def test_0_9_1_header_types_are_named_as_amqp_names_them() -> None:
    for value, name in (
        ({"a": 1}, "field table"),
        ([1], "field array"),
        (datetime.datetime(2026, 1, 1), "timestamp"),
        (decimal.Decimal("1.5"), "decimal"),
        (None, "void"),
    ):
        with pytest.raises(JobHeld, match=rf"\({name}\)"):
            header_to_value("X", value)


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"\x00St\xd1\x00\x00\x00\xff", "cannot be decoded as AMQP 1.0"),
        (b"garbage", "cannot be decoded as AMQP 1.0"),
        (section(0x73, ["not", "app", "props"]), "does not hold an AMQP 1.0 application-properties section"),
        (section(0x74, ["a", "list"]), "are a list, not a map"),
        (section(0x74, {1: "int key"}), "key is a long, not a string"),
        (app_properties({"A": 1}) + b"\x40", "1 bytes after its end"),
        (app_properties({"A": "x" * 70_000}), "at most 65536"),
    ],
)
def test_a_section_that_cannot_be_read_says_why(blob: bytes, reason: str) -> None:
    with pytest.raises(amqp10.Amqp10Error, match=reason):
        amqp10.unpack("m", "r", {amqp10.APP_PROPERTIES_HEADER: blob}, b"")


def test_a_header_that_is_not_binary_is_refused() -> None:
    with pytest.raises(amqp10.Amqp10Error, match="not binary"):
        amqp10.unpack("m", "r", {amqp10.APP_PROPERTIES_HEADER: 5}, b"")


def test_bodies_sent_as_sections_are_decoded() -> None:
    assert amqp10.decode_body(b"PK\x03\x04zip") == b"PK\x03\x04zip", "a single data section arrives as its bytes"
    assert amqp10.decode_body(section(0x77, b"PK-zip")) == b"PK-zip", "a binary amqp-value"
    assert amqp10.decode_body(section(0x77, None)) == b"", "no body"
    assert amqp10.decode_body(section(0x75, b"PK") + section(0x75, b"-zip")) == b"PK-zip", "several data sections"
    with pytest.raises(amqp10.Amqp10Error, match="amqp-sequence"):
        amqp10.decode_body(section(0x76, [1, 2]))
    with pytest.raises(amqp10.Amqp10Error, match="a map"):
        amqp10.decode_body(section(0x77, {"a": 1}))
    with pytest.raises(amqp10.Amqp10Error, match="cannot be decoded"):
        amqp10.decode_body(b"\x00Sw\xb0\x00\x00\x00\x10short")


def test_replies_become_application_properties_a_1_0_client_reads() -> None:
    headers = {
        "JobStatus": 4,
        "JobState": '"Exited"',
        "ExitCode": 0,
        "RemoteWallClockTime": 0.25,
        "ExitBySignal": False,
        "x-carod-stream": "stdout",
        "x-amqp-1.0-app-properties": b"left out",
    }
    blob = amqp10.app_properties_header(headers)
    decoded = amqp10.decode_application_properties(blob)
    assert decoded == {
        "JobStatus": 4,
        "JobState": '"Exited"',
        "ExitCode": 0,
        "RemoteWallClockTime": 0.25,
        "ExitBySignal": False,
        "x-carod-stream": "stdout",
    }
    message = Message()
    message.decode(blob + section(0x75, b"zip"))
    assert message.properties["JobStatus"] == 4 and message.properties["JobState"] == '"Exited"'


def test_only_messages_from_1_0_clients_are_unpacked() -> None:
    assert not amqp10.is_amqp10({"Cmd": '"/bin/true"'})
    assert amqp10.is_amqp10({amqp10.APP_PROPERTIES_HEADER: b""})
    assert amqp10.is_amqp10({amqp10.PROPERTIES_HEADER: b""})


def _nested_lists(depth: int) -> bytes:
    inner = b"\x40"  # null
    for _ in range(depth):
        inner = b"\xd0" + (len(inner) + 4).to_bytes(4, "big") + (1).to_bytes(4, "big") + inner
    return inner


def test_deeply_nested_values_cost_nothing_and_are_refused_by_their_type() -> None:
    """A hostile sender nests lists thousands deep inside 64 KiB: never decoded recursively, never a crash."""
    nested = _nested_lists(6000)
    key = b"\xa1\x03Tag"
    entries = key + nested
    props = b"\x00\x53\x74\xd1" + (len(entries) + 4).to_bytes(4, "big") + (2).to_bytes(4, "big") + entries
    assert len(props) < amqp10.MAX_SECTION_BYTES
    decoded = amqp10.decode_application_properties(props)
    with pytest.raises(JobHeld, match=r"\(AMQP 1\.0 list\)"):
        header_to_value("Tag", decoded["Tag"])
    with pytest.raises(amqp10.Amqp10Error, match="a list"):
        amqp10.decode_body(b"\x00\x53\x77" + nested)
    with pytest.raises(amqp10.Amqp10Error):
        amqp10.unpack(None, None, {amqp10.PROPERTIES_HEADER: b"\x00\x53\x73" + nested}, b"")


def test_the_work_of_decoding_is_counted_before_it_is_done() -> None:
    """The node decodes a message off the event loop when this is large (a 60 KB section costs ~45 ms to read)."""
    blob = app_properties({f"A{i}": i for i in range(100)})
    assert amqp10.work_bytes({amqp10.APP_PROPERTIES_HEADER: blob}, b"PK-zip") == len(blob)
    encoded_body = section(0x77, b"x" * 1000)
    assert amqp10.work_bytes({amqp10.PROPERTIES_HEADER: bytearray(10)}, encoded_body) == 10 + len(encoded_body)
    assert amqp10.work_bytes({amqp10.APP_PROPERTIES_HEADER: 5}, b"") == 0


def test_application_properties_cannot_overwrite_the_brokers_transport_headers() -> None:
    blob = app_properties({"Cmd": '"/bin/true"', "x-delivery-count": 0, "x-carod-offers": 9})
    incoming = amqp10.unpack("m", "r", {amqp10.APP_PROPERTIES_HEADER: blob, "x-delivery-count": 3}, b"")
    assert incoming.headers["x-delivery-count"] == 3
    assert incoming.headers["x-carod-offers"] == 9  # as a 0-9-1 sender could set it
