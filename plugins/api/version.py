"""``containerd.services.version.v1.Version``: which berthd answers."""

from __future__ import annotations

import betterproto.lib.google.protobuf as pb

from daemon import __version__
from daemon.hookspecs import hookimpl
from daemon.registry import InitContext, Registry
from protos.containerd.services.version.v1 import VersionBase, VersionResponse

#: containerd reports its git revision; berth reports its release line.
REVISION = f"berth-{__version__}"


class VersionService(VersionBase):
    async def version(self, betterproto_lib_google_protobuf_empty: pb.Empty) -> VersionResponse:
        return VersionResponse(version=__version__, revision=REVISION)


async def init(ic: InitContext) -> VersionService:
    return VersionService()


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.grpc.v1", id="version", init=init)
