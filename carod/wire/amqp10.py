"""Jobs from AMQP 1.0 clients (Qpid Proton, Qpid JMS, AMQP.Net Lite ...) through RabbitMQ 3.x, and replies for them.

Pure: bytes in, values out, with Qpid Proton's codec (``proton.Data``); no I/O.

RabbitMQ 3.x's AMQP 1.0 plugin hands a 1.0 message to 0-9-1 consumers with
its sections packed into headers (docs/protocol.md, "AMQP 1.0 clients"):

* ``x-amqp-1.0-app-properties``: the encoded application-properties section,
  where a 1.0 client puts the job ad (``Cmd``, ``Arguments``, ...);
* ``x-amqp-1.0-properties``: the encoded properties section (message-id,
  reply-to, correlation-id ...), which the plugin also copies into the 0-9-1
  properties where it can;
* the body: a single data section arrives as its bytes; any other body
  (an amqp-value, several sections) arrives encoded.

The other way, a 0-9-1 message with an ``x-amqp-1.0-app-properties`` header
reaches a 1.0 consumer with that section as its application-properties
(checked on RabbitMQ 3.10.8), so carod adds the header, encoded from the
reply's own headers, to replies for jobs that came over 1.0 (and only to
those: 0-9-1 clients' replies stay as they are). RabbitMQ 4.x delivers
application-properties as plain headers, and nothing here is needed.

What a message chose is hostile: a section is at most
:data:`MAX_SECTION_BYTES` before it is decoded, must be the section it
claims to be, and application-properties must map strings to values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from carod.errors import CarodError
from carod.wire.message import SHORTSTR_BYTES

APP_PROPERTIES_HEADER = "x-amqp-1.0-app-properties"
PROPERTIES_HEADER = "x-amqp-1.0-properties"
#: Largest encoded section decoded at all (RabbitMQ's default frame_max is 128 KiB for all headers together).
MAX_SECTION_BYTES = 64 * 1024
#: Largest body decoded from 1.0 sections (a body arrives encoded only when it is not a single data section).
MAX_BODY_BYTES = 1024 * 1024 * 1024
#: Most sections in a body (a client sends one amqp-value or a few data sections).
MAX_BODY_SECTIONS = 64
#: Longest message-id, in UTF-8 bytes: it is the replies' AMQP 0-9-1 correlation_id, a short string.
MAX_ID_BYTES = SHORTSTR_BYTES

# Section descriptors (AMQP 1.0, part 3.2).
_PROPERTIES = 0x73
_APPLICATION_PROPERTIES = 0x74
_DATA = 0x75
_AMQP_SEQUENCE = 0x76
_AMQP_VALUE = 0x77
#: A described type with a small-ulong descriptor, as every section starts: 0x00 0x53 <code>.
_SECTION_PREFIX = b"\x00\x53"


class Amqp10Error(CarodError):
    """An AMQP 1.0 section that cannot be read; the message says which and why."""


@dataclass(frozen=True)
class Unreadable:
    """An application property of an AMQP 1.0 type a ClassAd cannot hold (named for the hold reason)."""

    amqp_type: str


@dataclass(frozen=True)
class Incoming:
    """A job message as a 1.0 client sent it."""

    message_id: str | None
    reply_to: str | None
    #: the job ad's attributes (application-properties over any plain headers) and the transport headers
    headers: dict[str, object]
    body: bytes


def is_amqp10(headers: Mapping[str, object]) -> bool:
    """Did the message come from an AMQP 1.0 client through RabbitMQ 3.x?"""
    return APP_PROPERTIES_HEADER in headers or PROPERTIES_HEADER in headers


def work_bytes(headers: Mapping[str, object], body: bytes) -> int:
    """About how many bytes :func:`unpack` decodes for this message (its 1.0 headers, and its body if encoded)."""
    size = sum(
        len(v) for k in (APP_PROPERTIES_HEADER, PROPERTIES_HEADER) if isinstance(v := headers.get(k), bytes | bytearray)
    )
    return size + (len(body) if _encoded(body) else 0)


def unpack(message_id: str | None, reply_to: str | None, headers: Mapping[str, object], body: bytes) -> Incoming:
    """The job message a 1.0 client sent. Raises Amqp10Error naming what cannot be read.

    The 0-9-1 properties win where present (the plugin fills them in);
    the 1.0 properties fill the gaps. Whatever the codec raises on bytes it
    cannot take is an Amqp10Error too: the message is answered, never left unsettled.
    """
    from proton import ProtonException

    try:
        return _unpack(message_id, reply_to, headers, body)
    except Amqp10Error:
        raise
    except (ProtonException, RecursionError, ValueError, TypeError, LookupError, OverflowError) as exc:
        raise Amqp10Error(f"its AMQP 1.0 sections cannot be read ({type(exc).__name__}: {exc})"[:300]) from None


def _unpack(message_id: str | None, reply_to: str | None, headers: Mapping[str, object], body: bytes) -> Incoming:
    merged: dict[str, object] = {
        k: v for k, v in headers.items() if k not in (APP_PROPERTIES_HEADER, PROPERTIES_HEADER)
    }
    blob = headers.get(APP_PROPERTIES_HEADER)
    if blob is not None:
        for key, value in decode_application_properties(_bytes(blob, APP_PROPERTIES_HEADER)).items():
            if key.startswith("x-") and key in merged:
                continue  # the broker's own transport headers (x-death, x-delivery-count) are not the sender's
            merged[key] = value
    blob = headers.get(PROPERTIES_HEADER)
    if blob is not None and (not message_id or not reply_to):
        props = decode_properties(_bytes(blob, PROPERTIES_HEADER))
        message_id = message_id or props.get("message-id")
        reply_to = reply_to or props.get("reply-to")
        if message_id is not None and len(message_id.encode("utf-8", "surrogateescape")) > MAX_ID_BYTES:
            # It becomes the replies' correlation_id, an AMQP 0-9-1 short string (RabbitMQ leaves such
            # an id out of the 0-9-1 message_id too).
            size = len(message_id.encode("utf-8", "surrogateescape"))
            raise Amqp10Error(
                f"its message-id is {size} bytes long; the replies' correlation_id (AMQP 0-9-1) "
                f"carries at most {MAX_ID_BYTES}: send the job with a shorter message-id"
            )
    return Incoming(message_id, reply_to, merged, decode_body(body))


def decode_application_properties(blob: bytes) -> dict[str, object]:
    """The application-properties section: string keys, values as Python values (Unreadable for the rest).

    Walked one level, never recursively: a value that is itself a list, map, array or described
    value (which application-properties may not hold) is Unreadable without being decoded, so a
    deeply nested one costs nothing.
    """
    data = _decoded(blob, _APPLICATION_PROPERTIES, "application-properties")
    kind = data.type()
    if kind != data.MAP:
        raise Amqp10Error(f"its application-properties are a {_data_type_name(kind)}, not a map")
    count = data.get_map()
    data.enter()
    out: dict[str, object] = {}
    try:
        for _ in range(count // 2):
            data.next()
            if data.type() not in (data.STRING, data.SYMBOL):
                raise Amqp10Error(f"an application-properties key is a {_data_type_name(data.type())}, not a string")
            key = str(data.get_object())
            data.next()
            if data.type() in (data.LIST, data.MAP, data.ARRAY, data.DESCRIBED):
                out[key] = Unreadable(_data_type_name(data.type()))
            else:
                out[key] = _plain(_binary(data.get_object()))
    finally:
        data.exit()
    return out


def decode_properties(blob: bytes) -> dict[str, str]:
    """message-id and reply-to from the properties section (as text), where set (carod answers by message-id)."""
    value = _section(blob, _PROPERTIES, "properties")
    if not isinstance(value, list):
        raise Amqp10Error(f"its properties are a {_type_name(value)}, not a list")
    out: dict[str, str] = {}
    for index, name in ((0, "message-id"), (4, "reply-to")):
        if index < len(value) and value[index] is not None:
            item = _binary(value[index])
            if isinstance(item, bytes):
                out[name] = item.decode("utf-8", "replace")
            elif isinstance(item, int):
                out[name] = str(int(item))  # a ulong message-id
            else:
                out[name] = str(item)
    return out


def decode_body(body: bytes) -> bytes:
    """The message's payload: a body that arrived as 1.0 sections is decoded (data and binary values)."""
    if not _encoded(body):
        return body  # a single data section arrives as its bytes
    if len(body) > MAX_BODY_BYTES:
        raise Amqp10Error(f"its encoded body is {len(body)} bytes long (at most {MAX_BODY_BYTES})")
    data = _new_data()
    parts: list[bytes] = []
    offset = 0
    view = memoryview(body)
    sections = 0
    while offset < len(body):
        sections += 1
        if sections > MAX_BODY_SECTIONS:
            raise Amqp10Error(f"its body has more than {MAX_BODY_SECTIONS} AMQP 1.0 sections")
        data.clear()
        try:
            used = data.decode(view[offset:])  # a view, not a copy of the rest of the body
        except Exception as exc:  # proton.DataException and its kin: the bytes are not AMQP 1.0
            raise Amqp10Error(f"its body cannot be decoded as AMQP 1.0 sections ({exc})") from None
        if used <= 0:
            raise Amqp10Error("its body cannot be decoded as AMQP 1.0 sections")
        offset += used
        data.rewind()
        code: int | None = None
        kind = None
        if data.next() == data.DESCRIBED:
            data.enter()
            data.next()
            descriptor = data.get_object()
            code = int(descriptor) if isinstance(descriptor, int) else None
            kind = data.next()
        # Only flat values are read: a nested one is refused by its type, never decoded (no recursion).
        if code in (_DATA, _AMQP_VALUE) and kind == data.BINARY:
            parts.append(bytes(data.get_binary()))
        elif code == _AMQP_VALUE and kind == data.NULL:
            continue
        elif code == _AMQP_VALUE and kind == data.STRING:
            parts.append(str(data.get_string()).encode("utf-8"))
        else:
            what = "an amqp-sequence" if code == _AMQP_SEQUENCE else f"a {_data_type_name(kind) if kind else 'value'}"
            raise Amqp10Error(
                f"its body is {what}; send the input zip as binary data (a data section or a binary amqp-value)"
            )
    return b"".join(parts)


def app_properties_header(headers: Mapping[str, object]) -> bytearray:
    """``headers`` encoded as an application-properties section, for :data:`APP_PROPERTIES_HEADER`.

    A bytearray: the AMQP 0-9-1 client library (pamqp) encodes that as a byte array header, and refuses bytes.

    Only the values an AMQP 1.0 map can hold as they are (strings, numbers, booleans, binary);
    carod's replies hold nothing else.
    """
    data = _new_data()
    data.put_described()
    data.enter()
    data.put_ulong(_APPLICATION_PROPERTIES)
    data.put_map()
    data.enter()
    for key, value in headers.items():
        if key.startswith("x-amqp-1.0-"):
            continue
        if isinstance(value, bool):
            data.put_string(key)
            data.put_bool(value)
        elif isinstance(value, int):
            data.put_string(key)
            data.put_long(value)
        elif isinstance(value, float):
            data.put_string(key)
            data.put_double(value)
        elif isinstance(value, str):
            data.put_string(key)
            data.put_string(str(value))
        elif isinstance(value, bytes | bytearray):
            data.put_string(key)
            data.put_binary(bytes(value))
    data.exit()
    data.exit()
    return bytearray(data.encode())


# ---------------------------------------------------------------- helpers


def _encoded(body: bytes) -> bool:
    """The body arrived as encoded 1.0 body sections (not the bytes of a single data section)."""
    return len(body) >= 3 and body.startswith(_SECTION_PREFIX) and body[2] in (_DATA, _AMQP_VALUE, _AMQP_SEQUENCE)


def _new_data() -> Any:
    from proton import Data  # the codec is loaded on the first 1.0 message, not at start

    return Data()


def _bytes(blob: object, header: str) -> bytes:
    if isinstance(blob, bytes | bytearray):
        return bytes(blob)
    raise Amqp10Error(f"its {header} header is a {_type_name(blob)}, not binary")


def _section(blob: bytes, code: int, name: str) -> Any:
    """The value of the section ``blob`` holds (decoded whole: for small, flat sections only)."""
    data = _decoded(blob, code, name)
    try:
        return _copied(data.get_object())
    except RecursionError:
        raise Amqp10Error(f"its {name} section nests too deeply") from None


def _decoded(blob: bytes, code: int, name: str) -> Any:
    """A proton Data positioned on the value of the section ``blob`` holds; Amqp10Error unless it is that section."""
    if len(blob) > MAX_SECTION_BYTES:
        raise Amqp10Error(f"its {name} section is {len(blob)} bytes long (at most {MAX_SECTION_BYTES})")
    data = _new_data()
    try:
        used = data.decode(blob)
    except Exception as exc:  # proton.DataException and its kin: the bytes are not AMQP 1.0
        raise Amqp10Error(f"its {name} section cannot be decoded as AMQP 1.0 ({exc})") from None
    if used != len(blob):
        raise Amqp10Error(f"its {name} section has {len(blob) - used} bytes after its end")
    data.rewind()
    if data.next() != data.DESCRIBED:
        raise Amqp10Error(f"its {name} header does not hold an AMQP 1.0 {name} section")
    data.enter()
    data.next()
    descriptor = data.get_object()
    if not isinstance(descriptor, int) or int(descriptor) != code:
        raise Amqp10Error(f"its {name} header does not hold an AMQP 1.0 {name} section")
    data.next()
    return data


def _descriptor(value: object) -> int | None:
    descriptor = getattr(value, "descriptor", None)
    if isinstance(descriptor, int):
        return int(descriptor)
    return None


#: AMQP 1.0 type names of the values proton decodes that a ClassAd cannot hold (for hold reasons).
_TYPE_NAMES = {
    "NoneType": "null",
    "UUID": "uuid",
    "timestamp": "timestamp",
    "Decimal32": "decimal32",
    "Decimal64": "decimal64",
    "Decimal128": "decimal128",
    "list": "list",
    "dict": "map",
    "Array": "array",
    "Described": "described value",
    "char": "char",
    "symbol": "symbol",
    "bytes": "binary",
    "str": "string",
    "int": "long",
    "float": "double",
    "bool": "boolean",
}


def _binary(value: object) -> object:
    """Proton hands binary values out as memoryviews into its own buffer: copied to bytes while that lives."""
    return bytes(value) if isinstance(value, memoryview) else value


def _copied(value: Any) -> Any:
    """``value`` with every binary in it copied out of proton's buffer (before the Data is gone)."""
    if isinstance(value, dict):
        return {_copied(k): _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return _binary(value)


def _data_type_name(code: int) -> str:
    """The AMQP 1.0 name of proton's type code ``code`` (for values that are not decoded)."""
    from proton import Data

    names = {name: name.lower() for name in ("LIST", "MAP", "ARRAY", "SYMBOL", "STRING", "BINARY", "LONG", "NULL")}
    names["DESCRIBED"] = "described value"
    for attribute, name in names.items():
        if getattr(Data, attribute) == code:
            return name
    return "value"


def _type_name(value: object) -> str:
    name = type(value).__name__
    return _TYPE_NAMES.get(name, name)


def _plain(value: object) -> object:
    """A 1.0 application-property value as a header value carod reads, or Unreadable."""
    value = _binary(value)
    kind = type(value).__name__
    if kind in ("timestamp", "UUID") or isinstance(value, list | dict) or value is None:
        return Unreadable(_type_name(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)  # strings, symbols and chars are text
    if isinstance(value, bytes):
        return bytes(value)
    return Unreadable(_type_name(value))
