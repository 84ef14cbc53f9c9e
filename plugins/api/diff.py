"""``containerd.services.diff.v1.Diff``: apply layers onto snapshots, on the wire.

``Apply`` reads the layer blob ``diff`` from the request namespace's content
store and hands it, with the mounts of an ACTIVE snapshot (as Prepare
returned them), to the ``berth.diff.v1`` applier, which writes it into the
snapshot without mounting anything and answers the descriptor of the
*uncompressed* tar (its digest is the layer's diff id). This is the step
``ctr images unpack`` and containerd's client-side unpacker call between
``Snapshots.Prepare`` and ``Snapshots.Commit``. The ``payloads`` field
(stream processor options) is ignored; ``sync_fs`` syncs file systems
before answering.

``Diff`` (making a layer from two mounts) is UNIMPLEMENTED: berth does not
create layers yet.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from daemon.errors import InvalidArgument, Unimplemented
from daemon.hookspecs import hookimpl
from daemon.metadata import MetadataDB, NamespacedContent
from daemon.metadata.validate import validate_digest
from daemon.protocols import Applier, ContentReader, Descriptor, Mount
from daemon.registry import InitContext, Registry
from daemon.server import request_namespace
from daemon.validate import required
from protos.containerd.services.diff.v1 import (
    ApplyRequest,
    ApplyResponse,
    DiffBase,
    DiffRequest,
    DiffResponse,
)
from protos.containerd.types import Descriptor as PbDescriptor
from protos.containerd.types import Mount as PbMount


class _BlobStream:
    """A content reader as the applier's :class:`daemon.protocols.ByteStream`."""

    def __init__(self, reader: ContentReader) -> None:
        self._reader = reader
        self._offset = 0

    async def read(self, n: int = -1) -> bytes:
        left = self._reader.size - self._offset
        if left <= 0:
            return b""
        data = await self._reader.read_at(self._offset, left if n < 0 else min(n, left))
        self._offset += len(data)
        return data


def _mounts(mounts: Sequence[PbMount]) -> list[Mount]:
    if not mounts:
        raise InvalidArgument("mounts: must not be empty (the mounts of an active snapshot)")
    return [
        Mount(required(m.type, f"mounts[{i}].type"), m.source, m.target, tuple(m.options))
        for i, m in enumerate(mounts)
    ]


def _descriptor(desc: PbDescriptor) -> Descriptor:
    digest = validate_digest("diff.digest", required(desc.digest, "diff.digest"))
    media_type = required(desc.media_type, "diff.media_type")
    if desc.size < 0:
        raise InvalidArgument(f"diff.size: must not be negative, not {desc.size}")
    return Descriptor(media_type, digest, desc.size, dict(desc.annotations))


class DiffService(DiffBase):
    def __init__(self, content: NamespacedContent, applier: Applier) -> None:
        self.content = content
        self.applier = applier

    async def apply(self, apply_request: ApplyRequest) -> ApplyResponse:
        req = apply_request
        desc = _descriptor(req.diff)
        mounts = _mounts(req.mounts)
        reader = await self.content.reader(request_namespace(), desc.digest)
        try:
            if desc.size and desc.size != reader.size:
                raise InvalidArgument(
                    f"diff.size: {desc.size} given, but content {desc.digest} has {reader.size} bytes"
                )
            applied = await self.applier.apply(desc, mounts, _BlobStream(reader))
        finally:
            await reader.close()
        if req.sync_fs:
            await asyncio.to_thread(os.sync)
        return ApplyResponse(
            applied=PbDescriptor(
                media_type=applied.media_type,
                digest=applied.digest,
                size=applied.size,
                annotations=dict(applied.annotations),
            )
        )

    async def diff(self, diff_request: DiffRequest) -> DiffResponse:
        raise Unimplemented("diff: creating a layer from two mounts is not supported by berth yet (Apply is)")


async def init(ic: InitContext) -> DiffService:
    db: MetadataDB = ic.get("berth.metadata.v1")
    return DiffService(db.content, ic.get("berth.diff.v1"))


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.grpc.v1", id="diff", init=init, requires=["berth.metadata.v1", "berth.diff.v1"])


__all__ = ["DiffService", "berth_register"]
