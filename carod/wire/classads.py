"""ClassAd handling: AMQP headers <-> ClassAds, evaluation and matchmaking.

Pure functions, no I/O. Everything that touches ``classad2`` goes through
here, and its exceptions become :class:`carod.errors.JobHeld`.

Header convention (the MRG Grid one, kept for old clients):

* a string header is ClassAd *expression text*: ``"\\"/bin/echo\\""`` is the
  string literal ``/bin/echo``; ``TRUE`` or ``TARGET.Memory > 10`` are
  expressions;
* an int, float or bool header is that literal;
* replies use ints as ints, floats as floats, and ClassAd text for the rest
  (strings keep their quotes, booleans are ``TRUE``/``FALSE``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import classad2

from carod.errors import JobHeld
from carod.holdcodes import HoldCode

#: A ClassAd attribute name: HTCondor's identifier syntax.
ATTRIBUTE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: What a Python-side attribute value may be before it becomes a header.
Scalar = bool | int | float | str


class Undefined:
    """Marker for an UNDEFINED or ERROR evaluation result."""

    def __init__(self, error: bool) -> None:
        self.error = error

    def __repr__(self) -> str:
        return "ERROR" if self.error else "UNDEFINED"


UNDEFINED = Undefined(error=False)
ERROR = Undefined(error=True)


def parse_expr(text: str, *, attribute: str) -> classad2.ExprTree:
    """Parse ClassAd expression text, naming ``attribute`` when it is malformed."""
    if "\0" in text:
        raise JobHeld(f"the job attribute {attribute} contains a NUL character")
    try:
        return classad2.ExprTree(text)
    except (classad2.ClassAdException, ValueError) as exc:
        hint = (
            ""
            if text.lstrip().startswith('"')
            else f"; a string value needs double quotes, e.g. {classad2.quote(text)}"
        )
        raise JobHeld(f"the job attribute {attribute} is not a valid ClassAd expression: {text!r}{hint}") from exc


def header_to_value(name: str, value: object) -> classad2.ExprTree | Scalar:
    """Turn one AMQP header value into a ClassAd attribute value."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:  # an AMQP 1.0 ulong can be larger than a ClassAd integer
            raise JobHeld(f"the job attribute {name} is an integer outside the 64-bit range a ClassAd holds")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JobHeld(f"the job attribute {name} is not valid UTF-8") from exc
    if isinstance(value, str):
        return parse_expr(value, attribute=name)
    raise JobHeld(
        f"the job attribute {name} has an AMQP type carod cannot read as a ClassAd "
        f"({amqp_type_name(value)}); send ClassAd text in a string header instead"
    )


#: AMQP 0-9-1 field types as aio-pika decodes them, by Python type name (for hold reasons).
_AMQP_091_TYPES = {
    "dict": "field table",
    "list": "field array",
    "datetime": "timestamp",
    "Decimal": "decimal",
    "NoneType": "void",
}


def amqp_type_name(value: object) -> str:
    """The AMQP type of a header value, as a submitter's client library calls it."""
    named = getattr(value, "amqp_type", None)  # an AMQP 1.0 value (carod.wire.amqp10.Unreadable)
    if isinstance(named, str):
        return f"AMQP 1.0 {named}"
    return _AMQP_091_TYPES.get(type(value).__name__, type(value).__name__)


def ad_from_headers(headers: Mapping[str, object]) -> classad2.ClassAd:
    """Build a job ClassAd from a message's application headers.

    Headers whose names are not ClassAd attribute names (``x-death``,
    ``x-delivery-count``, carod's own ``x-carod-*``) are transport metadata
    and are not part of the job.
    """
    ad = classad2.ClassAd()
    for name, value in headers.items():
        if not ATTRIBUTE_NAME.match(name):
            continue
        ad[name] = header_to_value(name, value)
    return ad


def evaluate(ad: classad2.ClassAd, attribute: str) -> Any:
    """Evaluate one attribute of ``ad``; UNDEFINED/ERROR become markers."""
    if attribute not in ad:
        return UNDEFINED
    return _python(_eval(ad.lookup(attribute), ad))


def _eval(expr: classad2.ExprTree, scope: classad2.ClassAd, target: classad2.ClassAd | None = None) -> Any:
    """``expr.eval``; an evaluation the library gives up on (its step or depth limit) is ERROR, as HTCondor's."""
    try:
        return expr.eval(scope) if target is None else expr.eval(scope, target)
    except classad2.ClassAdException:
        return classad2.Value.Error


def _python(value: object) -> Any:
    if isinstance(value, classad2.Value):
        return ERROR if value == classad2.Value.Error else UNDEFINED
    return value


def is_true(value: object) -> bool:
    """HTCondor's EvalBool: true, or a non-zero number. UNDEFINED/ERROR are false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return False


def evaluate_in_match(my: classad2.ClassAd, target: classad2.ClassAd, attribute: str) -> Any:
    """Evaluate ``my[attribute]`` against ``target`` with HTCondor's match scoping.

    ``MY.X`` is ``my``'s, ``TARGET.X`` is ``target``'s, and an unscoped ``X``
    is looked up in ``my`` first and then in ``target``, as the negotiator
    does. A missing attribute is UNDEFINED.
    """
    if attribute not in my:
        return UNDEFINED
    expr = my.lookup(attribute)
    try:
        refs = my.externalRefs(expr)
    except (ValueError, classad2.ClassAdException):
        return ERROR  # e.g. a cyclic definition (Requirements = Requirements)
    borrowed = [ref for ref in refs if "." not in ref and ref in target and ref not in my]
    if not borrowed:  # nothing to add to MY: evaluated in ``my`` itself, without copying it
        return _python(_eval(expr, my, target))
    scope = classad2.ClassAd()
    scope.update(my)
    for ref in borrowed:
        # Evaluated where it is defined (MY = target), as the negotiator does.
        value = _eval(target.lookup(ref), target, my)
        if isinstance(value, classad2.Value):
            value = classad2.ExprTree("error" if value == classad2.Value.Error else "undefined")
        scope[ref] = value
    return _python(_eval(expr, scope, target))


@dataclass(frozen=True)
class MatchResult:
    """The outcome of a two-way match; ``reason`` says which side refused."""

    job_accepts: bool
    machine_accepts: bool

    @property
    def ok(self) -> bool:
        return self.job_accepts and self.machine_accepts

    @property
    def reason(self) -> str:
        if self.ok:
            return "matched"
        sides = []
        if not self.job_accepts:
            sides.append("the job's Requirements are not met by this machine")
        if not self.machine_accepts:
            sides.append("this machine's start policy refuses the job")
        return " and ".join(sides)


def match(job: classad2.ClassAd, machine: classad2.ClassAd) -> MatchResult:
    """Two-way match: job ``Requirements`` (unset = TRUE) and machine ``Start``."""
    job_ok = True if "Requirements" not in job else is_true(evaluate_in_match(job, machine, "Requirements"))
    machine_ok = True if "Start" not in machine else is_true(evaluate_in_match(machine, job, "Start"))
    return MatchResult(job_accepts=job_ok, machine_accepts=machine_ok)


def format_value(value: Scalar | classad2.ExprTree) -> Scalar:
    """A reply header value: ints and floats native, the rest as ClassAd text."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return str(classad2.quote(value))
    return str(value)


def format_headers(attributes: Mapping[str, Scalar | classad2.ExprTree]) -> dict[str, Scalar]:
    return {name: format_value(value) for name, value in attributes.items()}


def expr_text(ad: classad2.ClassAd, attribute: str) -> str:
    """The unevaluated expression text of an attribute ("TRUE" when unset)."""
    if attribute not in ad:
        return "TRUE"
    return str(ad.lookup(attribute))


def to_classad_text(ad: classad2.ClassAd) -> str:
    """Long form, one ``Name = expr`` a line, sorted, as ``condor_status -l``."""
    lines = [f"{name} = {ad.lookup(name)}" for name in sorted(ad.keys(), key=str.lower)]
    return "\n".join(lines) + "\n"


def ad_from_expressions(items: Iterable[tuple[str, str]], *, section: str) -> classad2.ClassAd:
    """Parse ``(name, expression text)`` pairs, e.g. the config's ``[machine]``."""
    ad = classad2.ClassAd()
    for name, text in items:
        if not ATTRIBUTE_NAME.match(name):
            raise ValueError(f"[{section}] {name}: not a ClassAd attribute name")
        try:
            ad[name] = classad2.ExprTree(text)
        except classad2.ClassAdException as exc:
            raise ValueError(f"[{section}] {name}: not a valid ClassAd expression: {text!r}") from exc
    return ad


__all__ = [
    "ATTRIBUTE_NAME",
    "ERROR",
    "UNDEFINED",
    "HoldCode",
    "MatchResult",
    "ad_from_expressions",
    "ad_from_headers",
    "evaluate",
    "evaluate_in_match",
    "expr_text",
    "format_headers",
    "format_value",
    "header_to_value",
    "is_true",
    "match",
    "parse_expr",
    "to_classad_text",
]
