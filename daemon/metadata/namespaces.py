"""Namespaces: the scope of every other object in the store, as in containerd.

Each method comes twice: an ``async`` one that runs its own transaction, and
a synchronous ``*_tx`` one that takes the connection of a transaction the
caller already holds (inside :meth:`MetadataStore.write`), so several
changes can commit together. :meth:`NamespaceStore.ensure` is the one every
namespace-scoped insert calls: containerd creates a namespace implicitly the
first time an object is created in it.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import structlog

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from daemon.metadata.encoding import decode_labels, encode_labels, now_ns, to_datetime
from daemon.metadata.schema import NAMESPACED_TABLES
from daemon.metadata.validate import quote, validate_identifier, validate_labels

if TYPE_CHECKING:
    from daemon.metadata.store import MetadataStore

log = structlog.get_logger("berth.metadata")

_LABELS_PREFIX = "labels."


@dataclass
class Namespace:
    name: str
    labels: dict[str, str]
    created_at: datetime
    updated_at: datetime


def _namespace(row: tuple[str, str, int, int]) -> Namespace:
    name, labels, created, updated = row
    return Namespace(name, decode_labels(labels), to_datetime(created), to_datetime(updated))


def _owner(name: str) -> str:
    return f"namespace {quote(name)}"


def apply_label_mask(
    owner: str, current: Mapping[str, str], labels: Mapping[str, str], paths: Sequence[str]
) -> dict[str, str]:
    """containerd's field-mask rules for labels, shared by every object with labels.

    No paths: the labels become ``labels``. ``"labels"``: the same, explicitly.
    ``"labels.<key>"``: only that key changes, set to ``labels[key]``, or
    removed when it is absent or empty. Any other path is InvalidArgument.
    Empty values are dropped, as containerd's SetLabel("") deletes.
    """
    if isinstance(paths, str):
        raise InvalidArgument(f"{owner}: update paths must be a list of strings, not a string")
    if not paths:
        paths = ["labels"]
    result = dict(current)
    for path in paths:
        if path == "labels":
            result = {k: v for k, v in labels.items() if v != ""}
        elif path.startswith(_LABELS_PREFIX):
            key = path[len(_LABELS_PREFIX) :]
            if not key:
                raise InvalidArgument(f"{owner}: update path {quote(path)}: empty label key")
            value = labels.get(key, "")
            if value:
                result[key] = value
            else:
                result.pop(key, None)
        else:
            raise InvalidArgument(f"{owner}: cannot update {quote(path)} field")
    return validate_labels(owner, result)


class NamespaceStore:
    """Create, read, update and delete namespaces (containerd's namespaces.Store)."""

    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    # -- async API: one transaction per call ---------------------------------

    async def create(self, name: str, labels: Mapping[str, str] | None = None) -> Namespace:
        """Create ``name``; AlreadyExists if it exists, InvalidArgument for a bad name or label."""
        ns = await self._store.write(lambda conn: self.create_tx(conn, name, labels))
        log.info("ns.create", name=name)
        return ns

    async def get(self, name: str) -> Namespace:
        """NotFound if ``name`` does not exist."""
        return await self._store.read(lambda conn: self.get_tx(conn, name))

    async def list(self) -> builtins.list[Namespace]:
        """Every namespace, sorted by name."""
        return await self._store.read(self.list_tx)

    async def update(self, name: str, labels: Mapping[str, str], paths: Sequence[str] = ()) -> Namespace:
        """Change the labels of ``name`` under a field mask; see :func:`apply_label_mask`."""
        ns = await self._store.write(lambda conn: self.update_tx(conn, name, labels, paths))
        log.info("ns.update", name=name, paths=list(paths))
        return ns

    async def delete(self, name: str) -> None:
        """NotFound if missing; FailedPrecondition while any object still lives in it."""
        await self._store.write(lambda conn: self.delete_tx(conn, name))
        log.info("ns.delete", name=name)

    # -- synchronous API: inside a transaction the caller holds ----------------

    def ensure(self, conn: sqlite3.Connection, name: str) -> None:
        """Create ``name`` with no labels if it does not exist (implicit creation)."""
        validate_identifier("namespace", name)
        now = now_ns()
        conn.execute(
            "INSERT INTO namespaces (name, labels, created_at, updated_at) VALUES (?, '{}', ?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (name, now, now),
        )

    def create_tx(
        self, conn: sqlite3.Connection, name: str, labels: Mapping[str, str] | None = None
    ) -> Namespace:
        validate_identifier("namespace", name)
        clean = validate_labels(_owner(name), labels or {})
        now = now_ns()
        cur = conn.execute(
            "INSERT INTO namespaces (name, labels, created_at, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (name, encode_labels(clean), now, now),
        )
        if cur.rowcount == 0:
            raise AlreadyExists(f"{_owner(name)}: already exists")
        return Namespace(name, clean, to_datetime(now), to_datetime(now))

    def get_tx(self, conn: sqlite3.Connection, name: str) -> Namespace:
        validate_identifier("namespace", name)
        row = conn.execute(
            "SELECT name, labels, created_at, updated_at FROM namespaces WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise NotFound(f"{_owner(name)}: not found")
        return _namespace(row)

    def list_tx(self, conn: sqlite3.Connection) -> builtins.list[Namespace]:
        rows = conn.execute("SELECT name, labels, created_at, updated_at FROM namespaces ORDER BY name")
        return [_namespace(row) for row in rows]

    def update_tx(
        self,
        conn: sqlite3.Connection,
        name: str,
        labels: Mapping[str, str],
        paths: Sequence[str] = (),
    ) -> Namespace:
        current = self.get_tx(conn, name)
        new = apply_label_mask(_owner(name), current.labels, labels, paths)
        now = now_ns()
        conn.execute(
            "UPDATE namespaces SET labels = ?, updated_at = ? WHERE name = ?",
            (encode_labels(new), now, name),
        )
        return Namespace(name, new, current.created_at, to_datetime(now))

    def delete_tx(self, conn: sqlite3.Connection, name: str) -> None:
        self.get_tx(conn, name)  # NotFound first, as containerd answers
        held = sorted(
            noun
            for table, noun in NAMESPACED_TABLES
            if conn.execute(f"SELECT 1 FROM {table} WHERE namespace = ? LIMIT 1", (name,)).fetchone()
        )
        if held:
            raise FailedPrecondition(f"{_owner(name)} must be empty, but it still has {', '.join(held)}")
        try:
            conn.execute("DELETE FROM namespaces WHERE name = ?", (name,))
        except sqlite3.IntegrityError as exc:  # a table missing from NAMESPACED_TABLES
            raise FailedPrecondition(
                f"{_owner(name)} must be empty, but it still holds objects ({exc})"
            ) from exc
