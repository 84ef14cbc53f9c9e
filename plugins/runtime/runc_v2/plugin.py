"""``berth.runtime.v2.task``: containers run by runc through shims (containerd's runtime v2).

Init checks that runc is there (an error in introspection otherwise, not a
failure at the first task), starts the ttrpc Events server shims forward to
(``<grpc address>.ttrpc``), then recovers the tasks of shims that outlived
the previous berthd (:mod:`.recovery`). The instance is a
:class:`~.manager.TaskManager` (:class:`daemon.protocols.TaskManager`), which
the Tasks service gets from the registry.

State layout, under ``<state>/berth.runtime.v2.task/``: ``<ns>/<id>/`` the
bundles, ``.runc/`` runc's root (given to every shim in its options),
``.shim/`` berth's shim's sockets and logs (names starting with a dot are
never namespaces).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from daemon.config import doc
from daemon.errors import FailedPrecondition
from daemon.hookspecs import hookimpl
from daemon.metadata import MetadataDB
from daemon.registry import InitContext, Registry
from plugins.runtime.runc_v2.forward import ForwardServer
from plugins.runtime.runc_v2.manager import TaskManager
from plugins.runtime.runc_v2.recovery import recover
from plugins.runtime.runc_v2.settings import Settings
from plugins.runtime.runc_v2.shims import resolve_binary

TYPE = "berth.runtime.v2"
ID = "task"
SYSTEMD_RUNNING = Path("/run/systemd/system")


@dataclass
class RuncV2Config:
    """Tasks run by runc, each under a shim process that outlives berthd."""

    runtime_binary: str = field(
        default="",
        metadata=doc(
            'The shim: "" is berth\'s own, forked by a pre-imported server (fast); '
            '"berth-shim-runc-v2" is berth\'s own started as a program; "containerd-shim-runc-v2" '
            "is containerd's (any shim v2 binary name on PATH, or a path, works)"
        ),
    )
    runc_binary: str = field(
        default="runc", metadata=doc("The OCI runtime the shims drive: a name on PATH or a path")
    )
    systemd_cgroup: bool = field(
        default=False,
        metadata=doc(
            "Let runc place containers with systemd (cgroupsPath slice:prefix:name); needs a "
            "running systemd. False: cgroupfs, cgroupsPath /<namespace>/<id>"
        ),
    )
    shim_debug: bool = field(default=False, metadata=doc("Start shims with -debug (verbose shim logs)"))
    recovery_event_grace: float = field(
        default=10.0,
        metadata=doc(
            "After a restart, exits that happened while berthd was down are kept this many seconds "
            "and replayed to event subscribers that attach meanwhile (ctr events, the CRI)"
        ),
    )

    def validate(self) -> None:
        if self.recovery_event_grace < 0:
            raise ValueError(f"recovery_event_grace: {self.recovery_event_grace!r} must not be negative")


def _key(name: str) -> str:
    return f'plugins."{TYPE}.{ID}".{name}'


def _runc(config: RuncV2Config) -> str:
    found = shutil.which(config.runc_binary)
    if found is None:
        raise FailedPrecondition(
            f"{_key('runc_binary')}: {config.runc_binary!r} not found on PATH "
            f"({os.environ.get('PATH', '')}); install runc or set the key to its path"
        )
    return found


async def init(ic: InitContext) -> TaskManager:
    config = ic.config if isinstance(ic.config, RuncV2Config) else RuncV2Config()
    runc = _runc(config)
    if config.systemd_cgroup and not os.path.isdir(SYSTEMD_RUNNING):  # noqa: ASYNC240 - one stat at init
        raise FailedPrecondition(
            f"{_key('systemd_cgroup')}: true needs a running systemd ({SYSTEMD_RUNNING} is missing); "
            "set it to false to use cgroupfs"
        )
    shim_binary = resolve_binary(config.runtime_binary)
    db: MetadataDB = ic.get("berth.metadata.v1")
    address = ic.paths.address.removeprefix("unix://")
    publish = Path(sys.executable).parent / "berthd"
    settings = Settings(
        state=ic.state,
        runc_root=ic.state / ".runc",
        shim_state=ic.state / ".shim",
        runtime_binary=config.runtime_binary,
        shim_binary=shim_binary,
        runc_binary=runc,
        systemd_cgroup=config.systemd_cgroup,
        shim_debug=config.shim_debug,
        address=address,
        ttrpc_address=f"{address}.ttrpc",
        publish_binary=str(publish) if publish.exists() else sys.executable,
        recovery_event_grace=config.recovery_event_grace,
    )
    settings.runc_root.mkdir(mode=0o711, exist_ok=True)
    settings.shim_state.mkdir(mode=0o711, exist_ok=True)
    manager = TaskManager(settings, db.containers, db.snapshotter, ic.bus)
    forward = ForwardServer(manager.on_envelope)
    manager.open_replay_window()
    await forward.start(settings.ttrpc_address)

    async def close() -> None:
        await forward.stop()
        await manager.close()

    ic.on_close(close)
    adopted, cleaned = await recover(manager)
    ic.log.info("runtime.recovered", adopted=adopted, cleaned=cleaned)
    ic.exports.update(
        {
            "runc": runc,
            "shim": config.runtime_binary or "berth-shim-runc-v2 (zygote)",
            "shim_binary": shim_binary,
            "ttrpc_address": settings.ttrpc_address,
            "cgroup_driver": "systemd" if config.systemd_cgroup else "cgroupfs",
        }
    )
    return manager


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(type=TYPE, id=ID, config=RuncV2Config, requires=["berth.metadata.v1"], init=init)
