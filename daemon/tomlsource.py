"""Where each key of a TOML document is written, and how to spell key paths.

:mod:`tomllib` returns plain dicts with no positions, yet every config
problem must say ``(config.toml:14)``. :func:`key_lines` recovers the
positions with a small structural scanner: it follows table headers
(``[a.b]``, ``[plugins."x.y"]``, ``[[arrays]]``), dotted keys, inline tables
and array elements, and steps over strings (multi-line ones included) and
comments without interpreting values. It only ever runs on text tomllib has
already accepted, so it can afford to be lenient; on anything unexpected it
returns what it found so far rather than raising, because a missing line
number must never hide the problem it was meant to locate.

Key paths are tuples: strings for table keys, ints for array positions
(``("plugins", "berth.snapshotter.v1.overlayfs", "mount_options", 0)``).
:func:`format_path` spells them the way an operator would write them in the
file: ``plugins."berth.snapshotter.v1.overlayfs".mount_options[0]``.
"""

from __future__ import annotations

import contextlib
import re
import tomllib

KeyPath = tuple[str | int, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BARE_KEY_FULL = re.compile(r"[A-Za-z0-9_-]+\Z")
_SCALAR_END = frozenset(",]}#\n\r")


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string (double quotes, escapes as TOML wants)."""
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def quote_key(key: str) -> str:
    """One key component: bare when TOML allows it, else a quoted string."""
    return key if _BARE_KEY_FULL.match(key) else toml_string(key)


def format_path(path: KeyPath) -> str:
    """A key path as written in TOML; array positions as ``[i]``."""
    out = ""
    for comp in path:
        if isinstance(comp, int):
            out += f"[{comp}]"
        else:
            out += ("." if out else "") + quote_key(comp)
    return out


def key_lines(text: str) -> dict[KeyPath, int]:
    """Map every key path (tables, keys, array elements) to its 1-based line.

    A table defined implicitly (``[a.b]`` defines ``a``) or by dotted keys
    gets the line of its first mention. Array-of-tables entries are indexed
    like arrays: the second ``[[mirrors]]`` is ``("mirrors", 1)``.
    """
    scanner = _Scanner(text)
    with contextlib.suppress(IndexError, ValueError):
        scanner.document()
    return scanner.lines


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines: dict[KeyPath, int] = {}
        self._aot_last: dict[KeyPath, int] = {}

    # -- low level ---------------------------------------------------------

    def _peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def _advance_to(self, end: int) -> None:
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def _skip_ws(self) -> None:
        n = len(self.text)
        while self.pos < n and self.text[self.pos] in " \t":
            self.pos += 1

    def _skip_blank(self) -> None:
        """Whitespace, newlines and comments."""
        n = len(self.text)
        while self.pos < n:
            ch = self.text[self.pos]
            if ch in " \t\r":
                self.pos += 1
            elif ch == "\n":
                self.pos += 1
                self.line += 1
            elif ch == "#":
                end = self.text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            else:
                return

    def _expect(self, s: str) -> None:
        if not self._peek(s):
            raise ValueError(f"expected {s!r} at offset {self.pos}")
        self.pos += len(s)

    def _record(self, path: KeyPath) -> None:
        for i in range(1, len(path) + 1):
            self.lines.setdefault(path[:i], self.line)

    # -- strings -----------------------------------------------------------

    def _string_end(self) -> int:
        """Offset just past the string starting at ``pos``."""
        t = self.text
        if t.startswith('"""', self.pos) or t.startswith("'''", self.pos):
            delim = t[self.pos : self.pos + 3]
            i = self.pos + 3
            while True:
                if delim == '"""' and t[i] == "\\":
                    i += 2
                    continue
                if t.startswith(delim, i):
                    end = i + 3
                    # up to two quotes may sit right before the closing delimiter
                    extra = 0
                    while extra < 2 and end < len(t) and t[end] == delim[0]:
                        end += 1
                        extra += 1
                    return end
                i += 1
        quote = t[self.pos]
        i = self.pos + 1
        while t[i] != quote:
            if quote == '"' and t[i] == "\\":
                i += 1
            if t[i] == "\n":
                raise ValueError("newline in single-line string")
            i += 1
        return i + 1

    # -- keys ----------------------------------------------------------------

    def _key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self._skip_ws()
            ch = self.text[self.pos]
            if ch in "\"'":
                end = self._string_end()
                raw = self.text[self.pos : end]
                parts.append(str(tomllib.loads(f"k = {raw}")["k"]))
                self.pos = end
            else:
                m = _BARE_KEY.match(self.text, self.pos)
                if m is None:
                    raise ValueError(f"no key at offset {self.pos}")
                parts.append(m.group())
                self.pos = m.end()
            self._skip_ws()
            if self._peek("."):
                self.pos += 1
                continue
            return parts

    def _resolve(self, parts: list[str]) -> list[str | int]:
        """Insert the current index after every array-of-tables prefix."""
        out: list[str | int] = []
        for part in parts:
            out.append(part)
            last = self._aot_last.get(tuple(out))
            if last is not None:
                out.append(last)
        return out

    # -- structure -------------------------------------------------------------

    def document(self) -> None:
        table: KeyPath = ()
        n = len(self.text)
        while True:
            self._skip_blank()
            if self.pos >= n:
                return
            start = self.pos
            if self._peek("[["):
                self.pos += 2
                parts = self._key()
                self._expect("]]")
                base = (*self._resolve(parts[:-1]), parts[-1])
                index = self._aot_last.get(base, -1) + 1
                self._aot_last[base] = index
                table = (*base, index)
                self._record(table)
            elif self._peek("["):
                self.pos += 1
                parts = self._key()
                self._expect("]")
                table = tuple(self._resolve(parts))
                self._record(table)
            else:
                self._key_value(table)
            if self.pos == start:  # never loop without progress
                self.pos += 1

    def _key_value(self, table: KeyPath) -> None:
        path = (*table, *self._key())
        self._record(path)
        self._skip_ws()
        self._expect("=")
        self._skip_ws()
        self._value(path)

    def _value(self, path: KeyPath) -> None:
        t = self.text
        ch = t[self.pos]
        if ch in "\"'":
            self._advance_to(self._string_end())
        elif ch == "[":
            self.pos += 1
            index = 0
            while True:
                self._skip_blank()
                ch = t[self.pos]
                if ch == "]":
                    self.pos += 1
                    return
                if ch == ",":
                    self.pos += 1
                    continue
                elem = (*path, index)
                self._record(elem)
                self._value(elem)
                index += 1
        elif ch == "{":
            self.pos += 1
            while True:
                self._skip_blank()
                ch = t[self.pos]
                if ch == "}":
                    self.pos += 1
                    return
                if ch == ",":
                    self.pos += 1
                    continue
                self._key_value(path)
        else:
            i = self.pos
            while i < len(t) and t[i] not in _SCALAR_END:
                i += 1
            if i == self.pos:
                raise ValueError(f"no value at offset {self.pos}")
            self.pos = i
