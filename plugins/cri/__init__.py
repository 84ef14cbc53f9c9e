"""``berth.cri.v1.cri``: kubelet's runtime.v1 (CRI) on berth's main socket.

The plugin instance is a :class:`Cri`: the config, the CRI image semantics
(:class:`~plugins.cri.images.CriImages`), the pod network
(:class:`~plugins.cri.cni.network.CniNetwork`) and the two gRPC services,
which two ``berth.grpc.v1`` plugins hand to the server:
``berth.grpc.v1.cri-runtime`` serves ``runtime.v1.RuntimeService``,
``berth.grpc.v1.cri-images`` serves ``runtime.v1.ImageService``.
Everything CRI lives in the ``k8s.io`` namespace of the native API, as in containerd.

Modules: :mod:`.config` (the config table), :mod:`.images` (references, image
ids, the records of ``k8s.io``), :mod:`.imageservice` and
:mod:`.runtimeservice` (the wire), ``cni/`` (CNI plugins by the spec),
:mod:`.netns` (pinned pod namespaces).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.hookspecs import hookimpl
from daemon.metadata.db import MetadataDB
from daemon.protocols import ImageManager, TaskManager
from daemon.registry import InitContext, Registry
from plugins.cri.cni.network import CniNetwork
from plugins.cri.config import CriConfig
from plugins.cri.container.manager import ContainerManager
from plugins.cri.images import K8S_NAMESPACE, CriImages
from plugins.cri.imageservice import ImageService
from plugins.cri.runtimeservice import RuntimeService
from plugins.cri.sandbox.infra import SandboxImage
from plugins.cri.sandbox.manager import SandboxManager
from plugins.cri.store import CriStore
from plugins.cri.streaming.backend import TaskBackend
from plugins.cri.streaming.server import StreamingServer

TYPE = "berth.cri.v1"
ID = "cri"
FULL_NAME = f"{TYPE}.{ID}"
SNAPSHOTTER_TYPE = "berth.snapshotter.v1"
RUNTIME = "berth.runtime.v2.task"

__all__ = ["Cri", "CriConfig", "berth_register"]


@dataclass
class Cri:
    """The CRI plugin's parts, for its gRPC faces (and, later, the streaming server and stores)."""

    config: CriConfig
    images: CriImages
    network: CniNetwork
    runtime_service: RuntimeService
    image_service: ImageService
    store: CriStore
    sandboxes: SandboxManager
    streaming: StreamingServer


def snapshotter_root(ic: InitContext, snapshotter: str) -> str:
    """The snapshotter's root directory as it exports it (else where the registry puts plugin roots)."""
    name = f"{SNAPSHOTTER_TYPE}.{snapshotter}"
    for state in ic.plugins():
        if state.full_name == name and state.exports.get("root"):
            return state.exports["root"]
    return str(ic.paths.root / name)


async def init(ic: InitContext) -> Cri:
    config = ic.config if isinstance(ic.config, CriConfig) else CriConfig()
    images: ImageManager = ic.get("berth.images.v1")
    db: MetadataDB = ic.get("berth.metadata.v1")
    db.snapshotter(config.snapshotter)  # NotFound naming the loaded ones, rather than at the first pull
    cri_images = CriImages(
        images, db, snapshotter=config.snapshotter, mountpoint=snapshotter_root(ic, config.snapshotter)
    )
    network = CniNetwork(config.conf_dir, Path(ic.state) / "cni", bin_dirs=config.bin_dirs)
    store = CriStore(db.containers, Path(ic.root))
    await store.load()
    tasks: TaskManager = ic.get("berth.runtime.v2")
    sandboxes = SandboxManager(
        store,
        network,
        tasks,
        ic.bus,
        state_dir=Path(ic.state) / "sandboxes",
        cgroup_driver=config.cgroup_driver,
        sandbox_image=config.sandbox_image,
    )
    if config.sandbox_image:
        snapshots = db.snapshotter(config.snapshotter)
        sandboxes.image_infra = SandboxImage(config.sandbox_image, cri_images, snapshots, db.leases)
    containers = ContainerManager(
        store=store,
        tasks=tasks,
        images=cri_images,
        records=db.containers,
        snapshotter=db.snapshotter(config.snapshotter),
        leases=db.leases,
        bus=ic.bus,
        state=Path(ic.state),
        cgroup_driver=config.cgroup_driver,
        max_log_line=config.max_container_log_line_size,
        runc=next((s.exports.get("runc") for s in ic.plugins() if s.full_name == RUNTIME), None) or "runc",
    )
    sandboxes.stop_containers = containers.stop_containers
    sandboxes.remove_containers = containers.remove_containers
    await containers.start()
    ic.on_close(containers.close)
    await sandboxes.start()
    ic.on_close(sandboxes.close)
    runtime_service = RuntimeService(config, network)
    runtime_service.sandbox_manager = sandboxes
    runtime_service.containers = containers
    backend = TaskBackend(tasks, store, db.containers, Path(ic.state) / "fifo")
    streaming = StreamingServer(config, backend)
    stream_url = await streaming.start()
    ic.on_close(streaming.stop)
    runtime_service.streaming = streaming
    ic.exports.update(
        namespace=K8S_NAMESPACE,
        snapshotter=config.snapshotter,
        conf_dir=config.conf_dir,
        cgroup_driver=config.cgroup_driver,
        stream_server=stream_url,
    )
    return Cri(
        config=config,
        images=cri_images,
        network=network,
        runtime_service=runtime_service,
        image_service=ImageService(cri_images),
        store=store,
        sandboxes=sandboxes,
        streaming=streaming,
    )


async def init_runtime_service(ic: InitContext) -> RuntimeService:
    cri: Cri = ic.get(FULL_NAME)
    return cri.runtime_service


async def init_image_service(ic: InitContext) -> ImageService:
    cri: Cri = ic.get(FULL_NAME)
    return cri.image_service


@hookimpl
def berth_register(registry: Registry) -> None:
    registry.add(
        type=TYPE,
        id=ID,
        requires=["berth.images.v1", "berth.metadata.v1", "berth.runtime.v2"],
        config=CriConfig,
        init=init,
    )
    registry.add(type="berth.grpc.v1", id="cri-runtime", requires=[FULL_NAME], init=init_runtime_service)
    registry.add(type="berth.grpc.v1", id="cri-images", requires=[FULL_NAME], init=init_image_service)
