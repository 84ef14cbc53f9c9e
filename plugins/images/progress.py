"""Pull progress: what the CLI draws and what the event bus carries.

A pull reports to two kinds of consumers, at two rates:

* the ``progress`` callback of :meth:`ImageService.pull
  <plugins.images.service.ImageService.pull>` (the CLI, CRI logging) is
  called synchronously after *every* change, down to each chunk written,
  with the pull's :class:`PullProgress`. It must be cheap and must not keep
  the object (it keeps changing): copy what it needs.
* the event bus gets :class:`PullProgressEvent` on topic
  :data:`TOPIC` (``/images/pull/progress``) for every change of a blob's
  state, and for bytes at most every ``interval`` seconds per blob, so a
  subscriber sees a pull move without being flooded.

containerd has no pull-progress event (``ctr`` polls the content store's
ingest statuses instead), so the message is berth's own,
``berth.images.v1.PullProgress``, defined in Python as a betterproto
message rather than in a ``.proto`` (nothing else needs its schema).
containerd clients subscribed to every topic receive it as an ``Any`` they
cannot decode and skip it (``ctr events`` logs one warning per event); filter
on ``topic!="/images/pull/progress"`` to avoid that.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import betterproto
import structlog

from daemon.typeurl import register_type

log = structlog.get_logger("berth.images")

TOPIC = "/images/pull/progress"
TYPE_URL = "berth.images.v1.PullProgress"


class State(enum.StrEnum):
    """Where one blob of a pull is (layers go through all of them, other blobs stop at DOWNLOADED)."""

    WAITING = "waiting"  # queued behind other downloads
    DOWNLOADING = "downloading"
    EXISTS = "exists"  # already in the content store: not downloaded
    DOWNLOADED = "downloaded"  # verified against its digest and committed to content
    UNPACKING = "unpacking"
    UNPACKED = "unpacked"  # diff id verified, snapshot committed under its chain id
    REUSED = "reused"  # the layer's chain id was already unpacked
    FAILED = "failed"


#: How far along each state is: a blob never goes back (a teed layer is UNPACKING while it
#: still downloads, and stays so when its download completes).
_RANK = {
    State.WAITING: 0,
    State.DOWNLOADING: 1,
    State.EXISTS: 2,
    State.DOWNLOADED: 2,
    State.UNPACKING: 3,
    State.UNPACKED: 4,
    State.REUSED: 4,
    State.FAILED: 5,
}


@dataclass
class BlobProgress:
    """One blob of a pull. ``offset``: bytes in the content store so far (a resume starts above 0).

    ``live`` is True for a layer that was unpacked from the download itself
    (teed) rather than from the content store after it (see :mod:`.unpack`).
    """

    kind: str  # "index", "manifest", "config" or "layer"
    digest: str
    total: int
    offset: int = 0
    state: State = State.WAITING
    live: bool = False


@dataclass
class PullProgress:
    """A pull as it goes: its blobs in the order they were found, and totals."""

    namespace: str
    ref: str
    blobs: dict[str, BlobProgress] = field(default_factory=dict)
    done: bool = False

    @property
    def total(self) -> int:
        return sum(b.total for b in self.blobs.values())

    @property
    def offset(self) -> int:
        return sum(b.offset for b in self.blobs.values())

    def layers(self) -> list[BlobProgress]:
        return [b for b in self.blobs.values() if b.kind == "layer"]

    @property
    def phase(self) -> str:
        """``resolving``, ``fetching``, ``unpacking`` or ``done`` (the Transfer API's phases)."""
        if self.done:
            return "done"
        if not self.blobs:
            return "resolving"
        if any(_RANK[b.state] < _RANK[State.DOWNLOADED] for b in self.blobs.values()):
            return "fetching"
        return "unpacking"


_TRANSFER_STATUS = {
    State.WAITING: "waiting",
    State.DOWNLOADING: "downloading",
    State.EXISTS: "exists",
    State.DOWNLOADED: "done",
    State.UNPACKING: "applying",
    State.UNPACKED: "done",
    State.REUSED: "exists",
    State.FAILED: "error",
}


def transfer_status(blob: BlobProgress, *, unpack: bool = True) -> str:
    """``blob``'s state as ``berth.services.images.v1.LayerProgress.status`` spells it.

    A layer downloaded but not applied yet is ``waiting`` when the pull unpacks.
    """
    if blob.state is State.DOWNLOADED and unpack and blob.kind == "layer":
        return "waiting"
    return _TRANSFER_STATUS[blob.state]


ProgressCallback = Callable[[PullProgress], None]


@dataclass(eq=False, repr=False)
class PullProgressEvent(betterproto.Message):  # type: ignore[misc]
    """``berth.images.v1.PullProgress``: one blob of a pull changed (see the module docstring).

    ``offset``/``total`` are the blob's bytes, ``pull_offset``/``pull_total``
    the whole pull's (as far as it is known: layers are added once the
    manifest is read).
    """

    __type_url__ = TYPE_URL

    name: str = betterproto.string_field(1)
    kind: str = betterproto.string_field(2)
    digest: str = betterproto.string_field(3)
    state: str = betterproto.string_field(4)
    offset: int = betterproto.int64_field(5)
    total: int = betterproto.int64_field(6)
    pull_offset: int = betterproto.int64_field(7)
    pull_total: int = betterproto.int64_field(8)


register_type(PullProgressEvent)


class Publisher(Protocol):
    """Anything with the event bus's ``publish(topic, event, namespace)``."""

    def publish(self, topic: str, event: Any, namespace: str) -> None: ...


class ProgressTracker:
    """Keeps a :class:`PullProgress` and tells the callbacks and the bus about each change.

    Several callbacks may listen (a second identical pull joins the first).
    A callback that raises is logged and dropped, never fails the pull.
    """

    def __init__(
        self,
        namespace: str,
        ref: str,
        *,
        bus: Publisher | None = None,
        interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.progress = PullProgress(namespace, ref)
        self.callbacks: list[ProgressCallback] = []
        self._bus = bus
        self._interval = interval
        self._clock = clock
        self._published: dict[str, float] = {}

    def add_callback(self, callback: ProgressCallback | None) -> None:
        if callback is not None:
            self.callbacks.append(callback)
            self._notify()

    def blob(self, kind: str, digest: str, total: int) -> BlobProgress:
        """Register a blob (idempotent: a digest listed twice, e.g. a repeated layer, is one entry)."""
        found = self.progress.blobs.get(digest)
        if found is None:
            found = self.progress.blobs[digest] = BlobProgress(kind, digest, total)
            self._changed(found, state_changed=True)
        return found

    def state(
        self, digest: str, state: State, *, offset: int | None = None, live: bool | None = None
    ) -> None:
        blob = self.progress.blobs[digest]
        if offset is not None:
            blob.offset = offset
        if live is not None:
            blob.live = live
        if state in (State.EXISTS, State.DOWNLOADED):
            blob.offset = blob.total
        if _RANK[state] < _RANK[blob.state]:
            state = blob.state
        changed = blob.state is not state
        blob.state = state
        self._changed(blob, state_changed=changed)

    def bytes(self, digest: str, offset: int) -> None:
        blob = self.progress.blobs[digest]
        blob.offset = offset
        self._changed(blob, state_changed=False)

    def finish(self) -> None:
        self.progress.done = True
        self._notify()

    def _changed(self, blob: BlobProgress, *, state_changed: bool) -> None:
        self._notify()
        if self._bus is None:
            return
        now = self._clock()
        if not state_changed and now - self._published.get(blob.digest, -1e18) < self._interval:
            return
        self._published[blob.digest] = now
        p = self.progress
        event = PullProgressEvent(
            name=p.ref,
            kind=blob.kind,
            digest=blob.digest,
            state=blob.state.value,
            offset=blob.offset,
            total=blob.total,
            pull_offset=p.offset,
            pull_total=p.total,
        )
        try:
            self._bus.publish(TOPIC, event, p.namespace)
        except Exception as exc:  # noqa: BLE001 - progress never fails a pull
            log.warning("pull.progress.publish_failed", ref=p.ref, error=str(exc))

    def _notify(self) -> None:
        for callback in list(self.callbacks):
            try:
                callback(self.progress)
            except Exception as exc:  # noqa: BLE001 - a broken consumer is dropped, the pull goes on
                log.warning("pull.progress.callback_failed", ref=self.progress.ref, error=str(exc))
                self.callbacks.remove(callback)
