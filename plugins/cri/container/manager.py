"""CRI containers: create, start, stop, remove, exec, stats, and exits from the bus.

The life of a container, as containerd 1.7's CRI runs it:

* CreateContainer: the name is reserved, the image resolved in ``k8s.io``, a
  snapshot prepared on its chain id (key = container id), the OCI spec made
  (:mod:`.specgen`) and everything persisted as a container record
  (:meth:`CriStore.add_container`). State CREATED; no task yet. (:mod:`.create`)
* StartContainer: the task is created and started, its stdout/stderr going
  to ``crilog://<log path>``, which berth's shim writes in the CRI log format
  itself. RUNNING with pid and started_at. A failure is recorded (EXITED,
  reason ``StartError``) and returned.
* Exits come from the bus (``/tasks/exit`` of ``k8s.io``): EXITED with the
  exit code, reason ``Completed``/``Error``/``OOMKilled`` (``/tasks/oom``
  seen before), the task deleted, a CONTAINER_STOPPED event. (:mod:`.exits`)
* StopContainer signals and waits (SIGKILL after the grace period);
  RemoveContainer force-stops, then deletes task, snapshot, record and name.
  Both are idempotent for unknown ids, as kubelet needs.

After a restart, :meth:`ContainerManager.start` reconciles the loaded store
with the runtime: a task still running stays RUNNING, one that exited
meanwhile becomes EXITED with its real exit code (the runtime replays the
exit, and its State answers it too). (:mod:`.reconcile`)

The wire views are in :mod:`.views`, ExecSync in :mod:`.execsync`, the
stop signal in :mod:`.signals`; this module holds the manager that ties them
to the store, the runtime and the bus.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import betterproto
import structlog

from daemon.errors import (
    BerthError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from daemon.events import EventBus
from daemon.metadata.containers import ContainerStore, TypedValue
from daemon.metadata.leases import LeaseStore
from daemon.metadata.snapshots import NamespacedSnapshotter
from daemon.oci.spec import clamp_oom_score_adj, encode
from daemon.protocols import ExitStatus, Opaque, TaskIO, TaskManager
from plugins.cri import events
from plugins.cri.container import execsync, imagevolume, specgen, views
from plugins.cri.container.create import Creator, resolve_log_path
from plugins.cri.container.exits import ExitWatcher
from plugins.cri.container.model import (
    CREATED,
    EXITED,
    KILL_WAIT,
    NAMESPACE,
    REASON_START_ERROR,
    RESOURCES_TYPE,
    RUNNING,
    SPEC_TYPE,
    START_ERROR_CODE,
    UNKNOWN,
    UNKNOWN_EXIT_CODE,
    Parsed,
)
from plugins.cri.container.reconcile import reconcile
from plugins.cri.container.signals import image_stop_signal, signal_number
from plugins.cri.container.stats import CpuRates, Sample, cpu_usage, decode, memory_usage
from plugins.cri.images import CriImage, CriImages
from plugins.cri.sandbox.views import status_pb as pod_status_pb
from plugins.cri.store import CriContainer, CriStore, Sandbox, container_name, now_ns
from plugins.cri.wirecache import EncodedEntries
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.containers")


class ContainerManager:
    """The CRI container side; see the module doc. One per CRI plugin."""

    def __init__(
        self,
        *,
        store: CriStore,
        tasks: TaskManager,
        images: CriImages,
        records: ContainerStore,
        snapshotter: NamespacedSnapshotter,
        leases: LeaseStore,
        bus: EventBus,
        state: Path,
        cgroup_driver: str = "cgroupfs",
        max_log_line: int = 16384,
        runc: str = "runc",
    ) -> None:
        self.store = store
        self.tasks = tasks
        self.images = images
        self.records = records
        self.snapshotter = snapshotter
        self.leases = leases
        self.bus = bus
        self.state = state
        self.cgroup_driver = cgroup_driver
        self.max_log_line = max_log_line
        self.runc = runc
        self._parsed: dict[str, Parsed] = {}
        self._rates = CpuRates()
        self._creating: set[str] = set()
        self.wire = EncodedEntries()
        self._pod_configs: dict[str, tuple[bytes, cri.PodSandboxConfig]] = {}
        self._exits = ExitWatcher(store=store, tasks=tasks, bus=bus, rates=self._rates, emit=self._emit)
        self._creator = Creator(
            store=store,
            images=images,
            snapshotter=snapshotter,
            leases=leases,
            state=state,
            cgroup_driver=cgroup_driver,
            runc=runc,
            parsed=self._parsed,
            emit=self._emit,
        )

    # -- lifecycle of the manager ---------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to task events, then reconcile the loaded containers with the runtime."""
        self._exits.start()
        await self.reconcile()

    async def close(self) -> None:
        await self._exits.close()

    async def reconcile(self) -> None:
        await reconcile(self.store, self.tasks, self._exits.exited)

    # -- create -------------------------------------------------------------------------------

    async def create(
        self, sandbox_id: str, config: cri.ContainerConfig, sandbox_config: cri.PodSandboxConfig | None = None
    ) -> str:
        """CreateContainer; the new container's id."""
        if not sandbox_id:
            raise InvalidArgument("pod_sandbox_id: must not be empty")
        if not betterproto.serialized_on_wire(config):
            raise InvalidArgument("config: must be set")
        specgen.validate_config(config)
        sb = self.store.sandbox(sandbox_id)
        if sb.status.state != "ready":
            raise FailedPrecondition(f'sandbox "{sb.id}": is not ready (state {sb.status.state})')
        pod_config = self._pod_config(sb)
        md = pod_config.metadata
        log_path = resolve_log_path(pod_config.log_directory, config.log_path)
        cid = secrets.token_hex(32)
        name = container_name(config.metadata.name, config.metadata.attempt, md.name, md.namespace, md.uid)
        self.store.container_names.reserve(name, cid)
        self._creating.add(cid)
        try:
            return await self._creator.create(cid, name, sb, pod_config, config, log_path)
        except BaseException:
            self.store.container_names.release(name)
            raise
        finally:
            self._creating.discard(cid)

    # -- start --------------------------------------------------------------------------------

    def _dir(self, cid: str) -> Path:
        return self.state / "containers" / cid

    def _log_uri(self, path: str) -> str:
        uri = f"crilog://{path}"
        if self.max_log_line > 0 and self.max_log_line != 16384:
            uri += f"?max_line={self.max_log_line}"
        return uri

    async def start_container(self, container_id: str) -> None:
        c = self.store.container(container_id)
        parsed = await self.parsed(c)
        async with c.lock:
            if c.status.state != CREATED:
                raise FailedPrecondition(
                    f'container "{c.id}": is in {c.status.state.upper()} state, only a CREATED one can start'
                )
            sb = self.store.sandboxes.get(c.meta.sandbox_id)
            if sb is None or sb.status.state != "ready":
                raise FailedPrecondition(f'sandbox "{c.meta.sandbox_id}" of container "{c.id}": is not ready')
            try:
                io = await asyncio.to_thread(self._prepare_io, c, parsed.config)
                await self.tasks.create(NAMESPACE, c.id, io=io)
                try:
                    pid = await self.tasks.start(NAMESPACE, c.id)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await self.tasks.delete(NAMESPACE, c.id)
                    raise
            except BerthError as exc:
                c.status.state, c.status.finished_at = EXITED, now_ns()
                c.status.exit_code, c.status.reason, c.status.message = (
                    START_ERROR_CODE,
                    REASON_START_ERROR,
                    exc.message,
                )
                await self.store.save_status(c)
                log.warning("cri.container.start_failed", id=c.id, error=exc.message)
                raise type(exc)(f'failed to start container "{c.id}": {exc.message}') from exc
            c.status.state, c.status.pid, c.status.started_at = RUNNING, pid, now_ns()
            # the status file is written (in a thread, fsynced) while the event is built on the loop
            saving = asyncio.ensure_future(self.store.save_status(c))
            try:
                log.info("cri.container.started", id=c.id, pid=pid)
                await self._emit(c, cri.ContainerEventType.CONTAINER_STARTED_EVENT)
            finally:
                await saving

    def _prepare_io(self, c: CriContainer, config: cri.ContainerConfig) -> TaskIO:
        stdin = ""
        if config.stdin:
            d = self._dir(c.id)
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            stdin = str(d / "stdin")
            with contextlib.suppress(FileExistsError):
                os.mkfifo(stdin, 0o600)
        out = ""
        if c.meta.log_path:
            os.makedirs(os.path.dirname(c.meta.log_path), mode=0o755, exist_ok=True)
            out = self._log_uri(c.meta.log_path)
        return TaskIO(stdin=stdin, stdout=out, stderr="" if config.tty else out, terminal=config.tty)

    # -- stop and remove ----------------------------------------------------------------------

    async def stop(self, container_id: str, grace: int) -> None:
        """Signal (stop signal, then SIGKILL after ``grace`` s) and wait for the exit; unknown id: OK."""
        try:
            c = self.store.container(container_id)
        except NotFound:
            return
        if c.status.state not in (RUNNING, UNKNOWN):
            return
        parsed = await self.parsed(c)
        sig = signal_number(parsed.config.stop_signal) or image_stop_signal(await self._image_config(c))
        sig = sig or int(signal.SIGTERM)
        if grace > 0:
            with contextlib.suppress(NotFound):
                await self.tasks.kill(NAMESPACE, c.id, signal=sig)
            if await self._wait(c, float(grace)):
                return
            log.info("cri.container.stop_timeout", id=c.id, grace=grace)
        with contextlib.suppress(NotFound):
            await self.tasks.kill(NAMESPACE, c.id, signal=int(signal.SIGKILL), all=True)
        if not await self._wait(c, KILL_WAIT):
            raise DeadlineExceeded(f'container "{c.id}": still running {KILL_WAIT}s after SIGKILL')

    async def _wait(self, c: CriContainer, seconds: float) -> bool:
        """Wait for the task's exit and record it; True once the container is EXITED."""
        try:
            async with asyncio.timeout(seconds):
                exit_: ExitStatus = await self.tasks.wait(NAMESPACE, c.id)
        except TimeoutError:
            return False
        except NotFound:
            exit_ = ExitStatus(0, UNKNOWN_EXIT_CODE, datetime.now(UTC))
            if c.status.state == EXITED:
                return True
        await self._exits.exited(c, exit_.exit_status, int(exit_.exited_at.timestamp() * 1e9))
        return True

    async def remove(self, container_id: str) -> None:
        """RemoveContainer: force-stop, then task, snapshot, record, name and state dir; unknown id: OK."""
        try:
            c = self.store.container(container_id)
        except NotFound:
            return
        if c.status.state in (RUNNING, UNKNOWN):
            await self.stop(c.id, 0)
        async with c.lock:
            if c.id not in self.store.containers:
                return
            with contextlib.suppress(NotFound):
                await self.tasks.delete(NAMESPACE, c.id)
            with contextlib.suppress(NotFound):
                await self.snapshotter.remove(NAMESPACE, c.id)
            statuses_before = c
            await self.store.remove_container(c)
            await asyncio.to_thread(shutil.rmtree, self._dir(c.id), True)
        self._parsed.pop(c.id, None)
        self.wire.forget(c.id)
        self._rates.forget(c.id)
        log.info("cri.container.removed", id=c.id)
        await self._emit(statuses_before, cri.ContainerEventType.CONTAINER_DELETED_EVENT)

    async def stop_containers(self, sandbox_id: str) -> None:
        """The sandbox side's hook at StopPodSandbox: every container of the pod stopped (no grace)."""
        found = self.store.containers_of(sandbox_id)
        await asyncio.gather(*(self.stop(c.id, 0) for c in found))
        await imagevolume.cleanup(
            self.store.sandboxes.get(sandbox_id), snapshotter=self.snapshotter, leases=self.leases
        )

    async def remove_containers(self, sandbox_id: str) -> None:
        """The sandbox side's hook at RemovePodSandbox: every container of the pod removed."""
        for c in self.store.containers_of(sandbox_id):
            await self.remove(c.id)
        self._pod_configs.pop(sandbox_id, None)
        await imagevolume.cleanup(
            self.store.sandboxes.get(sandbox_id), snapshotter=self.snapshotter, leases=self.leases
        )

    # -- reading ------------------------------------------------------------------------------

    def _pod_config(self, sb: Sandbox) -> cri.PodSandboxConfig:
        """The pod's PodSandboxConfig, decoded once per sandbox (fixed at RunPodSandbox); read-only."""
        found = self._pod_configs.get(sb.id)
        if found is None or found[0] is not sb.meta.config:
            found = self._pod_configs[sb.id] = (sb.meta.config, cri.PodSandboxConfig().parse(sb.meta.config))
        return found[1]

    async def parsed(self, c: CriContainer) -> Parsed:
        """Config and spec of ``c`` (the spec read from its record once after a restart)."""
        found = self._parsed.get(c.id)
        if found is None:
            config = cri.ContainerConfig().parse(c.meta.config)
            spec: dict[str, Any] = {}
            with contextlib.suppress(NotFound, ValueError):
                record = await self.records.get(NAMESPACE, c.id)
                if record.spec is not None:
                    spec = json.loads(record.spec.value)
            found = self._parsed[c.id] = Parsed(config, spec)
        return found

    async def _image_config(self, c: CriContainer) -> dict[str, Any]:
        with contextlib.suppress(BerthError):
            image = await self.images.get(c.meta.image_ref)
            if image is not None:
                return dict(image.config)
        return {}

    def config_of(self, c: CriContainer) -> cri.ContainerConfig:
        found = self._parsed.get(c.id)
        if found is None:
            return cri.ContainerConfig().parse(c.meta.config)
        return found.config

    def container_pb(self, c: CriContainer) -> cri.Container:
        return views.container_pb(c, self.config_of(c))

    def matching(self, f: cri.ContainerFilter | None = None) -> list[CriContainer]:
        """ListContainers' choice: id and pod prefixes, state, labels (all must match); no message built."""
        return views.matching(self.store.containers.values(), f)

    def select(self, f: cri.ContainerFilter | None = None) -> list[cri.Container]:
        """ListContainers as messages (the reference the encoded path must equal)."""
        return [self.container_pb(c) for c in self.matching(f)]

    def encoded(self, c: CriContainer) -> bytes:
        """``c``'s ``cri.Container`` as a field-1 element (:mod:`plugins.cri.wirecache`), cached.

        The version is what :meth:`container_pb` reads that can change after
        create: the state (created_at too, for safety); everything else in
        the entry is fixed at CreateContainer.
        """
        return self.wire.get(c.id, (c.status.state, c.status.created_at), lambda: self.container_pb(c))

    async def status(self, container_id: str, verbose: bool = False) -> cri.ContainerStatusResponse:
        c = self.store.container(container_id)
        parsed = await self.parsed(c)
        config = parsed.config
        image_spec = cri.ImageSpec(image=config.image.image, annotations=dict(config.image.annotations))
        image_ref = c.meta.image_ref
        image: CriImage | None = None
        with contextlib.suppress(BerthError):
            image = await self.images.get(c.meta.image_ref)
        if image is not None:
            if image.repo_tags:
                image_spec = cri.ImageSpec(
                    image=image.repo_tags[0], annotations=dict(config.image.annotations)
                )
            if image.repo_digests:
                image_ref = image.repo_digests[0]
        st = self.status_pb(c, parsed, image_spec=image_spec, image_ref=image_ref)
        info: dict[str, str] = {}
        if verbose:
            info["info"] = views.verbose_info(c, parsed, self.snapshotter.name)
        return cri.ContainerStatusResponse(status=st, info=info)

    def status_pb(
        self,
        c: CriContainer,
        parsed: Parsed,
        *,
        image_spec: cri.ImageSpec | None = None,
        image_ref: str = "",
    ) -> cri.ContainerStatus:
        return views.status_pb(c, parsed, image_spec=image_spec, image_ref=image_ref)

    # -- update, logs, exec -------------------------------------------------------------------

    async def update_resources(self, container_id: str, resources: cri.LinuxContainerResources) -> None:
        c = self.store.container(container_id)
        specgen.validate_resources(resources, "linux")
        parsed = await self.parsed(c)
        async with c.lock:
            if c.status.state not in (CREATED, RUNNING):
                raise FailedPrecondition(
                    f'container "{c.id}": is in {c.status.state.upper()} state, resources cannot be updated'
                )
            spec = copy.deepcopy(parsed.spec)
            specgen.with_resources(resources)(spec)
            process = spec.get("process") or {}
            if "oomScoreAdj" in process:
                process["oomScoreAdj"] = clamp_oom_score_adj(int(process["oomScoreAdj"]))
            linux_resources = (spec.get("linux") or {}).get("resources") or {}
            if c.status.state == RUNNING:
                await self.tasks.update(
                    NAMESPACE, c.id, resources=Opaque(RESOURCES_TYPE, json.dumps(linux_resources).encode())
                )
            record = await self.records.get(NAMESPACE, c.id)
            record.spec = TypedValue(SPEC_TYPE, encode(spec, c.id))
            await self.records.update(NAMESPACE, record, ["spec"])
            parsed.spec = spec
            c.status.resources = resources.to_dict(include_default_values=False)
            await self.store.save_status(c)

    async def reopen_log(self, container_id: str) -> None:
        c = self.store.container(container_id)
        if c.status.state != RUNNING:
            raise FailedPrecondition(f'container "{c.id}": is not running, its log cannot be reopened')
        reopen: Callable[[str, str], Awaitable[None]] | None = getattr(self.tasks, "reopen_log", None)
        if reopen is None:
            raise Unimplemented("ReopenContainerLog: the runtime cannot reopen container logs yet")
        await reopen(NAMESPACE, c.id)

    async def exec_sync(
        self, container_id: str, cmd: builtins.list[str], seconds: int
    ) -> tuple[bytes, bytes, int]:
        """Run ``cmd`` in the container: (stdout, stderr, exit code); DeadlineExceeded after ``seconds``."""
        if not cmd:
            raise InvalidArgument("cmd: must not be empty")
        if seconds < 0:
            raise InvalidArgument(f"timeout: {seconds} must not be negative")
        c = self.store.container(container_id)
        if c.status.state != RUNNING:
            raise FailedPrecondition(f'container "{c.id}": is not running (state {c.status.state.upper()})')
        parsed = await self.parsed(c)
        return await execsync.run(self.tasks, c.id, parsed.spec, cmd, seconds, self._dir(c.id))

    # -- stats --------------------------------------------------------------------------------

    async def stats(self, c: CriContainer) -> cri.ContainerStats:
        config = self.config_of(c)
        out = cri.ContainerStats(
            attributes=cri.ContainerAttributes(
                id=c.id, metadata=config.metadata, labels=dict(c.labels), annotations=dict(c.annotations)
            )
        )
        timestamp = now_ns()
        if c.status.state == RUNNING:
            sample: Sample | None = None
            with contextlib.suppress(BerthError):
                sample = decode(await self.tasks.stats(NAMESPACE, c.id), timestamp)
            if sample is not None:
                out.cpu = cpu_usage(sample, self._rates.rate(c.id, sample))
                out.memory = memory_usage(sample)
        with contextlib.suppress(BerthError):
            usage = await self.snapshotter.usage(NAMESPACE, c.id)
            out.writable_layer = cri.FilesystemUsage(
                timestamp=timestamp,
                fs_id=cri.FilesystemIdentifier(mountpoint=self.images.mountpoint),
                used_bytes=cri.UInt64Value(value=usage.size),
                inodes_used=cri.UInt64Value(value=usage.inodes),
            )
        return out

    async def list_stats(self, f: cri.ContainerStatsFilter | None = None) -> list[cri.ContainerStats]:
        f = cri.ContainerStatsFilter() if f is None else f
        chosen = [
            c
            for c in self.store.containers.values()
            if (not f.id or c.id.startswith(f.id))
            and (not f.pod_sandbox_id or c.meta.sandbox_id.startswith(f.pod_sandbox_id))
            and all(c.labels.get(k) == v for k, v in f.label_selector.items())
        ]
        return list(await asyncio.gather(*(self.stats(c) for c in chosen)))

    # -- events -------------------------------------------------------------------------------

    async def _emit(self, c: CriContainer, kind: cri.ContainerEventType) -> None:
        """A ContainerEventResponse with the pod's status and its containers' statuses as they are now."""
        sb = self.store.sandboxes.get(c.meta.sandbox_id)
        pod_status = cri.PodSandboxStatus()
        if sb is not None:
            with contextlib.suppress(Exception):
                pod_status = pod_status_pb(sb, self._pod_config(sb))
        statuses = []
        for other in self.store.containers_of(c.meta.sandbox_id):
            with contextlib.suppress(BerthError):
                statuses.append(self.status_pb(other, await self.parsed(other)))
        events.publish(
            self.bus,
            events.container_event(c.id, kind, sandbox_status=pod_status, container_statuses=statuses),
        )


__all__ = ["ContainerManager"]
