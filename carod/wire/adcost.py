"""What evaluating a ClassAd can cost, bounded from its text alone. Pure, no I/O.

ClassAd evaluation does not memoise: ``A1 = A0 + A0; A2 = A1 + A1; ...``
evaluates ``A0`` 2**n times, and ``strcat`` of such a chain builds a string
of 2**n copies. :func:`problem` reads each attribute's expression text and
works out an upper bound of what evaluating it can do, with every reference
to another attribute of the same ad inlined (as the evaluator does):

* ``steps``: operators, names and function calls evaluated (the evaluator
  visits each node once per inlining);
* ``bytes``: the data literals build: string bytes, and 16 for each literal
  or list element (what ``strcat`` and the other linear functions can build
  from them).

An ad is *bounded* when every attribute stays within both limits and calls only
:data:`LINEAR_FUNCTIONS` (functions whose result is no larger than their
arguments and whose time is about linear in them). Anything else (a call to
``sprintf``, ``replaceAll``, ``regexp``, ``eval``...; a nested ClassAd, whose
own attributes this reading cannot follow; references that form a cycle) is
not bounded here, and carod evaluates it only in the bounded evaluator
(carod.node.evaluator). The bound over-approximates: a name counts as a reference
to the ad's attribute of that name wherever it appears (except after
``TARGET.``, which names the other ad).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

#: Evaluation steps (operators, names, calls; references inlined) one attribute may take on carod's event loop.
MAX_STEPS = 1024
#: Literal data (string bytes, 16 per value; references inlined) one attribute may build on the event loop.
MAX_BYTES = 256 * 1024
#: Steps times data, for one attribute: a step may walk all of its data (``toupper`` of a 100 KB string,
#: 300 times, passed the two bounds above and took 1.4 s).
MAX_WORK = 1024 * 1024

#: Functions whose result is no larger than their arguments (plus a constant) and whose
#: time is about linear in them. Lower case: ClassAd function names are case-insensitive.
LINEAR_FUNCTIONS = frozenset(
    {
        # types and conversions
        "isundefined",
        "iserror",
        "isstring",
        "isinteger",
        "isreal",
        "isboolean",
        "islist",
        "isclassad",
        "isabstime",
        "isreltime",
        "int",
        "real",
        "string",
        "bool",
        "ifthenelse",
        # numbers
        "floor",
        "ceiling",
        "round",
        "pow",
        "quantize",
        "random",
        "sum",
        "avg",
        "min",
        "max",
        "time",
        "abstime",
        "reltime",
        # strings
        "strcat",
        "substr",
        "size",
        "tolower",
        "toupper",
        "strcmp",
        "stricmp",
        "splitusername",
        "splitslotname",
        # lists and string lists
        "member",
        "identicalmember",
        "anycompare",
        "allcompare",
        "stringlistsize",
        "stringlistsum",
        "stringlistavg",
        "stringlistmin",
        "stringlistmax",
        "stringlistmember",
        "stringlistimember",
    }
)

_KEYWORDS = frozenset({"true", "false", "undefined", "error", "is", "isnt", "my", "target", "parent"})

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
    |(?P<str>"[^"\\]*(?:\\.[^"\\]*)*")
    |(?P<qname>'[^'\\]*(?:\\.[^'\\]*)*')
    |(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<op>.)
    """,
    re.VERBOSE | re.DOTALL,
)
#: One string or unsigned number literal and nothing else (the same syntax as ``_TOKEN``'s). The string
#: patterns are written unrolled (``"[^"\\]*(?:\\.[^"\\]*)*"``, the same strings as ``"(?:[^"\\]|\\.)*"``):
#: 20 times faster on a long one.
_SINGLE_LITERAL = re.compile(
    r'(?P<str>"[^"\\]*(?:\\.[^"\\]*)*")|(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)', re.DOTALL
)
#: What a literal value or list element counts towards ``bytes`` besides its text.
_VALUE_BYTES = 16
#: Tokens that only group (their cost is the nodes inside them).
_GROUPING = frozenset("(){}[]")
#: Saturate bounds here: a 2**4000 expansion needs no exact figure.
_CEILING = 1 << 62


@dataclass(frozen=True)
class Cost:
    """The bound for one attribute (references inlined), or why there is none."""

    #: operators, names and function calls evaluated, references inlined
    steps: int
    #: data built by literals, references inlined
    bytes: int
    #: references to the other ad (``TARGET.X``, or a name this ad does not define), inlined
    foreign: int = 0
    #: why the bound does not hold (e.g. "calls sprintf()"); None when it does
    unbounded: str | None = None


@dataclass
class _Own:
    steps: int
    bytes: int
    foreign: int
    refs: list[str]
    unbounded: str | None


def _read(text: str, names: frozenset[str], forbidden: frozenset[str]) -> _Own:
    """An expression's own tokens, its references to ``names`` (lower case, repeated), its first unbounded construct.

    ``forbidden``: names of the other ad this expression must not refer to.
    """
    single = _SINGLE_LITERAL.fullmatch(text)
    if single is not None:  # most job attributes ("/bin/echo", 5): what the loop below gives them, without it
        return _Own(0, (len(text) if single.lastgroup == "str" else 0) + _VALUE_BYTES, 0, [], None)
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text) if m.lastgroup != "ws"]
    steps, size, foreign, refs = 0, 0, 0, []
    unbounded: str | None = None
    for i, (kind, value) in enumerate(tokens):
        prev = tokens[i - 1] if i else (None, "")
        if kind in ("str", "num") or value == ",":  # data: what a literal (or a list element) builds
            size += (len(value) if kind == "str" else 0) + _VALUE_BYTES
            continue
        if value not in _GROUPING:
            steps += 1  # an operator, a name or a function call: one node of the evaluation
        if kind in ("name", "qname"):
            name = (value[1:-1] if kind == "qname" else value).lower()
            following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
            if kind == "name" and following == "(":
                if name not in LINEAR_FUNCTIONS and unbounded is None:
                    unbounded = f"calls {value}()"
            elif name in _KEYWORDS:
                continue
            elif name in names and not (prev[1] == "." and i >= 2 and tokens[i - 2][1].lower() == "target"):
                refs.append(name)
            else:  # TARGET.X, or a name this ad does not define: the other ad's
                foreign += 1
                if name in forbidden and unbounded is None:
                    unbounded = f"refers to the other ad's {value}"
        elif value == "[" and unbounded is None:
            subscript = prev[0] in ("name", "qname", "str", "num") or prev[1] in (")", "]", "}")
            if not subscript:
                unbounded = "contains a nested ClassAd"
    return _Own(steps, size, foreign, refs, unbounded)


def costs(exprs: Mapping[str, str], *, forbidden: frozenset[str] = frozenset()) -> dict[str, Cost]:
    """The bound of every attribute of an ad given as ``name -> expression text``.

    ``forbidden``: lower-case names of the other ad that no expression may refer to.
    """
    by_lower = {name.lower(): name for name in exprs}
    names = frozenset(by_lower)
    own = {low: _read(exprs[by_lower[low]], names, forbidden) for low in names}
    done: dict[str, Cost] = {}
    on_path: set[str] = set()
    for root in own:
        if root in done:
            continue
        # Depth-first without recursion: an ad may chain thousands of attributes.
        stack: list[tuple[str, int]] = [(root, 0)]
        on_path.add(root)
        while stack:
            low, at = stack[-1]
            refs = own[low].refs
            while at < len(refs) and refs[at] in done:
                at += 1
            if at < len(refs):
                ref = refs[at]
                stack[-1] = (low, at + 1)
                if ref in on_path:
                    own[low].unbounded = own[low].unbounded or f"refers to itself through {by_lower[ref]}"
                    continue
                on_path.add(ref)
                stack.append((ref, 0))
                continue
            stack.pop()
            on_path.discard(low)
            mine = own[low]
            steps, size, foreign, why = mine.steps, mine.bytes, mine.foreign, mine.unbounded
            for ref in refs:
                sub = done.get(ref)
                if sub is None:  # a cycle back into the path: already marked
                    continue
                steps = min(_CEILING, steps + sub.steps)
                size = min(_CEILING, size + sub.bytes)
                foreign = min(_CEILING, foreign + sub.foreign)
                if why is None and sub.unbounded is not None:
                    why = f"refers to {by_lower[ref]}, which {sub.unbounded}"
            done[low] = Cost(steps, size, foreign, why)
    return {by_lower[low]: cost for low, cost in done.items()}


#: A job expression may not refer to these machine attributes: with them, a match could go back and
#: forth between the two ads (job -> machine Start -> job -> ...), multiplying each side's cost.
MACHINE_POLICY = frozenset({"start", "requirements", "rank"})


def problem(
    exprs: Mapping[str, str],
    *,
    max_steps: int = MAX_STEPS,
    max_bytes: int = MAX_BYTES,
    max_work: int = MAX_WORK,
    max_foreign: int | None = None,
    forbidden: frozenset[str] = MACHINE_POLICY,
) -> tuple[str, str] | None:
    """``(attribute, why)`` for the first attribute whose evaluation is not bounded; None when all are.

    ``max_foreign``: most references to the other ad (inlined) an attribute may make (None: any number).
    """
    for name, cost in costs(exprs, forbidden=forbidden).items():
        if cost.unbounded is not None:
            return name, cost.unbounded
        if max_foreign is not None and cost.foreign > max_foreign:
            return name, f"refers to the other ad {_amount(cost.foreign)} times (at most {max_foreign})"
        if cost.steps > max_steps:
            return name, f"takes up to {_amount(cost.steps)} evaluation steps (at most {max_steps})"
        if cost.bytes > max_bytes:
            return name, f"can build up to {_amount(cost.bytes)} bytes of values (at most {max_bytes})"
        if cost.steps * cost.bytes > max_work:
            return name, (
                f"takes {cost.steps} steps over up to {cost.bytes} bytes of values "
                f"(at most {max_work} for the two multiplied)"
            )
    return None


def _amount(n: int) -> str:
    return "more than 10**18" if n >= _CEILING else str(n)


def is_literal(text: str) -> bool:
    """A single literal (number, string, boolean, UNDEFINED, ERROR, optionally negated): evaluating it costs nothing."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text) if m.lastgroup != "ws"]
    if tokens and tokens[0][1] == "-":
        tokens = tokens[1:]
    if len(tokens) != 1:
        return False
    kind, value = tokens[0]
    return kind in ("str", "num") or (kind == "name" and value.lower() in ("true", "false", "undefined", "error"))
