"""Drawing ``berth images pull`` progress from the Transfer service's PullProgress messages.

Two printers, chosen by whether stdout is a terminal:

* :class:`TtyPrinter` redraws one block in place (ANSI cursor movement): a
  header with the phase, then a line per blob with its status, a bar and
  sizes. The daemon sends at most ~10 messages a second, so every message
  is drawn.
* :class:`PlainPrinter` writes one line per change that matters to a log or
  a test: a new phase (``fetching REF``) and a blob's new status
  (``layer-sha256:...: done``); byte counts are left out.
"""

from __future__ import annotations

import time
from typing import Protocol, TextIO

from daemon.cli.output import human_size
from protos.berth.services.images.v1 import LayerProgress, PullProgress

#: The Transfer service's descriptor annotation naming a blob's kind.
ANNOTATION_KIND = "io.berth.progress.kind"
BAR_WIDTH = 30


def blob_name(layer: LayerProgress, short: bool = False) -> str:
    """``layer-sha256:<hex>`` (``ctr`` names blobs so), the hex cut to 12 when ``short``."""
    kind = layer.descriptor.annotations.get(ANNOTATION_KIND, "blob") if layer.descriptor else "blob"
    digest = layer.descriptor.digest if layer.descriptor else ""
    if short:
        algorithm, _, hexpart = digest.partition(":")
        digest = f"{algorithm}:{hexpart[:12]}"
    return f"{kind}-{digest}"


class Printer(Protocol):
    def update(self, message: PullProgress) -> None: ...

    def finish(self) -> None: ...


class PlainPrinter:
    """One line per new phase and per blob status change."""

    def __init__(self, ref: str, out: TextIO) -> None:
        self.ref = ref
        self.out = out
        self._phase = ""
        self._status: dict[str, str] = {}

    def update(self, message: PullProgress) -> None:
        if message.phase != self._phase and message.phase != "done":
            self.out.write(f"{message.phase} {self.ref}\n")
        self._phase = message.phase
        for layer in message.layers:
            name = blob_name(layer)
            if self._status.get(name) != layer.status:
                self._status[name] = layer.status
                self.out.write(f"{name}: {layer.status}\n")
        self.out.flush()

    def finish(self) -> None:
        self.out.flush()


def bar(offset: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[=========>          ]``; full when ``total`` is 0 (nothing to fetch)."""
    filled = width if total <= 0 else min(width, offset * width // total)
    head = ">" if 0 < filled < width else ""
    return "[" + ("=" * (filled - len(head)) + head).ljust(width) + "]"


def render(ref: str, message: PullProgress, elapsed: float, columns: int = 120) -> list[str]:
    """The lines of one frame: header, then a line per blob; the bar shrinks to fit ``columns``."""
    lines = [f"{message.phase or 'resolving'} {ref}   {elapsed:.1f}s"]
    rows = [
        (
            f"{blob_name(layer, short=True):<28} {layer.status:<11} ",
            layer,
            f" {human_size(layer.offset)}/{human_size(layer.total)}",
        )
        for layer in message.layers
    ]
    room = columns - max((len(head) + len(tail) + 2 for head, _, tail in rows), default=0)
    width = max(10, min(BAR_WIDTH, room))
    lines += [head + bar(layer.offset, layer.total, width) + tail for head, layer, tail in rows]
    return [line[:columns] for line in lines]


class TtyPrinter:
    """Redraws the frame in place; the previous frame's lines are overwritten, never scrolled."""

    def __init__(self, ref: str, out: TextIO, columns: int = 120) -> None:
        self.ref = ref
        self.out = out
        self.columns = max(20, columns - 1)
        self._drawn = 0
        self._started = time.monotonic()
        self._last: PullProgress | None = None

    def update(self, message: PullProgress) -> None:
        self._last = message
        lines = render(self.ref, message, time.monotonic() - self._started, self.columns)
        parts = [f"\x1b[{self._drawn}F"] if self._drawn else []
        parts += [f"\x1b[2K{line}\n" for line in lines]
        self.out.write("".join(parts))
        self.out.flush()
        self._drawn = len(lines)

    def finish(self) -> None:
        self.out.flush()
