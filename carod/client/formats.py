"""``carod q -af``, ``-format`` and ``-constraint``: condor_q's custom output, pure (no I/O).

Each job is seen as its q ad (:func:`carod.wire.adverts.query_ad`). What the user
types is parsed once, up front (:func:`selection`): an ``-af`` or ``-format``
argument is an attribute name or any ClassAd expression, a ``-constraint`` an
expression; one that does not parse is refused with :class:`FormatError` before
the pool is asked.

As condor_q prints them (its ClassAd pretty printer):

* ``-af A B ...``: one line per job, the values separated by one space; a
  string without quotes, ``true``/``false``, numbers as ClassAd writes them,
  a missing attribute ``undefined`` (``error`` for an error);
* ``-format FMT ATTR`` (repeatable, printed in order, no newline added): FMT
  is printf(3) with one conversion. ``%s`` prints a string as is and any
  other value as ``-af`` does; ``%d``/``%i``/``%u``/``%x``/``%o``/``%c`` an
  integer (reals truncated, booleans 1/0); ``%f``/``%e``/``%g`` a number;
  ``%v`` as ``-af``, ``%V`` with strings quoted. A value the conversion
  cannot take (UNDEFINED for ``%s``, a string for ``%d``) prints nothing for
  that format, its literal text included, as condor_q does. C escapes in FMT
  (``\\n``, ``\\t``, ``\\\\``, ``\\"``, octal ``\\NNN``) are interpreted, since
  the shell passes them through literally.

Text that comes from an advert (a chirped value, a command) is foreign: its
control characters are printed escaped (``\\n``, ``\\x1b``), so a value can
neither add a line nor send the terminal escape sequences.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import classad2

from carod.errors import CarodError
from carod.wire import classads

#: Widest field or precision a -format conversion may ask for.
MAX_FORMAT_WIDTH = 1024

#: One printf conversion: flags, width, precision, C length modifiers (ignored), the conversion.
_CONVERSION = re.compile(
    r"%(?P<flags>[-+ #0]*)(?P<width>\d+)?(?:\.(?P<precision>\d+))?(?:hh|h|ll|l|L|q|j|z|t)?(?P<conv>[diouxXeEfFgGcsvV%])"
)
_ESCAPE = re.compile(r"\\(?:(?P<octal>[0-7]{1,3})|x(?P<hex>[0-9A-Fa-f]{1,2})|(?P<char>.))", re.DOTALL)
_C_ESCAPES = {
    "n": "\n",
    "t": "\t",
    "r": "\r",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "?": "?",
}
#: C0 controls, DEL and C1 controls: what a foreign value may not put on the user's terminal.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED_CONTROLS = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


class FormatError(CarodError):
    """A -af, -format or -constraint argument that cannot be used (says which and why)."""


class _Missing:
    """UNDEFINED or ERROR as an evaluation result."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNDEFINED = _Missing("undefined")
ERROR = _Missing("error")


@dataclass(frozen=True)
class Column:
    """One thing to print for each job: an attribute or expression, and (``-format``) its printf format."""

    text: str
    expr: classad2.ExprTree
    fmt: str | None = None


@dataclass(frozen=True)
class Selection:
    """What ``carod q`` was asked to show: which jobs (constraints) and how (``-af`` or ``-format``)."""

    constraints: tuple[classad2.ExprTree, ...] = ()
    autoformat: tuple[Column, ...] = ()
    formats: tuple[Column, ...] = ()

    def wants(self, ad: classad2.ClassAd) -> bool:
        """Every constraint is true for this job (HTCondor's EvalBool: true or a non-zero number)."""
        return all(classads.is_true(_evaluate(expr, ad)) for expr in self.constraints)

    def line(self, ad: classad2.ClassAd) -> str:
        """The job's output: ``-af`` values and a newline, or the ``-format`` pieces as they are."""
        if self.autoformat:
            return " ".join(safe(value_text(evaluate(col, ad))) for col in self.autoformat) + "\n"
        return "".join(printf(col.fmt or "", evaluate(col, ad)) for col in self.formats)


def selection(
    constraints: Sequence[str] = (), autoformat: Sequence[str] = (), formats: Sequence[Sequence[str]] = ()
) -> Selection:
    """Parse the command line's arguments once. Raises FormatError naming the bad one."""
    parsed = tuple(_expression(text, "-constraint") for text in constraints)
    af = tuple(Column(text, _expression(text, "-af")) for text in autoformat)
    fm = []
    for pair in formats:
        fmt, text = pair
        template = unescape(fmt)
        if len(_CONVERSION.findall(template.replace("%%", ""))) > 1:
            raise FormatError(f"-format {fmt!r}: more than one conversion (repeat -format, one per attribute)")
        for match in _CONVERSION.finditer(template):
            for part in ("width", "precision"):
                if match.group(part) and int(match.group(part)) > MAX_FORMAT_WIDTH:
                    raise FormatError(f"-format {fmt!r}: a {part} over {MAX_FORMAT_WIDTH}")
        fm.append(Column(text, _expression(text, "-format"), template))
    return Selection(parsed, af, tuple(fm))


def _expression(text: str, option: str) -> classad2.ExprTree:
    if "\0" in text:
        raise FormatError(f"{option} {text!r}: contains a NUL character")
    try:
        return classad2.ExprTree(text)
    except (classad2.ClassAdException, ValueError):
        raise FormatError(f"{option} {text!r}: not a ClassAd attribute name or expression") from None


def evaluate(column: Column, ad: classad2.ClassAd) -> Any:
    """The column's value for this job (an attribute name is an expression too); UNDEFINED/ERROR as markers."""
    return _evaluate(column.expr, ad)


def _evaluate(expr: classad2.ExprTree, ad: classad2.ClassAd) -> Any:
    try:
        return _python(expr.eval(ad))
    except classad2.ClassAdException:
        return ERROR


def _python(value: object) -> Any:
    if isinstance(value, classad2.Value):
        return ERROR if value == classad2.Value.Error else UNDEFINED
    return value


def value_text(value: object, *, quote: bool = False) -> str:
    """A value as condor_q's ``%v`` (``quote``: ``%V``) prints it."""
    if isinstance(value, _Missing):
        return value.name
    if isinstance(value, str):
        return str(classad2.quote(value)) if quote else value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f'real("{value}")'
    if isinstance(value, list):
        return "{ " + ", ".join(value_text(item, quote=True) for item in value) + " }" if value else "{ }"
    if isinstance(value, classad2.ClassAd):
        return "[ " + "; ".join(f"{name} = {' '.join(str(value.lookup(name)).split())}" for name in value) + " ]"
    return str(value)


def printf(template: str, value: object) -> str:
    """``template`` (escapes already interpreted) with its one conversion applied to ``value``.

    Empty when the value cannot be printed by the conversion (condor_q skips that format).
    """
    match = next((m for m in _CONVERSION.finditer(template) if m.group("conv") != "%"), None)
    if match is None:
        return template.replace("%%", "%")
    conv = match.group("conv")
    spec = "%" + (match.group("flags") or "") + (match.group("width") or "")
    if match.group("precision") is not None:
        spec += "." + match.group("precision")
    text = _convert(spec, conv, value)
    if text is None:
        return ""
    head, tail = template[: match.start()], template[match.end() :]
    return head.replace("%%", "%") + text + tail.replace("%%", "%")


def _convert(spec: str, conv: str, value: object) -> str | None:
    if conv in "svV":
        if isinstance(value, _Missing) and conv == "s":
            return None
        text = value if isinstance(value, str) and conv != "V" else value_text(value, quote=conv == "V")
        return (spec + "s") % safe(str(text))
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, int | float) or (
        isinstance(value, float) and not math.isfinite(value) and conv in "diouxXc"
    ):
        return None
    if conv in "diouxX":
        return (spec + conv) % int(value)
    if conv == "c":
        code = int(value)
        return (spec + "s") % safe(chr(code)) if 0 <= code < 0x110000 else None
    return (spec + conv) % float(value)


def unescape(fmt: str) -> str:
    """C escapes in a -format string, as condor_q reads them (``\\n``, ``\\t``, ``\\\\``, octal, hex...)."""

    def one(match: re.Match[str]) -> str:
        if match.group("octal") is not None:
            return chr(int(match.group("octal"), 8) & 0xFF)
        if match.group("hex") is not None:
            return chr(int(match.group("hex"), 16))
        char = match.group("char")
        return _C_ESCAPES.get(char, "\\" + char)

    return _ESCAPE.sub(one, fmt)


def safe(text: str) -> str:
    """Foreign text made printable on one line: control characters escaped."""
    return _CONTROLS.sub(lambda m: _NAMED_CONTROLS.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def job_json(node: str, fields: Mapping[str, Any], ad: classad2.ClassAd) -> dict[str, Any]:
    """``carod q --json``: the advert's fields for the job, its node, and ``ad``: the q ad's values as JSON."""
    return {"node": node, **fields, "ad": {name: _json_value(_python(_eval_attr(ad, name))) for name in ad}}


def _eval_attr(ad: classad2.ClassAd, name: str) -> object:
    try:
        return ad.eval(name)
    except classad2.ClassAdException:
        return classad2.Value.Error


def _json_value(value: object) -> Any:
    if isinstance(value, _Missing):
        return None
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_json_value(_python(item)) for item in value]
    return value_text(value)
