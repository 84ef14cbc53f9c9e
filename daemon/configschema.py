"""Config dataclasses as schemas: check raw TOML data against them, render them.

Every config table of berth (the core ones in :mod:`daemon.config` and each
plugin's) is a plain dataclass. Its fields are the table's keys, their
annotations the expected types, ``field(metadata={"doc": ...})`` the
documentation rendered into ``berthd config default``. This module turns a
dict from :mod:`tomllib` into an instance while collecting *every* problem
(unknown keys with a suggestion, wrong types, values outside a ``Literal``
or ``metadata={"choices": ...}``) instead of stopping at the first one.

Supported field types: ``str``, ``int`` (``bool`` is not an int), ``float``
(an int is accepted), ``bool``, ``list[T]``, ``tuple[T, ...]``,
``dict[str, T]``, a nested dataclass (a sub-table), ``Literal[...]``,
``X | None`` and ``Any``. TOML has no null, so ``None`` is only ever a
default: "not set".

A dataclass may define ``validate(self) -> None`` for checks across fields;
it runs once the instance is built and raises ``ValueError("field: reason")``
(the ``field:`` prefix makes the problem point at that key and its line).
Fields with ``metadata={"internal": True}`` or ``init=False`` are not keys.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from daemon.tomlsource import KeyPath, format_path, quote_key, toml_string

COMMENT_WIDTH = 88
_FIELD_PREFIX = re.compile(r"([A-Za-z_][A-Za-z0-9_]*): (.*)\Z", re.DOTALL)


@dataclass
class Problem:
    """One thing wrong with the config, at a key path (``()`` = the file)."""

    path: KeyPath
    message: str


class _Invalid:
    """Marks a value that failed its checks; its problems are already recorded."""


INVALID: Any = _Invalid()


# -- introspection ---------------------------------------------------------------


def is_dataclass_type(tp: object) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def config_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """The key fields of a config dataclass with their resolved types."""
    hints = typing.get_type_hints(cls)
    return [
        (f, hints.get(f.name, Any))
        for f in dataclasses.fields(cls)
        if f.init and not f.metadata.get("internal") and not f.name.startswith("_")
    ]


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = _union_args(tp)
    if args is not None:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return tp


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_NAMES: dict[Any, tuple[str, str]] = {
    str: ("string", "strings"),
    int: ("integer", "integers"),
    float: ("number", "numbers"),
    bool: ("boolean", "booleans"),
    datetime.datetime: ("date-time", "date-times"),
    datetime.date: ("date", "dates"),
    datetime.time: ("time", "times"),
}


def describe(tp: Any, *, plural: bool = False) -> str:
    """What a value of ``tp`` looks like in TOML words ("an array of strings")."""
    if tp is Any:
        return "values" if plural else "any value"
    if tp in _NAMES:
        one, many = _NAMES[tp]
        return many if plural else _article(one)
    if is_dataclass_type(tp):
        return "tables" if plural else "a table"
    if typing.get_origin(tp) is Literal:
        allowed = ", ".join(toml_value(a) for a in typing.get_args(tp))
        return f"values among {allowed}" if plural else f"one of {allowed}"
    union = _union_args(tp)
    if union is not None:
        return " or ".join(describe(a, plural=plural) for a in union if a is not type(None))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        inner = f" of {describe(args[0], plural=True)}" if args else ""
        return ("arrays" if plural else "an array") + inner
    if origin is dict:
        inner = f" of {describe(args[1], plural=True)}" if len(args) == 2 else ""
        return ("tables" if plural else "a table") + inner
    if tp in (list, tuple):
        return "arrays" if plural else "an array"
    if tp is dict:
        return "tables" if plural else "a table"
    name = getattr(tp, "__name__", repr(tp))
    return f"values of type {name}" if plural else f"a value of type {name}"


def describe_value(value: Any) -> str:
    """What was found instead, with a short rendering of it."""
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, int):
        kind = "an integer"
    elif isinstance(value, float):
        kind = "a float"
    elif isinstance(value, str):
        kind = "a string"
    elif isinstance(value, list):
        kind = "an array"
    elif isinstance(value, dict):
        kind = "a table"
    else:
        kind = "a " + type(value).__name__
    text = toml_value(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} ({text})"


def suggest(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The nearest candidate, if one is close enough to be a likely typo.

    Long dotted names (plugin names) share prefixes, so callers comparing
    them pass a higher ``cutoff``.
    """
    matches = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=cutoff)
    return matches[0] if matches else None


# -- checking ----------------------------------------------------------------------


def build(
    cls: type,
    raw: Any,
    path: KeyPath,
    problems: list[Problem],
    *,
    exclude: Iterable[str] = (),
    extra_keys: Iterable[str] = (),
) -> Any:
    """An instance of ``cls`` from the table ``raw``, or :data:`INVALID`.

    Problems are appended to ``problems``; checking goes on past the first
    one so the operator sees them all. Keys missing from ``raw`` take the
    field's default. ``exclude`` names fields the caller fills itself (they
    are neither read nor defaulted: :func:`build` returns a dict of keyword
    arguments instead of an instance when it is non-empty); ``extra_keys``
    are keys valid in this table that the caller handles itself.
    """
    if not isinstance(raw, dict):
        problems.append(Problem(path, f"expected a table, got {describe_value(raw)}"))
        return INVALID
    excluded = set(exclude)
    extra = set(extra_keys)
    fields = [(f, tp) for f, tp in config_fields(cls) if f.name not in excluded]
    by_name = {f.name: (f, tp) for f, tp in fields}
    failed = False
    for key in raw:
        if key in by_name or key in extra:
            continue
        near = suggest(key, [*by_name, *extra])
        hint = f", did you mean {quote_key(near)}?" if near else ""
        problems.append(Problem((*path, key), f"unknown key{hint}"))
        failed = True
    kwargs: dict[str, Any] = {}
    for f, tp in fields:
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(Problem((*path, f.name), f"required key is missing ({describe(tp)})"))
                failed = True
            continue
        value = convert(tp, raw[f.name], (*path, f.name), problems, f.metadata)
        if value is INVALID:
            failed = True
        else:
            kwargs[f.name] = value
    if failed:
        return INVALID
    if excluded:
        return kwargs
    instance = cls(**kwargs)
    return instance if run_validate(instance, path, problems) else INVALID


def run_validate(instance: Any, path: KeyPath, problems: list[Problem]) -> bool:
    """Call the instance's ``validate()`` if it has one; False if it objected."""
    validate = getattr(instance, "validate", None)
    if not callable(validate):
        return True
    try:
        validate()
    except ValueError as exc:
        message = str(exc) or "invalid"
        m = _FIELD_PREFIX.match(message)
        names = {f.name for f in dataclasses.fields(instance)}
        if m and m.group(1) in names:
            problems.append(Problem((*path, m.group(1)), m.group(2)))
        else:
            problems.append(Problem(path, message))
        return False
    return True


def convert(
    tp: Any,
    value: Any,
    path: KeyPath,
    problems: list[Problem],
    metadata: Mapping[str, Any] | None = None,
) -> Any:
    """``value`` checked (and, for floats and tuples, coerced) against ``tp``."""
    result = _convert(tp, value, path, problems)
    choices = (metadata or {}).get("choices")
    if result is not INVALID and choices is not None and result not in choices:
        problems.append(Problem(path, _not_among(value, tuple(choices))))
        return INVALID
    return result


def _not_among(value: Any, allowed: tuple[Any, ...]) -> str:
    text = "expected one of " + ", ".join(toml_value(a) for a in allowed)
    text += f", got {toml_value(value)}"
    if isinstance(value, str):
        near = suggest(value, [a for a in allowed if isinstance(a, str)])
        if near is not None:
            text += f", did you mean {toml_string(near)}?"
    return text


def _wrong(tp: Any, value: Any, path: KeyPath, problems: list[Problem]) -> Any:
    problems.append(Problem(path, f"expected {describe(tp)}, got {describe_value(value)}"))
    return INVALID


def _convert(tp: Any, value: Any, path: KeyPath, problems: list[Problem]) -> Any:
    if tp is Any or tp is object:
        return value
    if tp is bool:
        return value if isinstance(value, bool) else _wrong(tp, value, path, problems)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok else _wrong(tp, value, path, problems)
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok else _wrong(tp, value, path, problems)
    if tp is str:
        return value if isinstance(value, str) else _wrong(tp, value, path, problems)
    if is_dataclass_type(tp):
        return build(tp, value, path, problems)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        for allowed in args:
            if type(value) is type(allowed) and value == allowed:
                return value
        problems.append(Problem(path, _not_among(value, args)))
        return INVALID
    union = _union_args(tp)
    if union is not None:
        return _convert_union(tp, union, value, path, problems)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, list):
            return _wrong(tp, value, path, problems)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, (*path, i), problems) for i, v in enumerate(value)]
        if any(v is INVALID for v in items):
            return INVALID
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return _wrong(tp, value, path, problems)
        item_tp = args[1] if len(args) == 2 else Any
        out = {k: _convert(item_tp, v, (*path, k), problems) for k, v in value.items()}
        return INVALID if any(v is INVALID for v in out.values()) else out
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _wrong(tp, value, path, problems)
    return value  # an annotation this module cannot check: accept as parsed


def _convert_union(
    tp: Any, union: tuple[Any, ...], value: Any, path: KeyPath, problems: list[Problem]
) -> Any:
    options = [a for a in union if a is not type(None)]
    if len(options) == 1:
        return _convert(options[0], value, path, problems)
    # several alternatives: the first that accepts the value wins; if none
    # does, one problem says what would have been accepted
    for option in options:
        scratch: list[Problem] = []
        result = _convert(option, value, path, scratch)
        if result is not INVALID:
            return result
    return _wrong(tp, value, path, problems)


# -- rendering -----------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """``value`` as an inline TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{quote_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return toml_value({f.name: getattr(value, f.name) for f, _ in config_fields(type(value))})
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return toml_string(str(value))


def comment(text: str) -> list[str]:
    """``text`` as ``# ...`` lines wrapped at :data:`COMMENT_WIDTH`; paragraphs kept."""
    out: list[str] = []
    for para in text.strip().split("\n\n"):
        if out:
            out.append("#")
        flat = " ".join(para.split())
        out += ["# " + line for line in textwrap.wrap(flat, COMMENT_WIDTH - 2)] or ["#"]
    return out


def field_doc(f: dataclasses.Field[Any], tp: Any) -> str:
    """The field's documentation plus the allowed values when they are fixed."""
    doc = str(f.metadata.get("doc", "")).strip() or f"{f.name}: {describe(tp)}."
    inner = strip_optional(tp)
    allowed: tuple[Any, ...] = ()
    if typing.get_origin(inner) is Literal:
        allowed = typing.get_args(inner)
    elif "choices" in f.metadata:
        allowed = tuple(f.metadata["choices"])
    if allowed:
        doc += " One of: " + ", ".join(toml_value(a) for a in allowed) + "."
    return doc


def _placeholder(tp: Any) -> str:
    """An example value for a key that is unset (``None``) by default."""
    inner = strip_optional(tp)
    origin = typing.get_origin(inner)
    if inner is bool:
        return "false"
    if inner is int:
        return "0"
    if inner is float:
        return "0.0"
    if origin is Literal:
        return toml_value(typing.get_args(inner)[0])
    if origin in (list, tuple) or inner in (list, tuple):
        return "[]"
    if origin is dict or inner is dict or is_dataclass_type(inner):
        return "{}"
    return '""'


def _is_subtable(tp: Any, value: Any) -> bool:
    inner = strip_optional(tp)
    if value is None:
        return False
    if is_dataclass_type(inner):
        return True
    args = typing.get_args(inner)
    return typing.get_origin(inner) is dict and len(args) == 2 and is_dataclass_type(args[1]) and bool(value)


def render_table(instance: Any, path: KeyPath, out: list[str], *, doc: str = "", header: bool = True) -> None:
    """Append ``instance`` as a commented TOML table (and its sub-tables) to ``out``.

    Plain keys come first, sub-tables after them, as TOML requires.
    """
    cls = type(instance)
    if header:
        out.append("")
        out += comment(doc or f"{format_path(path)}.")
        out.append(f"[{format_path(path)}]")
    sub: list[tuple[dataclasses.Field[Any], Any, Any]] = []
    first = True
    for f, tp in config_fields(cls):
        value = getattr(instance, f.name)
        if _is_subtable(tp, value):
            sub.append((f, tp, value))
            continue
        if not (first and header):
            out.append("")
        first = False
        out += comment(field_doc(f, tp))
        if value is None:
            out.append(f"# {quote_key(f.name)} = {_placeholder(tp)}  (unset by default)")
        else:
            out.append(f"{quote_key(f.name)} = {toml_value(value)}")
    for f, tp, value in sub:
        doc = field_doc(f, tp)
        if dataclasses.is_dataclass(value):
            render_table(value, (*path, f.name), out, doc=doc)
        else:
            for key in sorted(value):
                render_table(value[key], (*path, f.name, key), out, doc=doc)
