"""CRI containers: create, start, stop, remove, exec, stats, and exits from the bus.

The life of a container, as containerd 1.7's CRI runs it:

* CreateContainer: the name is reserved, the image resolved in ``k8s.io``, a
  snapshot prepared on its chain id (key = container id), the OCI spec made
  (:mod:`.specgen`) and everything persisted as a container record
  (:meth:`CriStore.add_container`). State CREATED; no task yet.
* StartContainer: the task is created and started, its stdout/stderr going
  to ``crilog://<log path>``, which berth's shim writes in the CRI log format
  itself. RUNNING with pid and started_at. A failure is recorded (EXITED,
  reason ``StartError``) and returned.
* Exits come from the bus (``/tasks/exit`` of ``k8s.io``): EXITED with the
  exit code, reason ``Completed``/``Error``/``OOMKilled`` (``/tasks/oom``
  seen before), the task deleted, a CONTAINER_STOPPED event.
* StopContainer signals and waits (SIGKILL after the grace period);
  RemoveContainer force-stops, then deletes task, snapshot, record and name.
  Both are idempotent for unknown ids, as kubelet needs.

After a restart, :meth:`ContainerManager.start` reconciles the loaded store
with the runtime: a task still running stays RUNNING, one that exited
meanwhile becomes EXITED with its real exit code (the runtime replays the
exit, and its State answers it too).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import errno
import json
import os
import posixpath
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import betterproto
import structlog

from daemon.errors import (
    AlreadyExists,
    BerthError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from daemon.events import Envelope, EventBus, Subscription
from daemon.metadata.containers import Container as Record
from daemon.metadata.containers import ContainerStore, TypedValue
from daemon.metadata.leases import LeaseStore
from daemon.metadata.snapshots import NamespacedSnapshotter
from daemon.mount import mounted
from daemon.oci import userfiles, users
from daemon.protocols import ExitStatus, Mount, Opaque, TaskIO, TaskManager, TaskStatus
from daemon.typeurl import decode_any
from plugins.cri import events
from plugins.cri.container import imagevolume, specgen
from plugins.cri.container.stats import CpuRates, Sample, decode
from plugins.cri.images import CriImage, CriImages
from plugins.cri.store import (
    ContainerMeta,
    ContainerStatus,
    CriContainer,
    CriStore,
    Entry,
    Sandbox,
    container_name,
    now_ns,
)
from plugins.cri.wirecache import EncodedEntries
from protos.containerd.events import TaskExit, TaskOom
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.containers")

NAMESPACE = "k8s.io"
CREATED, RUNNING, EXITED, UNKNOWN = "created", "running", "exited", "unknown"
SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
#: ExecSync output kept per stream; the rest is dropped (kubelet's limit too)
EXEC_OUTPUT_CAP = 16 << 20
#: exit code and reasons as containerd reports them
START_ERROR_CODE = 128
UNKNOWN_EXIT_CODE = 255
REASON_COMPLETED, REASON_ERROR, REASON_OOM = "Completed", "Error", "OOMKilled"
REASON_START_ERROR, REASON_UNKNOWN = "StartError", "Unknown"
KILL_WAIT = 30.0

STATE_PB = {
    CREATED: cri.ContainerState.CONTAINER_CREATED,
    RUNNING: cri.ContainerState.CONTAINER_RUNNING,
    EXITED: cri.ContainerState.CONTAINER_EXITED,
    UNKNOWN: cri.ContainerState.CONTAINER_UNKNOWN,
}


@dataclass
class Parsed:
    """Decoded once per container: its CRI config and OCI spec (both fixed at create)."""

    config: cri.ContainerConfig
    spec: dict[str, Any]


def signal_number(sig: cri.Signal) -> int:
    """CRI's Signal enum (names, not numbers) as this host's number; 0 for RUNTIME_DEFAULT."""
    if sig == cri.Signal.RUNTIME_DEFAULT:
        return 0
    name = cri.Signal(sig).name or ""
    if name.startswith("SIGRTMINPLUS"):
        return int(signal.SIGRTMIN) + int(name.removeprefix("SIGRTMINPLUS"))
    if name.startswith("SIGRTMAXMINUS"):
        return int(signal.SIGRTMAX) - int(name.removeprefix("SIGRTMAXMINUS"))
    aliases = {"SIGCLD": "SIGCHLD", "SIGPOLL": "SIGIO", "SIGIOT": "SIGABRT", "SIGRTMIN": "SIGRTMIN"}
    found = getattr(signal, aliases.get(name, name), None)
    if found is None:
        raise InvalidArgument(f"stop_signal {name}: not a signal of this host")
    return int(found)


def image_stop_signal(config: dict[str, Any] | Any) -> int:
    section = config.get("config") if isinstance(config, dict) else None
    name = str((section or {}).get("StopSignal") or "")
    if not name:
        return 0
    if name.isdigit():
        return int(name)
    found = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    return int(found) if found is not None else 0


def resolve_log_path(log_directory: str, log_path: str) -> str:
    """The absolute log file: the pod's directory + the container's relative path ("" if either is empty)."""
    if not log_path or not log_directory:
        return ""
    if log_path.startswith("/"):
        raise InvalidArgument(f"config.log_path {log_path!r}: must be relative to the pod's log_directory")
    base = posixpath.normpath(log_directory)
    full = posixpath.normpath(posixpath.join(base, log_path))
    if not full.startswith(base.rstrip("/") + "/"):
        raise InvalidArgument(f"config.log_path {log_path!r}: escapes the pod's log_directory {base!r}")
    return full


async def image_user_files(mounts: list[Mount], scratch: Path, label: str) -> users.UserFiles:
    """The snapshot's /etc/passwd and /etc/group as its container sees them (:mod:`daemon.oci.userfiles`).

    Read from the layers in a thread; the snapshot is mounted (under
    ``scratch``) only when the reader says it must be. A fresh snapshot of an
    image is the image's content, so the answer serves every later lookup for
    the same chain id; a missing file stays missing, an unreadable one fails
    the lookup that needs it.
    """
    try:
        return await asyncio.to_thread(userfiles.read_user_files, mounts, label)
    except userfiles.NeedsMount as exc:
        log.debug("cri.userfiles.mount", snapshot=label, reason=str(exc))
    await asyncio.to_thread(scratch.mkdir, parents=True, exist_ok=True)
    async with mounted(mounts, dir=scratch) as rootfs:
        return await asyncio.to_thread(users.UserFiles.from_root, str(rootfs), label)


def _spec_json(inp: specgen.SpecInput) -> tuple[dict[str, Any], bytes]:
    """The spec and its JSON (the encoding is a few ms for a spec with its seccomp profile); blocking."""
    spec = specgen.container_spec(inp)
    return spec, json.dumps(spec).encode()


async def _none() -> None:
    return None


def runc_features(runc: str) -> specgen.Features:
    """``runc features`` (runc >= 1.1) decides rro and id-mapped mounts; blocking."""
    try:
        out = subprocess.run([runc, "features"], capture_output=True, timeout=10, check=False)
        doc = json.loads(out.stdout) if out.returncode == 0 else {}
    except (OSError, ValueError, subprocess.TimeoutExpired):
        doc = {}
    options = set(doc.get("mountOptions") or [])
    idmap = bool(((doc.get("linux") or {}).get("mountExtensions") or {}).get("idmap", {}).get("enabled"))
    return specgen.Features(rro="rro" in options, idmap=idmap)


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
        self._oom: set[str] = set()
        self._rates = CpuRates()
        self._features: specgen.Features | None = None
        self._sub: Subscription | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._creating: set[str] = set()
        self.wire = EncodedEntries()
        self._pod_configs: dict[str, tuple[bytes, cri.PodSandboxConfig]] = {}
        self._users_roots: dict[str, str] = {}  # chain id -> directory with its /etc/passwd, /etc/group

    # -- lifecycle of the manager ---------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to task events, then reconcile the loaded containers with the runtime."""
        self._sub = self.bus.subscribe(
            topic_prefix="/tasks", namespace=NAMESPACE, maxsize=8192, name="cri-containers", replay=True
        )
        self._watcher = asyncio.create_task(self._watch(self._sub), name="cri-container-exits")
        await self.reconcile()

    async def close(self) -> None:
        if self._sub is not None:
            self._sub.close()
        tasks = [t for t in (self._watcher, *self._background) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def reconcile(self) -> None:
        for c in list(self.store.containers.values()):
            if c.status.state == EXITED:
                continue
            try:
                st = await self.tasks.get(NAMESPACE, c.id)
            except NotFound:
                if c.status.state in (RUNNING, UNKNOWN):
                    await self._exited(
                        c,
                        UNKNOWN_EXIT_CODE,
                        now_ns(),
                        reason=REASON_UNKNOWN,
                        message="task lost across restart",
                    )
                continue
            except BerthError as exc:
                log.warning("cri.container.reconcile_failed", id=c.id, error=exc.message)
                continue
            if st.status == TaskStatus.STOPPED:
                at = st.exited_at or datetime.now(UTC)
                await self._exited(c, st.exit_status, int(at.timestamp() * 1e9))
            elif st.status in (TaskStatus.RUNNING, TaskStatus.PAUSED) and c.status.state != RUNNING:
                c.status.state, c.status.pid = RUNNING, st.pid
                await self.store.save_status(c)
        log.info("cri.containers.reconciled", containers=len(self.store.containers))

    # -- exits --------------------------------------------------------------------------------

    async def _watch(self, sub: Subscription) -> None:
        async for env in sub:
            try:
                self._on_event(env)
            except Exception:  # one bad event must not end the watcher
                log.exception("cri.container.event_failed", topic=env.topic)

    def _on_event(self, env: Envelope) -> None:
        if env.topic not in ("/tasks/exit", "/tasks/oom"):
            return  # (decoding every task event's Any costs ~0.5 ms each; only these two matter)
        event = env.event
        if isinstance(event, betterproto.lib.google.protobuf.Any):
            event = decode_any(event)
        if env.topic == "/tasks/oom" and isinstance(event, TaskOom):
            if event.container_id in self.store.containers:
                self._oom.add(event.container_id)
            return
        if env.topic != "/tasks/exit" or not isinstance(event, TaskExit):
            return
        if event.id not in ("", event.container_id):
            return  # an exec
        c = self.store.containers.get(event.container_id)
        if c is None:
            return
        at = event.exited_at if event.exited_at and event.exited_at.year > 1970 else datetime.now(UTC)
        task = asyncio.create_task(self._exited(c, event.exit_status, int(at.timestamp() * 1e9)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _exited(
        self, c: CriContainer, exit_code: int, finished_at: int, *, reason: str = "", message: str = ""
    ) -> None:
        """Record an exit once (EXITED, code, reason), delete the task, emit CONTAINER_STOPPED."""
        async with c.lock:
            if c.status.state == EXITED:
                return
            c.status.state = EXITED
            c.status.exit_code = exit_code
            c.status.finished_at = finished_at
            if not reason:
                oom = c.id in self._oom
                reason = REASON_OOM if oom else REASON_COMPLETED if exit_code == 0 else REASON_ERROR
            c.status.reason, c.status.message = reason, message or c.status.message
            self._oom.discard(c.id)
            self._rates.forget(c.id)
            await self.store.save_status(c)
            with contextlib.suppress(NotFound):
                try:
                    await self.tasks.delete(NAMESPACE, c.id)
                except BerthError as exc:
                    if not isinstance(exc, NotFound):
                        log.warning("cri.container.task_delete_failed", id=c.id, error=exc.message)
        log.info("cri.container.exited", id=c.id, exit_code=exit_code, reason=reason)
        await self._emit(c, cri.ContainerEventType.CONTAINER_STOPPED_EVENT)

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
            return await self._create(cid, name, sb, pod_config, config, log_path)
        except BaseException:
            self.store.container_names.release(name)
            raise
        finally:
            self._creating.discard(cid)

    async def _create(
        self,
        cid: str,
        name: str,
        sb: Sandbox,
        pod_config: cri.PodSandboxConfig,
        config: cri.ContainerConfig,
        log_path: str,
    ) -> str:
        # The snapshot is no GC root until the record names it: a lease holds it meanwhile. The
        # lease and the image lookup are independent (one round trip); an unusable image drops it.
        lease = f"cri-create-{cid}"
        expire = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        found, leased = await asyncio.gather(
            self.images.get(config.image.image),
            self.leases.create(NAMESPACE, lease, {"containerd.io/gc.expire": expire}),
            return_exceptions=True,
        )
        try:
            if isinstance(leased, BaseException):
                raise leased
            if isinstance(found, BaseException):
                raise found
            image = found
            if image is None:
                raise NotFound(f'failed to resolve image "{config.image.image}": not found')
            if not image.chain_id:
                raise FailedPrecondition(f'image "{config.image.image}": has no layers to run')
            target_pid = 0
            ns = config.linux.security_context.namespace_options
            if ns.pid == cri.NamespaceMode.TARGET:
                target = self.store.container(ns.target_id) if ns.target_id else None
                target_pid = target.status.pid if target is not None and target.status.state == RUNNING else 0
            await self._create_leased(cid, name, sb, pod_config, config, log_path, image, lease, target_pid)
        except BaseException:
            if not isinstance(leased, BaseException):
                with contextlib.suppress(NotFound):
                    await self.leases.delete(NAMESPACE, lease)
            raise
        # The record holds the snapshot now: the lease goes (in the database's thread) while the
        # event is built on the loop.
        dropping = asyncio.ensure_future(self._drop_lease(lease))
        try:
            log.info("cri.container.created", id=cid, name=name, sandbox=sb.id, image=image.id)
            await self._emit(self.store.containers[cid], cri.ContainerEventType.CONTAINER_CREATED_EVENT)
        finally:
            await dropping
        return cid

    async def _drop_lease(self, lease: str) -> None:
        with contextlib.suppress(NotFound):
            await self.leases.delete(NAMESPACE, lease)

    async def _create_leased(
        self,
        cid: str,
        name: str,
        sb: Sandbox,
        pod_config: cri.PodSandboxConfig,
        config: cri.ContainerConfig,
        log_path: str,
        image: CriImage,
        lease: str,
        target_pid: int,
    ) -> None:
        config = await imagevolume.mount_images(
            config, sb, images=self.images, snapshotter=self.snapshotter, leases=self.leases
        )
        features = await self._runc_features()
        pod = specgen.PodInfo(
            id=sb.id,
            config=pod_config,
            netns_path=sb.meta.netns_path,
            ipc_path=sb.meta.ipc_path,
            uts_path=sb.meta.uts_path,
            root_dir=sb.meta.root_dir,
            cgroup_parent=sb.meta.cgroup_parent or pod_config.linux.cgroup_parent,
            infra_pid=sb.status.pid,
        )

        def spec_input(rootfs: str) -> specgen.SpecInput:
            return specgen.SpecInput(
                container_id=cid,
                config=config,
                pod=pod,
                image_name=config.image.image,
                image_config=image.config,
                rootfs=rootfs,
                cgroup_driver=self.cgroup_driver,
                features=features,
                target_pid=target_pid,
                host_hostname=socket.gethostname(),
            )

        # The spec reads only the image's /etc/passwd and /etc/group from the rootfs; once they
        # are copied out for this chain, the spec is made while the snapshot is prepared.
        users_root = self._users_roots.get(image.chain_id)

        def spec_and_config(inp: specgen.SpecInput) -> tuple[dict[str, Any], bytes, bytes]:
            """The spec, its JSON and the config's wire bytes (betterproto: ~1.5 ms): one thread job."""
            spec, spec_bytes = _spec_json(inp)
            return spec, spec_bytes, bytes(config)

        prepared, made = await asyncio.gather(
            self.snapshotter.prepare(NAMESPACE, cid, image.chain_id, lease=lease),
            asyncio.to_thread(spec_and_config, spec_input(users_root)) if users_root else _none(),
            return_exceptions=True,
        )
        if isinstance(prepared, BaseException):
            raise prepared
        mounts = prepared
        try:
            if isinstance(made, BaseException):
                raise made
            if made is None:
                spec, spec_bytes = await self._spec_mounted(image.chain_id, mounts, spec_input)
                config_bytes = bytes(config)
            else:
                spec, spec_bytes, config_bytes = made
            entry: CriContainer = Entry(
                ContainerMeta(
                    id=cid,
                    name=name,
                    sandbox_id=sb.id,
                    config=config_bytes,
                    image_ref=image.id,
                    image_name=config.image.image,
                    log_path=log_path,
                ),
                ContainerStatus(state=CREATED, created_at=now_ns()),
                dict(config.labels),
                dict(config.annotations),
            )
            image_labels = (image.config.get("config") or {}).get("Labels") or {}
            record_labels = {**{k: str(v) for k, v in dict(image_labels).items()}, **dict(config.labels)}
            try:
                await self.store.add_container(
                    entry,
                    spec=spec_bytes,
                    snapshotter=self.snapshotter.name,
                    snapshot_key=cid,
                    record_labels=record_labels,
                )
            except InvalidArgument:
                # the image's labels are not the caller's fault: retry with the config's own
                await self.store.add_container(
                    entry,
                    spec=spec_bytes,
                    snapshotter=self.snapshotter.name,
                    snapshot_key=cid,
                    record_labels=dict(config.labels),
                )
        except BaseException:
            with contextlib.suppress(Exception):
                await self.snapshotter.remove(NAMESPACE, cid)
            raise
        self._parsed[cid] = Parsed(config, spec)

    async def _spec_mounted(
        self, chain_id: str, mounts: list[Mount], spec_input: Callable[[str], specgen.SpecInput]
    ) -> tuple[dict[str, Any], bytes]:
        """The spec of an image's first container; the /etc/passwd and /etc/group read from its snapshot
        (:func:`image_user_files`) are kept in memory for the next ones of the same chain."""
        files = await image_user_files(mounts, self.state, f"image layers {chain_id}")
        self._users_roots[chain_id] = files
        return await asyncio.to_thread(_spec_json, spec_input(files))

    async def _runc_features(self) -> specgen.Features:
        if self._features is None:
            self._features = await asyncio.to_thread(runc_features, self.runc)
        return self._features

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
        await self._exited(c, exit_.exit_status, int(exit_.exited_at.timestamp() * 1e9))
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
        config = self.config_of(c)
        return cri.Container(
            id=c.id,
            pod_sandbox_id=c.meta.sandbox_id,
            metadata=config.metadata,
            image=cri.ImageSpec(image=config.image.image, annotations=dict(config.image.annotations)),
            image_ref=c.meta.image_ref,
            image_id=c.meta.image_ref,
            state=STATE_PB.get(c.status.state, cri.ContainerState.CONTAINER_UNKNOWN),
            created_at=c.status.created_at,
            labels=dict(c.labels),
            annotations=dict(c.annotations),
        )

    def matching(self, f: cri.ContainerFilter | None = None) -> list[CriContainer]:
        """ListContainers' choice: id and pod prefixes, state, labels (all must match); no message built."""
        if f is None:
            return list(self.store.containers.values())
        id_prefix, pod_prefix, labels = f.id, f.pod_sandbox_id, f.label_selector
        state = f.state.state if betterproto.serialized_on_wire(f.state) else None
        out = []
        for c in self.store.containers.values():
            if id_prefix and not c.id.startswith(id_prefix):
                continue
            if pod_prefix and not c.meta.sandbox_id.startswith(pod_prefix):
                continue
            if state is not None and STATE_PB.get(c.status.state) != state:
                continue
            if labels and any(c.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(c)
        return out

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
            info["info"] = json.dumps(
                {
                    "sandboxID": c.meta.sandbox_id,
                    "pid": c.status.pid,
                    "removing": False,
                    "snapshotKey": c.id,
                    "snapshotter": self.snapshotter.name,
                    "runtimeType": "io.containerd.runc.v2",
                    "runtimeOptions": {},
                    "config": config.to_pydict(casing=betterproto.Casing.CAMEL),
                    "runtimeSpec": parsed.spec,
                    "image": c.meta.image_ref,
                    "logPath": c.meta.log_path,
                },
                default=str,
            )
        return cri.ContainerStatusResponse(status=st, info=info)

    def status_pb(
        self,
        c: CriContainer,
        parsed: Parsed,
        *,
        image_spec: cri.ImageSpec | None = None,
        image_ref: str = "",
    ) -> cri.ContainerStatus:
        config = parsed.config
        resources = config.linux.resources
        if c.status.resources:
            resources = cri.LinuxContainerResources().from_dict(c.status.resources)
        user = (parsed.spec.get("process") or {}).get("user") or {}
        return cri.ContainerStatus(
            id=c.id,
            metadata=config.metadata,
            state=STATE_PB.get(c.status.state, cri.ContainerState.CONTAINER_UNKNOWN),
            created_at=c.status.created_at,
            started_at=c.status.started_at,
            finished_at=c.status.finished_at,
            exit_code=c.status.exit_code,
            image=cri.ImageSpec(image=config.image.image) if image_spec is None else image_spec,
            image_ref=image_ref or c.meta.image_ref,
            image_id=c.meta.image_ref,
            reason=c.status.reason,
            message=c.status.message,
            labels=dict(c.labels),
            annotations=dict(c.annotations),
            mounts=list(config.mounts),
            log_path=c.meta.log_path,
            resources=cri.ContainerResources(linux=resources),
            user=cri.ContainerUser(
                linux=cri.LinuxContainerUser(
                    uid=int(user.get("uid", 0)),
                    gid=int(user.get("gid", 0)),
                    supplemental_groups=[int(g) for g in user.get("additionalGids", [])],
                )
            ),
            stop_signal=config.stop_signal,
        )

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
                from daemon.oci.spec import clamp_oom_score_adj

                process["oomScoreAdj"] = clamp_oom_score_adj(int(process["oomScoreAdj"]))
            linux_resources = (spec.get("linux") or {}).get("resources") or {}
            if c.status.state == RUNNING:
                await self.tasks.update(
                    NAMESPACE, c.id, resources=Opaque(RESOURCES_TYPE, json.dumps(linux_resources).encode())
                )
            record = await self.records.get(NAMESPACE, c.id)
            record.spec = TypedValue(SPEC_TYPE, json.dumps(spec).encode())
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
        process = copy.deepcopy(parsed.spec.get("process") or {})
        process["args"], process["terminal"] = list(cmd), False
        exec_id = secrets.token_hex(16)
        d = self._dir(c.id) / f"exec-{exec_id}"
        readers = await asyncio.to_thread(_ExecOutput.make, d)
        try:
            readers.watch()
            await self.tasks.exec(
                NAMESPACE,
                c.id,
                exec_id,
                spec=Opaque(PROCESS_TYPE, json.dumps(process).encode()),
                io=TaskIO(stdout=str(readers.stdout_path), stderr=str(readers.stderr_path)),
            )
            try:
                await self.tasks.start(NAMESPACE, c.id, exec_id)
                try:
                    async with asyncio.timeout(seconds or None):
                        exit_ = await self.tasks.wait(NAMESPACE, c.id, exec_id)
                except TimeoutError:
                    with contextlib.suppress(BerthError):
                        await self.tasks.kill(NAMESPACE, c.id, exec_id, signal=int(signal.SIGKILL))
                        async with asyncio.timeout(KILL_WAIT):
                            await self.tasks.wait(NAMESPACE, c.id, exec_id)
                    raise DeadlineExceeded(
                        f'failed to exec in container "{c.id}": timeout {seconds}s exceeded'
                    ) from None
            finally:
                with contextlib.suppress(BerthError, TimeoutError):
                    await self.tasks.delete_process(NAMESPACE, c.id, exec_id)
            stdout, stderr = readers.finish()
            return stdout, stderr, exit_.exit_status
        finally:
            readers.close()
            await asyncio.to_thread(shutil.rmtree, d, True)

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
                from plugins.cri.container.stats import cpu_usage, memory_usage

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
            from plugins.cri.sandbox.views import status_pb

            with contextlib.suppress(Exception):
                pod_status = status_pb(sb, self._pod_config(sb))
        statuses = []
        for other in self.store.containers_of(c.meta.sandbox_id):
            with contextlib.suppress(BerthError):
                statuses.append(self.status_pb(other, await self.parsed(other)))
        events.publish(
            self.bus,
            events.container_event(c.id, kind, sandbox_status=pod_status, container_statuses=statuses),
        )


class _ExecOutput:
    """The two FIFOs of an ExecSync and what has been read from them (capped)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.stdout_path = directory / "stdout"
        self.stderr_path = directory / "stderr"
        self._fds: list[int] = []
        self._bufs = [bytearray(), bytearray()]
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def make(cls, directory: Path) -> _ExecOutput:
        """FIFOs made and opened O_RDWR|O_NONBLOCK (never EOF, never blocks); blocking."""
        out = cls(directory)
        directory.mkdir(parents=True, mode=0o700)
        for path in (out.stdout_path, out.stderr_path):
            os.mkfifo(path, 0o600)
            out._fds.append(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
        return out

    def watch(self) -> None:
        self._loop = asyncio.get_running_loop()
        for i, fd in enumerate(self._fds):
            self._loop.add_reader(fd, self._read, i)

    def _read(self, i: int) -> None:
        while True:
            try:
                data = os.read(self._fds[i], 65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return
                raise
            if not data:
                return
            room = EXEC_OUTPUT_CAP - len(self._bufs[i])
            if room > 0:
                self._bufs[i] += data[:room]

    def finish(self) -> tuple[bytes, bytes]:
        """Everything written so far (the process has exited: what it wrote is in the pipes)."""
        for i in range(len(self._fds)):
            self._read(i)
        return bytes(self._bufs[0]), bytes(self._bufs[1])

    def close(self) -> None:
        for fd in self._fds:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
            os.close(fd)
        self._fds = []


__all__ = ["AlreadyExists", "ContainerManager", "Record", "resolve_log_path", "signal_number"]
