"""``containerd.services.introspection.v1.Introspection``: what is loaded and why not.

Every registered plugin is listed with its requirements, exports and
capabilities. A plugin that did not load carries ``init_err``: skipped ones
say ``skip plugin: <reason>`` (the words ``ctr plugins ls`` looks for to print
"skip"), failed ones carry their init error. The server UUID is created once
and kept under the plugin's root, so it survives restarts like containerd's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import betterproto.lib.google.protobuf as pb
from grpclib.const import Status as Code

from daemon import filters
from daemon.errors import NotFound
from daemon.hookspecs import hookimpl
from daemon.registry import InitContext, PluginState, Registry, Status
from daemon.validate import required
from protos.containerd.services.introspection.v1 import (
    IntrospectionBase,
    Plugin,
    PluginInfoRequest,
    PluginInfoResponse,
    PluginsRequest,
    PluginsResponse,
    ServerResponse,
)
from protos.google.rpc import Status as RpcStatus

#: Introspection type under which unloadable plugin modules are listed.
BROKEN_MODULE_TYPE = "berth.plugins"


def to_plugin(st: PluginState) -> Plugin:
    reg = st.registration
    err: RpcStatus | None = None
    if st.status is Status.SKIP:
        err = RpcStatus(code=Code.FAILED_PRECONDITION.value, message=f"skip plugin: {st.error}")
    elif st.status is Status.ERROR:
        err = RpcStatus(code=Code.UNKNOWN.value, message=st.error)
    elif st.status is Status.PENDING:
        err = RpcStatus(code=Code.UNAVAILABLE.value, message="plugin not initialised yet")
    return Plugin(
        type=reg.type,
        id=reg.id,
        requires=list(reg.requires),
        exports=dict(st.exports),
        capabilities=list(st.capabilities),
        init_err=err,
    )


def _adaptor(p: Plugin) -> filters.Adaptor:
    def get(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head, rest = path[0], list(path[1:])
        if head == "type":
            return p.type, True
        if head == "id":
            return p.id, True
        if head == "capabilities" and rest:
            return "", rest[0] in p.capabilities
        if head == "exports" and rest:
            key = ".".join(rest)
            return p.exports.get(key, ""), key in p.exports
        return "", False

    return get


def server_uuid(root: Path) -> str:
    """The daemon's identity: created on first start, kept forever after."""
    path = root / "uuid"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value)
    os.replace(tmp, path)
    return value


def _pid_namespace() -> int:
    """The inode of berthd's pid namespace (0 if /proc cannot tell)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class IntrospectionService(IntrospectionBase):
    def __init__(self, ic: InitContext, uuid_: str) -> None:
        self._ic = ic
        self.uuid = uuid_
        self._pidns = _pid_namespace()  # fixed for the life of the process: read once, not per call

    async def plugins(self, plugins_request: PluginsRequest) -> PluginsResponse:
        flt = filters.parse(list(plugins_request.filters))
        listed = [*map(to_plugin, self._ic.plugins()), *self._broken_modules()]
        return PluginsResponse(plugins=[p for p in listed if flt.match(_adaptor(p))])

    def _broken_modules(self) -> list[Plugin]:
        """Plugin packages that failed before registering anything.

        They have no type or id of their own, so they are listed under the
        type ``berth.plugins`` with the module as id: an operator who installed
        a package sees why it is not there, in the same table.
        """
        return [
            Plugin(
                type=BROKEN_MODULE_TYPE,
                id=module,
                init_err=RpcStatus(code=Code.UNKNOWN.value, message=error),
            )
            for module, error in sorted(self._ic.load_errors().items())
        ]

    async def server(self, betterproto_lib_google_protobuf_empty: pb.Empty) -> ServerResponse:
        return ServerResponse(uuid=self.uuid, pid=os.getpid(), pidns=self._pidns, deprecations=[])

    async def plugin_info(self, plugin_info_request: PluginInfoRequest) -> PluginInfoResponse:
        req = plugin_info_request
        required(req.type, "type")
        for st in self._ic.plugins():
            if st.registration.type == req.type and (not req.id or st.registration.id == req.id):
                return PluginInfoResponse(plugin=to_plugin(st))
        raise NotFound(f"plugin {req.type}.{req.id}: not found")


async def init(ic: InitContext) -> IntrospectionService:
    svc = IntrospectionService(ic, server_uuid(ic.root))
    ic.exports["uuid"] = svc.uuid
    return svc


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type="berth.grpc.v1", id="introspection", init=init)
