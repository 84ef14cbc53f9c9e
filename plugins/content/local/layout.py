"""Where the local content store keeps things on disk, and how files get there.

Layout under the plugin root (containerd's ``content/local`` plus a labels folder)::

    blobs/<alg>/<hex>            committed content, read-only (0444), never partial
    ingest/<sha256(ref)>/        one write in progress
        lock                     flock(2)ed by the writer that holds the ref
        ref                      the ref, written last: a folder without it is unfinished
        data                     the bytes so far; its size is the offset
        total, expected          what the writer announced ("0" / "" when unknown)
        startedat, updatedat     RFC 3339 UTC timestamps (microseconds)
    labels/<alg>/<hex>           JSON {"labels": {...}, "updated_at": ns} of a labelled blob

``blobs/`` holds only what containerd's layout holds, so it stays readable by
containerd's tools. Labels are sidecars, not a database: each one changes
whole and atomically (write, fsync, rename) with nothing shared between
blobs, a blob without labels costs no file, and the store needs no thread
that owns a connection. A sidecar whose blob is gone is ignored, and every
commit rewrites or removes the sidecar of its digest before publishing the
blob, so stale labels never attach to new content.

Every function here blocks; callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from datetime import datetime
from pathlib import Path

from daemon.metadata.encoding import from_datetime

BLOBS = "blobs"
INGEST = "ingest"
LABELS = "labels"

LOCK, REF, DATA, TOTAL, EXPECTED, STARTED_AT, UPDATED_AT = (
    "lock",
    "ref",
    "data",
    "total",
    "expected",
    "startedat",
    "updatedat",
)

#: files and folders of the store are private to the daemon (umask still applies)
DIR_MODE = 0o755
BLOB_MODE = 0o444

_TMP_PREFIX = ".tmp-"


class Layout:
    """Paths of one store root; no I/O except :meth:`create`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / BLOBS
        self.ingest = self.root / INGEST
        self.labels = self.root / LABELS

    def create(self) -> None:
        for path in (self.blobs, self.ingest, self.labels):
            path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)

    def blob_path(self, algorithm: str, encoded: str) -> Path:
        return self.blobs / algorithm / encoded

    def labels_path(self, algorithm: str, encoded: str) -> Path:
        return self.labels / algorithm / encoded

    def ingest_dir(self, ref: str) -> Path:
        """The ingest folder of ``ref``: hashed, so any ref is a safe file name."""
        return self.ingest / hashlib.sha256(ref.encode("utf-8", "surrogateescape")).hexdigest()


def is_temp(name: str) -> bool:
    return name.startswith(_TMP_PREFIX)


def write_atomic(path: Path, data: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``data`` in one step (temp file + rename).

    ``durable`` fsyncs the file before the rename and the folder after it, so
    the new content survives power loss; without it the content survives a
    crash of the process only, which is enough for ingest bookkeeping.
    """
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def format_time(value: datetime) -> bytes:
    return value.isoformat().encode()


def parse_time(text: bytes) -> datetime:
    value = datetime.fromisoformat(text.decode())
    if value.tzinfo is None:
        raise ValueError(f"timestamp without time zone: {text!r}")
    return value


def to_ns(value: datetime) -> int:
    return from_datetime(value)


def remove_temp_files(folder: Path, older_than: float = 3600.0) -> int:
    """Delete temp files a crash left in ``folder`` and its sub-folders; how many.

    Only files older than ``older_than`` seconds go: a younger one may belong
    to another process writing right now.
    """
    removed = 0
    cutoff = time.time() - older_than
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath, name)
            try:
                if is_temp(name) and path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
