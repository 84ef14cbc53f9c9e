"""containerd's filter language, so ``ctr``/nerdctl filter strings mean the same here.

A filter string is a comma-separated list of *selectors*; all of them must
match (AND). Several filter strings are alternatives (OR), exactly as the
``filters`` repeated field of containerd's List/Subscribe requests::

    topic=="/tasks/exit",namespace==k8s.io      # both must hold
    labels."io.kubernetes.pod.uid"              # field present
    name!=pause                                 # absent fields count as ""
    image~=^docker\\.io/library/                # regular expression (search)
    image~=/^docker.io\\/library//              # same, quoted with / (or |)

Grammar (whitespace between tokens is ignored)::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_-]+ | "double-quoted"
    operator  := "==" | "!=" | "~="
    value     := "double-quoted" | run of printable non-space chars but ","
                 (after ~= also /slash-quoted/ or |pipe-quoted|)

Quoted text uses Go string escapes (``\\n``, ``\\t``, ``\\\\``, ``\\"``,
``\\x41``, ``\\101``, ``\\u00e9``, ``\\U0001f600``); inside ``/.../`` and
``|...|`` the quote character itself is escaped the same way. Unlike
containerd, a bad regular expression is rejected at parse time instead of
silently never matching.

Errors are :class:`InvalidArgument` worded like containerd's, with the
position marked: ``filters: parse error: [labels. >|?|< x]: expected field or quoted``.

The filter does not know the objects it filters: an *adaptor* maps a field
path to ``(value, present)``. :func:`adapt_mapping` and :func:`adapt_object`
build adaptors for dicts and betterproto messages with containerd's field
rules (strings present when non-empty, bools always present as
"true"/"false", ``labels``-style string maps keyed by the rest of the path
joined with ".").
"""

from __future__ import annotations

import enum
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import betterproto
from betterproto.lib.google.protobuf import Any as ProtoAny

from daemon.errors import InvalidArgument

#: fieldpath -> (value, present)
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

#: Turns a packed ``google.protobuf.Any`` into its message, or None if unknown.
AnyDecoder = Callable[[ProtoAny], Any]


class Filter(Protocol):
    def match(self, adaptor: Adaptor) -> bool: ...


class Operator(enum.Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclass(frozen=True)
class Selector:
    """One ``fieldpath [op value]`` term.

    Semantics follow containerd: ``==`` needs the field present, ``!=``
    compares the value even when absent (absent reads as ""), ``~=`` searches
    (not anchored) the value.
    """

    fieldpath: tuple[str, ...]
    operator: Operator
    value: str = ""
    regex: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator is Operator.PRESENT:
            return present
        if self.operator is Operator.EQUAL:
            return present and value == self.value
        if self.operator is Operator.NOT_EQUAL:
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None


@dataclass(frozen=True)
class All:
    """AND of selectors: one filter string."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True)
class AnyOf:
    """OR of filter strings."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)


class _Always:
    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALWAYS"


#: The filter of no filter strings (or an empty one): matches everything.
ALWAYS: Filter = _Always()


def parse(filters: Sequence[str]) -> Filter:
    """Parse filter strings into one filter: OR across strings, AND within one.

    ``[]`` and any ``""`` among them match everything (containerd's rule).
    """
    if isinstance(filters, str):  # a common slip: parse("a==b") would iterate chars
        filters = [filters]
    if not filters:
        return ALWAYS
    parsed = [parse_one(text) for text in filters]
    if any(f is ALWAYS for f in parsed):
        return ALWAYS
    return parsed[0] if len(parsed) == 1 else AnyOf(tuple(parsed))


def parse_one(text: str) -> Filter:
    """Parse one filter string (a comma-separated AND of selectors)."""
    if text == "":
        return ALWAYS
    return _Parser(text).parse()


# -- parser -----------------------------------------------------------------

_FIELD_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
_QUOTES = '"/|'
_OPERATOR_CHARS = "=!~"
_OPERATORS = {op.value: op for op in (Operator.EQUAL, Operator.NOT_EQUAL, Operator.MATCHES)}
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


class _Parser:
    """Recursive descent over the text; every error names its position."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, pos: int, msg: str) -> InvalidArgument:
        t = self.text
        where = f"[{t[:pos]} >|{t[pos]}|< {t[pos + 1 :]}]" if pos < len(t) else f"[{t}]"
        return InvalidArgument(f"filters: parse error: {where}: {msg}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def parse(self) -> Filter:
        selectors: list[Filter] = [self.selector()]
        while True:
            self.skip_space()
            ch = self.peek()
            if ch == "":
                break
            if ch != ",":
                raise self.error(self.pos, f"unexpected input: {ch}")
            self.pos += 1
            selectors.append(self.selector())
        return selectors[0] if len(selectors) == 1 else All(tuple(selectors))

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        self.skip_space()
        if self.peek() in ("", ","):
            return Selector(tuple(path), Operator.PRESENT)
        op = self.operator()
        start, value = self.value(op)
        regex = None
        if op is Operator.MATCHES:
            try:
                regex = re.compile(value)
            except re.error as exc:
                raise self.error(start, f"invalid regular expression: {exc}") from None
        return Selector(tuple(path), op, value, regex)

    def field(self) -> str:
        self.skip_space()
        start = self.pos
        ch = self.peek()
        if ch and ch in _QUOTES:
            text = self.quoted()
            if ch != '"':
                raise self.error(start, "invalid quote encountered")
            return text
        while self.peek() and self.peek() in _FIELD_CHARS:
            self.pos += 1
        if self.pos == start:
            raise self.error(start, "expected field or quoted")
        return self.text[start : self.pos]

    def operator(self) -> Operator:
        start = self.pos
        if self.peek() in _QUOTES:  # a stray quote: report an unterminated one as such
            self.quoted()
            raise self.error(start, 'expected an operator ("=="|"!="|"~=")')
        while self.peek() and self.peek() in _OPERATOR_CHARS:
            self.pos += 1
        run = self.text[start : self.pos]
        if not run:
            raise self.error(start, 'expected an operator ("=="|"!="|"~=")')
        if run not in _OPERATORS:
            raise self.error(start, f'unsupported operator "{run}"')
        return _OPERATORS[run]

    def value(self, op: Operator) -> tuple[int, str]:
        self.skip_space()
        start = self.pos
        ch = self.peek()
        if ch and ch in _QUOTES:
            text = self.quoted()
            if ch != '"' and op is not Operator.MATCHES:
                raise self.error(start, "invalid quote encountered")
            return start, text
        # a value may not start with what would be a separator or an operator
        if ch == "" or ch in ".,=!~":
            raise self.error(start, "expected value or quoted")
        while (c := self.peek()) and c != "," and not c.isspace() and c.isprintable():
            self.pos += 1
        if self.pos == start:
            raise self.error(start, "expected value or quoted")
        return start, self.text[start : self.pos]

    def quoted(self) -> str:
        """Scan and decode a quoted literal starting at ``pos`` (Go escapes).

        Escapes yield bytes (``\\xff`` is one byte, as in Go); the result is
        decoded as UTF-8, invalid sequences kept as surrogate escapes so they
        never compare equal to real text by accident.
        """
        text, start = self.text, self.pos
        quote = text[start]
        i = start + 1
        out = bytearray()
        while True:
            if i >= len(text) or text[i] == "\n":
                raise self.error(start, "quoted literal not terminated")
            ch = text[i]
            if ch == quote:
                break
            if ch != "\\":
                out += ch.encode("utf-8", "surrogateescape")
                i += 1
                continue
            esc = text[i + 1] if i + 1 < len(text) else ""
            if esc in _SIMPLE_ESCAPES:
                out += _SIMPLE_ESCAPES[esc].encode()
                i += 2
            elif esc == quote:
                out += quote.encode()
                i += 2
            elif esc and esc in "01234567":
                digits = text[i + 1 : i + 4]
                if len(digits) < 3 or any(d not in "01234567" for d in digits) or int(digits, 8) > 255:
                    raise self.error(start, "illegal numeric escape sequence")
                out.append(int(digits, 8))
                i += 4
            elif esc in ("x", "u", "U"):
                n = {"x": 2, "u": 4, "U": 8}[esc]
                digits = text[i + 2 : i + 2 + n]
                if len(digits) < n or any(d not in string.hexdigits for d in digits):
                    raise self.error(start, "illegal numeric escape sequence")
                code = int(digits, 16)
                if esc == "x":
                    out.append(code)
                else:
                    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                        raise self.error(start, "illegal numeric escape sequence")
                    out += chr(code).encode()
                i += 2 + n
            else:
                raise self.error(start, "illegal escape sequence")
        self.pos = i + 1
        return out.decode("utf-8", "surrogateescape")


# -- adaptors ---------------------------------------------------------------


def adapt_mapping(obj: Mapping[str, Any], *, decode_any: AnyDecoder | None = None) -> Adaptor:
    """An adaptor over a (possibly nested) mapping, for services' List filters.

    ``{"name": "x", "labels": {"a.b": "1"}}`` answers ``name`` -> ("x", True)
    and ``labels.a.b`` -> ("1", True).
    """
    return lambda fieldpath: field_value(obj, fieldpath, decode_any)


def adapt_object(obj: Any, *, decode_any: AnyDecoder | None = None) -> Adaptor:
    """An adaptor over a betterproto message (or a mapping), field names as in the .proto."""
    return lambda fieldpath: field_value(obj, fieldpath, decode_any)


def field_value(obj: Any, fieldpath: Sequence[str], decode_any: AnyDecoder | None = None) -> tuple[str, bool]:
    """Resolve a field path on a mapping or betterproto message, containerd's way.

    * strings: present when non-empty; bools: always present, "true"/"false";
      integers: their decimal text, present; enums: their name, present.
    * a mapping whose values are all strings (``labels``): the rest of the path
      joined with "." is the key (``labels.io.k8s.name`` looks up "io.k8s.name").
    * nested messages and other mappings: walk one component at a time.
    * ``google.protobuf.Any``: decoded with ``decode_any`` then walked.
    * anything else (timestamps, lists, bytes), or a path ending on a
      message: not present.
    """
    if not fieldpath:
        return "", False
    head, rest = fieldpath[0], fieldpath[1:]
    if isinstance(obj, Mapping):
        if head not in obj:
            return "", False
        value = obj[head]
    elif isinstance(obj, betterproto.Message):
        fields = obj._betterproto.meta_by_field_name  # betterproto's field table
        name = head if head in fields else f"{head}_" if f"{head}_" in fields else None
        if name is None:
            return "", False
        value = getattr(obj, name, None)
    else:
        return "", False
    return _leaf(value, rest, decode_any)


def _leaf(value: Any, rest: Sequence[str], decode_any: AnyDecoder | None) -> tuple[str, bool]:
    if value is None:
        return "", False
    if isinstance(value, bool):
        return ("true" if value else "false"), True
    if isinstance(value, str):
        return value, value != ""
    if isinstance(value, enum.Enum):
        return value.name, True
    if isinstance(value, int):
        return str(value), True
    if isinstance(value, ProtoAny):
        decoded = None
        if decode_any is not None and value.type_url:
            try:
                decoded = decode_any(value)
            except Exception:  # noqa: BLE001 - an undecodable event simply has no fields
                decoded = None
        return field_value(decoded, rest, decode_any) if decoded is not None else ("", False)
    if isinstance(value, Mapping):
        if value and all(isinstance(v, str) for v in value.values()):
            key = ".".join(rest)
            return (value[key], True) if key in value else ("", False)
        return field_value(value, rest, decode_any)
    if isinstance(value, betterproto.Message):
        return field_value(value, rest, decode_any)
    return "", False
