"""Pod sandboxes: run, stop, remove, status, list, stats, with containerd 1.7's semantics.

What RunPodSandbox makes, in order (each undone, in reverse, if a later step fails)::

    name reserved           <name>_<namespace>_<uid>_<attempt>, AlreadyExists naming the holder
    namespaces pinned       net, ipc, uts files in the sandbox dir (NODE modes: the host's, not pinned;
                            host network implies the host's UTS, as in containerd); hostname set
    files                   hostname, hosts, resolv.conf; shm tmpfs unless IPC is NODE
    CNI ADD                 PodRef + portMappings; the pod IP (no CNI for host network)
    pod shim                started in the background from the first step on (TaskManager.prepare_shim),
                            unless an infra task will start it
    record                  a container record in k8s.io (CriStore.add_sandbox)
    infra task              only if the pod shares its PID namespace (module infra)
    READY                   status file written; CREATED and STARTED events

StopPodSandbox stops the pod's containers (the ``stop_containers`` hook the
container side supplies), the infra task, the pod's shim if it serves no task,
runs CNI DEL, unpins the namespaces and unmounts shm; the record stays,
NOTREADY. RemovePodSandbox stops first if needed, removes the pod's
containers (``remove_containers`` hook), the directory, the record and the
name. Both are idempotent and an unknown id is OK.

Every change to one sandbox happens under its entry's lock; different pods
proceed concurrently. On start (:meth:`SandboxManager.recover`) sandboxes
loaded from the store stay READY only if their namespaces are still pinned
and their infra task (if any) still runs; the infra's exit while berthd runs
makes the pod NOTREADY, as a pause container's exit does in containerd.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import BerthError, FailedPrecondition, NotFound
from daemon.events import EventBus, Subscription
from daemon.oci.spec import Spec
from daemon.protocols import TaskManager, TaskStatus
from plugins.cri import events, netns
from plugins.cri.cni.network import CniNetwork, PodRef
from plugins.cri.sandbox import files, infra
from plugins.cri.sandbox import stats as podstats
from plugins.cri.sandbox.validate import check_resources, check_sandbox_config, required
from plugins.cri.sandbox.views import NOTREADY, READY, sandbox_pb, status_pb
from plugins.cri.store import (
    NAMESPACE,
    CriStore,
    Entry,
    Sandbox,
    SandboxMeta,
    SandboxStatus,
    now_ns,
    sandbox_name,
)
from plugins.cri.wirecache import EncodedEntries
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.sandbox")

ContainerHook = Callable[[str], Awaitable[None]]
#: The runtime handlers RunPodSandbox accepts: the default ("") and containerd's default name.
DEFAULT_HANDLERS = ("", "runc")

_MODE = cri.NamespaceMode
_PROTOCOL_NAMES = {cri.Protocol.TCP: "tcp", cri.Protocol.UDP: "udp", cri.Protocol.SCTP: "sctp"}


def port_mappings(config: cri.PodSandboxConfig) -> list[dict[str, Any]]:
    """containerd's ``toCNIPortMappings``: only mappings with a host port."""
    return [
        {
            "hostPort": pm.host_port,
            "containerPort": pm.container_port,
            "protocol": _PROTOCOL_NAMES.get(pm.protocol, "tcp"),
            "hostIP": pm.host_ip,
        }
        for pm in config.port_mappings
        if pm.host_port > 0
    ]


def pod_ref(config: cri.PodSandboxConfig) -> PodRef:
    md = config.metadata
    return PodRef(namespace=md.namespace, name=md.name, uid=md.uid)


class SandboxManager:
    """The pod sandboxes of the CRI plugin; see the module docstring.

    ``tasks`` runs infra processes; ``state_dir`` holds one directory per
    sandbox (namespace files, hosts, resolv.conf, shm). ``stop_containers``
    and ``remove_containers`` are the container side's hooks, called with a
    sandbox id (they may be set after construction).
    """

    def __init__(
        self,
        store: CriStore,
        network: CniNetwork,
        tasks: TaskManager,
        bus: EventBus,
        *,
        state_dir: Path,
        cgroup_driver: str = "cgroupfs",
        sandbox_image: str = "",
        handlers: Collection[str] = DEFAULT_HANDLERS,
        stop_containers: ContainerHook | None = None,
        remove_containers: ContainerHook | None = None,
    ) -> None:
        self.store = store
        self.network = network
        self.tasks = tasks
        self.bus = bus
        self.state_dir = state_dir
        self.systemd = cgroup_driver == "systemd"
        self.sandbox_image = sandbox_image
        self.image_infra: infra.SandboxImage | None = None  # set by the plugin for a sandbox_image
        self.handlers = frozenset(handlers)
        self.stop_containers = stop_containers
        self.remove_containers = remove_containers
        self.rates = podstats.CpuRates()
        self._configs: dict[str, cri.PodSandboxConfig] = {}
        self.wire = EncodedEntries()
        self._watch: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None

    # -- helpers -------------------------------------------------------------------------

    def config_of(self, sb: Sandbox) -> cri.PodSandboxConfig:
        """The PodSandboxConfig kubelet sent (decoded once and kept)."""
        found = self._configs.get(sb.id)
        if found is None:
            found = cri.PodSandboxConfig().parse(sb.meta.config)
            self._configs[sb.id] = found
        return found

    def encoded(self, sb: Sandbox) -> bytes:
        """``sb``'s ``cri.PodSandbox`` as a field-1 element (:mod:`plugins.cri.wirecache`), cached.

        The version is what :func:`sandbox_pb` reads that can change: the
        state (created_at too, for safety); the rest is fixed at RunPodSandbox.
        """
        return self.wire.get(
            sb.id, (sb.status.state, sb.status.created_at), lambda: sandbox_pb(sb, self.config_of(sb))
        )

    def status_of(self, sb: Sandbox) -> cri.PodSandboxStatus:
        return status_pb(sb, self.config_of(sb))

    def _event(self, sb: Sandbox, kind: cri.ContainerEventType) -> None:
        events.publish(self.bus, events.container_event(sb.id, kind, sandbox_status=self.status_of(sb)))

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.state_dir / sandbox_id

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Reconcile what the store loaded, then watch for infra exits."""
        await self.recover()
        self._sub = self.bus.subscribe(
            topic_prefix="/tasks/exit", namespace=NAMESPACE, name="cri-sandbox", replay=True
        )
        self._watch = asyncio.create_task(self._watch_exits(self._sub), name="cri-sandbox-exits")

    async def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def recover(self) -> None:
        """After a restart: a READY pod whose namespaces or infra task are gone becomes NOTREADY."""
        for sb in list(self.store.sandboxes.values()):
            if sb.status.state != READY:
                continue
            reason = ""
            for kind, path in (
                ("net", sb.meta.netns_path),
                ("ipc", sb.meta.ipc_path),
                ("uts", sb.meta.uts_path),
            ):
                if path and not netns.is_pinned(path, kind):
                    reason = f"{kind} namespace {path} is no longer pinned"
            if not reason and sb.status.pid:
                try:
                    state = await self.tasks.get(NAMESPACE, sb.id)
                except NotFound:
                    reason = "infra task is gone"
                else:
                    if state.status != TaskStatus.RUNNING:
                        reason = f"infra task is {state.status.name.lower()}"
            if reason:
                log.warning("sandbox.recover.notready", sandbox=sb.id, reason=reason)
                sb.status.state = NOTREADY
                await self.store.save_status(sb)
        log.info("sandbox.recovered", sandboxes=len(self.store.sandboxes))

    async def _watch_exits(self, sub: Subscription) -> None:
        async for env in sub:
            container_id = getattr(env.event, "container_id", "")
            sb = self.store.sandboxes.get(container_id)
            if sb is None or not sb.status.pid or sb.status.state != READY:
                continue
            if getattr(env.event, "pid", 0) not in (0, sb.status.pid):
                continue
            async with sb.lock:
                if sb.status.state == READY:
                    log.warning("sandbox.infra.exited", sandbox=sb.id, pid=sb.status.pid)
                    sb.status.state = NOTREADY
                    try:
                        await self.store.save_status(sb)
                    except OSError as exc:
                        log.error("sandbox.save_status_failed", sandbox=sb.id, error=str(exc))
                    self._event(sb, cri.ContainerEventType.CONTAINER_STOPPED_EVENT)

    # -- RunPodSandbox -------------------------------------------------------------------

    async def run(self, config: cri.PodSandboxConfig, runtime_handler: str = "") -> str:
        """Make a READY sandbox; its id. All or nothing (module docstring)."""
        check_sandbox_config(config, runtime_handler, self.handlers, systemd=self.systemd)
        md = config.metadata
        name = sandbox_name(md.name, md.namespace, md.uid, md.attempt)
        sandbox_id = secrets.token_hex(32)
        self.store.sandbox_names.reserve(name, sandbox_id)
        undo: list[Callable[[], Awaitable[None]]] = []
        started = time.monotonic()
        try:
            sb = await self._run(config, runtime_handler, name, sandbox_id, undo)
        except BaseException as exc:
            log.warning("sandbox.run.failed", sandbox=sandbox_id, name=name, error=str(exc))
            await asyncio.shield(self._undo(sandbox_id, undo))
            self.store.sandbox_names.release(name, sandbox_id)
            self._configs.pop(sandbox_id, None)
            raise
        log.info(
            "sandbox.run", sandbox=sandbox_id, name=name, ip=sb.status.ip or None,
            pid=sb.status.pid or None, ms=round((time.monotonic() - started) * 1000, 1),
        )  # fmt: skip
        self._event(sb, cri.ContainerEventType.CONTAINER_CREATED_EVENT)
        self._event(sb, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
        return sandbox_id

    async def _undo(self, sandbox_id: str, undo: list[Callable[[], Awaitable[None]]]) -> None:
        for step in reversed(undo):
            try:
                await step()
            except (BerthError, OSError) as exc:
                log.error("sandbox.run.undo_failed", sandbox=sandbox_id, error=str(exc))

    async def _run(
        self,
        config: cri.PodSandboxConfig,
        runtime_handler: str,
        name: str,
        sandbox_id: str,
        undo: list[Callable[[], Awaitable[None]]],
    ) -> Sandbox:
        options = config.linux.security_context.namespace_options
        host_net = options.network == _MODE.NODE
        host_ipc = options.ipc == _MODE.NODE
        directory = self.sandbox_dir(sandbox_id)
        hostname = files.pod_hostname(config)
        kinds = [k for k, host in (("net", host_net), ("ipc", host_ipc), ("uts", host_net)) if not host]
        shared_pid = options.pid == _MODE.POD or self.image_infra is not None

        undo.append(lambda: files.remove_dir(directory))
        if not shared_pid:
            # The pod's shim starts now, beside the steps below, so StartContainer finds it running
            # (an infra task starts it anyway). Never fails; a pod that never starts a container
            # gets it shut down at StopPodSandbox.
            undo.append(lambda: self.tasks.release_idle_shim(NAMESPACE, sandbox_id))
            self.tasks.prepare_shim(NAMESPACE, sandbox_id)
        paths: dict[str, Path] = {}
        if kinds:
            undo.append(lambda: netns.remove_all(directory, kinds))
            paths = await netns.create(directory, kinds, hostname=hostname if "uts" in kinds else None)
        await files.write_files(directory, hostname, config.dns_config)
        if not host_ipc:
            await files.mount_shm(directory)

        status = SandboxStatus(state=NOTREADY, created_at=now_ns())
        pod = pod_ref(config)
        if not host_net:
            net_path = paths["net"]
            undo.append(lambda: self.network.delete(sandbox_id, net_path, pod=pod))
            result = await self.network.add(
                sandbox_id, net_path, pod=pod, capability_args={"portMappings": port_mappings(config)}
            )
            ips = result.pod_ips
            status.ip = ips[0] if ips else ""
            status.additional_ips = ips[1:]
            status.network_ready = True

        meta = SandboxMeta(
            id=sandbox_id,
            name=name,
            config=bytes(config),
            runtime_handler=runtime_handler,
            netns_path=str(paths.get("net", "")),
            ipc_path=str(paths.get("ipc", "")),
            uts_path=str(paths.get("uts", "")),
            cgroup_parent=config.linux.cgroup_parent,
            root_dir=str(directory),
        )
        sb: Sandbox = Entry(meta, status, dict(config.labels), dict(config.annotations))
        self._configs[sandbox_id] = config
        # The record always carries the infra spec (a container record needs one, and it shows
        # the pod's namespaces and cgroup); the task runs only for a shared PID namespace.
        spec = self._infra_spec(sb, config, paths)
        root = infra.InfraRoot()
        if shared_pid:
            root = await infra.prepare_root(directory, sandbox_id, self.image_infra, undo)
        undo.append(lambda: self.store.remove_sandbox(sb))
        await self.store.add_sandbox(
            sb, dict(config.labels), spec=root.spec(spec, sb.id), image=root.image,
            snapshotter=root.snapshotter, snapshot_key=root.snapshot_key,
        )  # fmt: skip
        if shared_pid:
            undo.append(lambda: infra.stop(self.tasks, sandbox_id))
            status.pid = await infra.start(self.tasks, sandbox_id)
        status.state = READY
        await self.store.save_status(sb)
        return sb

    def _infra_spec(self, sb: Sandbox, config: cri.PodSandboxConfig, paths: Mapping[str, Path]) -> Spec:
        md = config.metadata
        annotations = {
            **config.annotations,
            infra.CONTAINER_TYPE: infra.CONTAINER_TYPE_SANDBOX,
            infra.SANDBOX_ID: sb.id,
            infra.SANDBOX_NAME: md.name,
            infra.SANDBOX_NAMESPACE: md.namespace,
            infra.SANDBOX_UID: md.uid,
            infra.SANDBOX_LOG_DIR: config.log_directory,
        }
        oci_kinds = {"net": "network", "ipc": "ipc", "uts": "uts"}
        return infra.infra_spec(
            sb.id,
            Path(sb.meta.root_dir),
            namespaces={oci_kinds[k]: str(p) for k, p in paths.items()},
            annotations=annotations,
            cgroup_parent=sb.meta.cgroup_parent,
            systemd_cgroup=self.systemd,
        )

    # -- StopPodSandbox / RemovePodSandbox -----------------------------------------------

    async def stop(self, sandbox_id: str) -> None:
        """Stop the pod (module docstring); OK for an unknown id."""
        required(sandbox_id, "pod_sandbox_id")
        try:
            sb = self.store.sandbox(sandbox_id)
        except NotFound:
            return
        async with sb.lock:
            await self._stop_locked(sb)

    async def _stop_locked(self, sb: Sandbox) -> None:
        was_ready = sb.status.state == READY
        if self.stop_containers is not None:
            await self.stop_containers(sb.id)
        config = self.config_of(sb)
        await infra.stop(self.tasks, sb.id)
        await self.tasks.release_idle_shim(NAMESPACE, sb.id)
        if sb.meta.netns_path:
            await self.network.delete(sb.id, sb.meta.netns_path, pod=pod_ref(config))
        directory = Path(sb.meta.root_dir)
        await files.unmount_shm(directory)
        kinds = [
            k
            for k, p in (("net", sb.meta.netns_path), ("ipc", sb.meta.ipc_path), ("uts", sb.meta.uts_path))
            if p
        ]
        if kinds:
            await netns.remove_all(directory, kinds)
        sb.status.state = NOTREADY
        sb.status.network_ready = False
        sb.status.pid = 0
        await self.store.save_status(sb)
        self.rates.forget(sb.id)
        log.info("sandbox.stop", sandbox=sb.id)
        if was_ready:
            self._event(sb, cri.ContainerEventType.CONTAINER_STOPPED_EVENT)

    async def remove(self, sandbox_id: str) -> None:
        """Remove the pod and everything of it, stopping it first if needed; OK for an unknown id."""
        required(sandbox_id, "pod_sandbox_id")
        try:
            sb = self.store.sandbox(sandbox_id)
        except NotFound:
            return
        async with sb.lock:
            if sb.id not in self.store.sandboxes:
                return  # removed while we waited for the lock
            if sb.status.state == READY or sb.status.pid or sb.status.network_ready:
                await self._stop_locked(sb)
            if self.remove_containers is not None:
                await self.remove_containers(sb.id)
            await infra.release_root(self.image_infra, sb.id)
            await files.remove_dir(Path(sb.meta.root_dir))
            status = self.status_of(sb)
            await self.store.remove_sandbox(sb)
            self._configs.pop(sb.id, None)
            self.wire.forget(sb.id)
        log.info("sandbox.remove", sandbox=sb.id)
        events.publish(
            self.bus,
            events.container_event(
                sb.id, cri.ContainerEventType.CONTAINER_DELETED_EVENT, sandbox_status=status
            ),
        )

    # -- queries -------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> Sandbox:
        """The sandbox of an id or unique prefix; NotFound naming it, InvalidArgument if empty."""
        return self.store.sandbox(required(sandbox_id, "pod_sandbox_id"))

    async def process_status(self, sb: Sandbox) -> str:
        """The infra task's state for verbose status ("" when the pod has none)."""
        if not sb.status.pid:
            return ""
        try:
            state = await self.tasks.get(NAMESPACE, sb.id)
        except NotFound:
            return "deleted"
        return state.status.name.lower()

    def list(
        self, *, id_prefix: str = "", state: str | None = None, labels: Mapping[str, str] | None = None
    ) -> list[Sandbox]:
        """Sandboxes matching every given filter, oldest first."""
        out = []
        for sb in self.store.sandboxes.values():
            if id_prefix and not sb.id.startswith(id_prefix):
                continue
            if state is not None and sb.status.state != state:
                continue
            if labels and any(sb.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(sb)
        out.sort(key=lambda s: s.status.created_at)
        return out

    async def update_resources(
        self, sandbox_id: str, overhead: cri.LinuxContainerResources, resources: cri.LinuxContainerResources
    ) -> None:
        """Validate and record the pod's new resources (containers are resized by their own update)."""
        sb = self.get(sandbox_id)
        check_resources(overhead, "overhead")
        check_resources(resources, "resources")
        async with sb.lock:
            config = self.config_of(sb)
            config.linux.overhead = overhead
            config.linux.resources = resources
        log.info("sandbox.update_resources", sandbox=sb.id)

    # -- stats ---------------------------------------------------------------------------

    async def stats(self, sb: Sandbox) -> cri.PodSandboxStats:
        """CPU and memory summed over the pod's tasks, per-container figures, network of the netns.

        Every task's metrics and pids are asked for at once (two shim round trips each)."""
        config = self.config_of(sb)
        now = now_ns()
        found = self.store.containers_of(sb.id)
        ids = [sb.id, *(c.id for c in found)] if sb.status.pid else [c.id for c in found]
        usages, counts = await asyncio.gather(
            asyncio.gather(*(self._usage(i) for i in ids)),
            asyncio.gather(*(self._pid_count(i) for i in ids)),
        )
        total = sum(usages, podstats.Usage())
        containers: list[cri.ContainerStats] = []
        for c, usage in zip(found, usages[len(ids) - len(found) :], strict=True):
            c_config = cri.ContainerConfig().parse(c.meta.config)
            containers.append(
                cri.ContainerStats(
                    attributes=cri.ContainerAttributes(
                        id=c.id,
                        metadata=c_config.metadata,
                        labels=dict(c.labels),
                        annotations=dict(c.annotations),
                    ),
                    cpu=podstats.cpu_pb(usage, now, self.rates.rate(c.id, now, usage.cpu_ns)),
                    memory=podstats.memory_pb(usage, now),
                )
            )
        linux = cri.LinuxPodSandboxStats(
            cpu=podstats.cpu_pb(total, now, self.rates.rate(sb.id, now, total.cpu_ns)),
            memory=podstats.memory_pb(total, now),
            containers=containers,
            process=cri.ProcessUsage(timestamp=now, process_count=cri.UInt64Value(sum(counts))),
        )
        if sb.meta.netns_path and netns.is_pinned(sb.meta.netns_path, "net"):
            try:
                linux.network = await podstats.network_usage(sb.meta.netns_path, now)
            except FailedPrecondition as exc:
                log.warning("sandbox.stats.network", sandbox=sb.id, error=exc.message)
        return cri.PodSandboxStats(
            attributes=cri.PodSandboxAttributes(
                id=sb.id, metadata=config.metadata, labels=dict(sb.labels), annotations=dict(sb.annotations)
            ),
            linux=linux,
        )

    async def _usage(self, container_id: str) -> podstats.Usage:
        try:
            return podstats.usage_of(await self.tasks.stats(NAMESPACE, container_id))
        except (NotFound, FailedPrecondition):
            return podstats.Usage()
        except BerthError as exc:
            log.debug("sandbox.stats.task", container=container_id, error=exc.message)
            return podstats.Usage()

    async def _pid_count(self, task_id: str) -> int:
        """How many processes the task has; 0 when it has none or its shim cannot say."""
        try:
            return len(await self.tasks.pids(NAMESPACE, task_id))
        except BerthError:
            return 0
