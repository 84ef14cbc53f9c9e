"""Leases: named holds on resources, scoped to a namespace (containerd's leases.Manager).

A client creates a lease before it starts work that produces objects not yet
referenced by anything (a pull writing blobs, an unpack preparing
snapshots), adds each object to the lease as a resource, and deletes the
lease when the objects are referenced by an image or a container. Garbage
collection keeps every resource some lease holds.

Resource types follow containerd: ``content`` (id is a digest), ``ingests``
(id is an ingest ref) and ``snapshots/<snapshotter>`` (id is a snapshot
key). Adding a resource twice, or deleting one the lease does not hold, is
not an error.
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import structlog

from daemon.errors import AlreadyExists, InvalidArgument, NotFound, Unimplemented
from daemon.metadata.encoding import decode_labels, encode_labels, now_ns, to_datetime
from daemon.metadata.validate import (
    quote,
    require_namespace,
    validate_digest,
    validate_labels,
    validate_lease_id,
)

if TYPE_CHECKING:
    from daemon.metadata.namespaces import NamespaceStore
    from daemon.metadata.store import MetadataStore

log = structlog.get_logger("berth.metadata")


@dataclass
class Lease:
    id: str
    labels: dict[str, str]
    created_at: datetime


@dataclass(frozen=True)
class LeaseResource:
    id: str
    type: str


def validate_resource(resource: LeaseResource) -> None:
    """containerd's parseLeaseResource: known types only, content ids must be digests."""
    kind, *rest = resource.type.split("/")
    if kind in ("content", "ingests"):
        if rest:
            raise InvalidArgument(f"lease resource type {quote(resource.type)}: invalid resource type")
        if kind == "content":
            validate_digest("content resource id", resource.id)
    elif kind == "snapshots":
        if len(rest) != 1 or not rest[0]:
            raise InvalidArgument(
                f"lease resource type {quote(resource.type)}: invalid snapshot resource type, "
                "want snapshots/<snapshotter>"
            )
    else:
        raise Unimplemented(f"lease resource type {quote(resource.type)}: data type not supported")
    if not resource.id:
        raise InvalidArgument(f"lease resource of type {quote(resource.type)}: id must not be empty")


class LeaseStore:
    """Leases and their resources; every call is scoped to one namespace.

    Like :class:`NamespaceStore`, each operation exists as a coroutine (its
    own transaction) and as a synchronous ``*_tx`` method for use inside
    :meth:`MetadataStore.write`.
    """

    def __init__(self, store: MetadataStore, namespaces: NamespaceStore) -> None:
        self._store = store
        self._namespaces = namespaces

    # -- async API --------------------------------------------------------------

    async def create(self, namespace: str, id: str, labels: Mapping[str, str] | None = None) -> Lease:  # noqa: A002
        """Create lease ``id`` (and the namespace if needed); AlreadyExists if taken."""
        lease = await self._store.write(lambda conn: self.create_tx(conn, namespace, id, labels))
        log.debug("lease.create", namespace=namespace, id=id)
        return lease

    async def delete(self, namespace: str, id: str) -> None:  # noqa: A002
        """Delete lease ``id`` and its resource references; NotFound if missing."""
        await self._store.write(lambda conn: self.delete_tx(conn, namespace, id))
        log.debug("lease.delete", namespace=namespace, id=id)

    async def list(self, namespace: str) -> builtins.list[Lease]:
        """The leases of ``namespace``, sorted by id (empty for an unknown namespace)."""
        return await self._store.read(lambda conn: self.list_tx(conn, namespace))

    async def add_resource(self, namespace: str, lease_id: str, resource: LeaseResource) -> None:
        await self._store.write(lambda conn: self.add_resource_tx(conn, namespace, lease_id, resource))

    async def delete_resource(self, namespace: str, lease_id: str, resource: LeaseResource) -> None:
        await self._store.write(lambda conn: self.delete_resource_tx(conn, namespace, lease_id, resource))

    async def list_resources(self, namespace: str, lease_id: str) -> builtins.list[LeaseResource]:
        """The resources lease ``lease_id`` holds, sorted by type then id; NotFound if no such lease."""
        return await self._store.read(lambda conn: self.list_resources_tx(conn, namespace, lease_id))

    # -- synchronous API ------------------------------------------------------

    def create_tx(
        self,
        conn: sqlite3.Connection,
        namespace: str,
        id: str,  # noqa: A002
        labels: Mapping[str, str] | None = None,
    ) -> Lease:
        require_namespace(namespace)
        validate_lease_id(id)
        clean = validate_labels(f"lease {quote(id)}", labels or {})
        self._namespaces.ensure(conn, namespace)
        now = now_ns()
        cur = conn.execute(
            "INSERT INTO leases (namespace, id, labels, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (namespace, id) DO NOTHING",
            (namespace, id, encode_labels(clean), now),
        )
        if cur.rowcount == 0:
            raise AlreadyExists(f"lease {quote(id)}: already exists")
        return Lease(id, clean, to_datetime(now))

    def delete_tx(self, conn: sqlite3.Connection, namespace: str, id: str) -> None:  # noqa: A002
        require_namespace(namespace)
        cur = conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, id))
        if cur.rowcount == 0:
            raise NotFound(f"lease {quote(id)}: not found")

    def list_tx(self, conn: sqlite3.Connection, namespace: str) -> builtins.list[Lease]:
        require_namespace(namespace)
        rows = conn.execute(
            "SELECT id, labels, created_at FROM leases WHERE namespace = ? ORDER BY id", (namespace,)
        )
        return [Lease(id_, decode_labels(labels), to_datetime(created)) for id_, labels, created in rows]

    def add_resource_tx(
        self, conn: sqlite3.Connection, namespace: str, lease_id: str, resource: LeaseResource
    ) -> None:
        self._require_lease(conn, namespace, lease_id)
        validate_resource(resource)
        conn.execute(
            "INSERT INTO lease_resources (namespace, lease_id, type, id) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (namespace, lease_id, resource.type, resource.id),
        )

    def delete_resource_tx(
        self, conn: sqlite3.Connection, namespace: str, lease_id: str, resource: LeaseResource
    ) -> None:
        self._require_lease(conn, namespace, lease_id)
        validate_resource(resource)
        conn.execute(
            "DELETE FROM lease_resources WHERE namespace = ? AND lease_id = ? AND type = ? AND id = ?",
            (namespace, lease_id, resource.type, resource.id),
        )

    def list_resources_tx(
        self, conn: sqlite3.Connection, namespace: str, lease_id: str
    ) -> builtins.list[LeaseResource]:
        self._require_lease(conn, namespace, lease_id)
        rows = conn.execute(
            "SELECT id, type FROM lease_resources WHERE namespace = ? AND lease_id = ? ORDER BY type, id",
            (namespace, lease_id),
        )
        return [LeaseResource(id=id_, type=type_) for id_, type_ in rows]

    def _require_lease(self, conn: sqlite3.Connection, namespace: str, lease_id: str) -> None:
        require_namespace(namespace)
        found = conn.execute(
            "SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)
        ).fetchone()
        if found is None:
            raise NotFound(f"lease {quote(lease_id)}: not found")
