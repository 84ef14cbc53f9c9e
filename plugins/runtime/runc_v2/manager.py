"""The task manager: the Tasks API mapped onto shims (containerd 1.6's runtime v2 TaskManager).

One :class:`Task` per container that has one; tasks of a group (a pod: the
``io.containerd.runc.v2.group`` or ``io.kubernetes.cri.sandbox-id``
annotation) share one :class:`~.shims.Shim`, others get their own. The shim
is authoritative for a live task's state (Get asks it); the manager keeps
what must survive the shim: the last exit of every process.

Exits reach the manager three ways, and each is published on the bus as
``/tasks/exit`` exactly once per (namespace, container, process, pid):

* the shim forwards its TaskExit event (the usual way);
* the shim dies (SIGKILL, OOM killer): every process it held that had not
  exited is reported exited with status 137, and the ``delete`` bootstrap
  cleans up the runc container and the rootfs mount;
* after a berthd restart, :mod:`.recovery` finds a task stopped while berthd
  was down. Such exits are retained on the bus for ``recovery_event_grace``
  seconds and replayed to subscriptions made meanwhile, so the CRI plugin or a client that
  subscribes right after start does see them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import importlib
import json
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import betterproto.lib.google.protobuf as pb
import structlog

from daemon.errors import (
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from daemon.events import Envelope, EventBus
from daemon.metadata import ContainerStore, NamespacedSnapshotter, TypedValue
from daemon.protocols import (
    NO_IO,
    ExitStatus,
    Mount,
    Opaque,
    PidInfo,
    ProcessState,
    TaskIO,
    TaskStatus,
)
from daemon.ttrpc.services import LOGS_SERVICE
from plugins.runtime.runc_v2.bundle import PREPARED, Bundle, LogReader, walk
from plugins.runtime.runc_v2.shim.crilog import is_crilog
from plugins.runtime.runc_v2.shim.main import Layout
from plugins.runtime.runc_v2.shims import (
    NAMESPACE_KEY,
    Shim,
    bootstrap_delete,
    bootstrap_start,
    remove_stale_socket,
)
from protos.berth.shim.v1 import ReopenLogRequest
from protos.containerd.events import TaskExit
from protos.containerd.runc.v1 import Options
from protos.containerd.task.v2 import (
    CloseIoRequest,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteRequest,
    DeleteResponse,
    ExecProcessRequest,
    KillRequest,
    PauseRequest,
    PidsRequest,
    PidsResponse,
    ResizePtyRequest,
    ResumeRequest,
    ShutdownRequest,
    StartRequest,
    StartResponse,
    StateRequest,
    StateResponse,
    StatsRequest,
    StatsResponse,
    UpdateTaskRequest,
    WaitRequest,
    WaitResponse,
)
from protos.containerd.types import Mount as PbMount

log = structlog.get_logger("berth.runtime")

RUNTIME_NAME = "io.containerd.runc.v2"
RUNTIME_PREFIX = "io.containerd.runc."
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
OPTIONS_TYPE = "containerd.runc.v1.Options"
EXIT_TOPIC = "/tasks/exit"
#: 128 + SIGKILL: what a process of a shim that died is reported to have exited with
KILLED_STATUS = 137
SHUTDOWN_TIMEOUT = 10.0
STATE_TIMEOUT = 10.0
#: remembered (namespace, container, process, pid) of published exits, for deduplication
EXIT_MEMORY = 16384
REOPEN_TIMEOUT = 10.0


def writes_crilog(shim_binary: str) -> bool:
    """Whether the shim ``shim_binary`` understands crilog:// stdio (berth's does, containerd's does not)."""
    return Path(shim_binary).name.startswith("berth-shim")


@dataclass(frozen=True)
class Settings:
    """Where things are and how shims are started; built once by the plugin's init."""

    state: Path
    runc_root: Path
    shim_state: Path
    runtime_binary: str  # as configured ("" = berth's shim through the zygote)
    shim_binary: str  # the resolved executable for the exec bootstrap
    runc_binary: str
    systemd_cgroup: bool
    shim_debug: bool
    address: str
    ttrpc_address: str
    publish_binary: str
    recovery_event_grace: float = 10.0


class Process:
    """The manager's record of one process: what it was started with and, once known, its exit."""

    def __init__(self, container_id: str, exec_id: str, io: TaskIO, pid: int = 0) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.io = io
        self.pid = pid
        self.exit: ExitStatus | None = None
        self.exited = asyncio.Event()

    def record_exit(self, exit_: ExitStatus) -> None:
        if self.exit is None:
            self.exit = exit_
            self.exited.set()

    def snapshot(self, status: TaskStatus) -> ProcessState:
        ended = self.exit
        return ProcessState(
            container_id=self.container_id,
            exec_id=self.exec_id,
            pid=self.pid,
            status=TaskStatus.STOPPED if ended is not None else status,
            io=self.io,
            exit_status=ended.exit_status if ended else 0,
            exited_at=ended.exited_at if ended else None,
        )


@dataclass
class Task:
    namespace: str
    id: str
    bundle: Bundle
    shim: Shim
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    log: LogReader | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        found = self.execs.get(exec_id)
        if found is None:
            raise NotFound(f"task {self.id!r}: exec {exec_id!r}: not found")
        return found


def _status(value: int) -> TaskStatus:
    try:
        return TaskStatus(int(value))
    except ValueError:
        return TaskStatus.UNKNOWN


def when(ts: datetime | None) -> datetime:
    return ts if ts is not None and ts.year > 1970 else datetime.now(UTC)


class TaskManager:
    """Implements :class:`daemon.protocols.TaskManager` over runc v2 shims."""

    def __init__(
        self,
        settings: Settings,
        containers: ContainerStore,
        snapshotter: Callable[[str], NamespacedSnapshotter],
        bus: EventBus,
    ) -> None:
        self.settings = settings
        self._containers = containers
        self._snapshotter = snapshotter
        self._bus = bus
        self._tasks: dict[tuple[str, str], Task] = {}
        self._creating: set[tuple[str, str]] = set()
        self._groups: dict[tuple[str, str], Shim] = {}
        self._preparing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._group_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._published: OrderedDict[tuple[str, str, str, int], None] = OrderedDict()
        self._replay_until = 0.0
        self._zygote: Any = None
        self._default_options: bytes | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # -- events -------------------------------------------------------------

    def open_replay_window(self) -> None:
        """From now until ``recovery_event_grace`` has passed, exits are retained on the bus for replay.

        Exits found at start-up (and those shims forward right after it)
        happened while berthd was down; clients (``ctr events``, the CRI) can
        only subscribe once berthd is back, so the bus keeps them for
        subscriptions made with ``replay=True`` (the Events service's, the CRI's).
        """
        self._replay_until = time.monotonic() + self.settings.recovery_event_grace

    def on_envelope(self, env: Envelope) -> None:
        """An event from a shim (or made by the manager): record exits, dedupe them, put it on the bus."""
        if env.topic == EXIT_TOPIC:
            event = env.event
            try:
                exit_ = event if isinstance(event, TaskExit) else TaskExit().parse(bytes(event.value))
            except Exception:  # noqa: BLE001 - a malformed event is passed on as it came
                exit_ = None
            if exit_ is not None:
                key = (env.namespace, exit_.container_id, exit_.id or exit_.container_id, exit_.pid)
                if key in self._published:
                    log.debug("runtime.exit_duplicate", namespace=env.namespace, id=exit_.container_id)
                    return
                self._published[key] = None
                while len(self._published) > EXIT_MEMORY:
                    self._published.popitem(last=False)
                self._record_exit(env.namespace, exit_)
                if time.monotonic() < self._replay_until:
                    self._bus.forward(env, retain=self.settings.recovery_event_grace)
                    return
        self._bus.forward(env)

    def _record_exit(self, namespace: str, event: TaskExit) -> None:
        task = self._tasks.get((namespace, event.container_id))
        if task is None:
            return
        exec_id = "" if event.id in ("", event.container_id) else event.id
        proc = task.init if not exec_id else task.execs.get(exec_id)
        if proc is not None:
            proc.record_exit(ExitStatus(event.pid, event.exit_status, when(event.exited_at)))

    def publish_exit(self, namespace: str, container_id: str, exec_id: str, exit_: ExitStatus) -> None:
        """Publish (through deduplication) an exit the manager found itself."""
        event = TaskExit(
            container_id=container_id,
            id=exec_id or container_id,
            pid=exit_.pid,
            exit_status=exit_.exit_status,
            exited_at=exit_.exited_at,
        )
        self.on_envelope(Envelope(datetime.now(UTC), namespace, EXIT_TOPIC, event))

    # -- shims --------------------------------------------------------------

    def _group_lock(self, namespace: str, group: str) -> asyncio.Lock:
        return self._group_locks.setdefault((namespace, group), asyncio.Lock())

    def register_shim(self, shim: Shim) -> None:
        if shim.group:
            self._groups[(shim.namespace, shim.group)] = shim

    def _forget_shim(self, shim: Shim) -> None:
        key = (shim.namespace, shim.group)
        if self._groups.get(key) is shim:
            del self._groups[key]

    async def _start_shim(self, namespace: str, container_id: str, bundle: Bundle, options: pb.Any) -> str:
        s = self.settings
        if not s.runtime_binary:
            zygote = await self._zygote_client()
            if zygote is not None:
                address: str = await zygote.start_shim(
                    namespace=namespace,
                    id=container_id,
                    address=s.address,
                    ttrpc_address=s.ttrpc_address,
                    bundle=str(bundle.path),
                    debug=s.shim_debug,
                )
                return address
        return await bootstrap_start(
            s.shim_binary,
            bundle=bundle.path,
            namespace=namespace,
            id=container_id,
            address=s.address,
            ttrpc_address=s.ttrpc_address,
            publish_binary=s.publish_binary,
            debug=s.shim_debug,
            stdin=bytes(options),
            env={"BERTH_SHIM_STATE": str(s.shim_state)},
        )

    async def _zygote_client(self) -> Any:
        """berth's fork server, started on first use; None until the zygote module exists."""
        if self._zygote is None:
            try:
                module = importlib.import_module("plugins.runtime.runc_v2.shim.zygote")
            except ImportError:
                self._zygote = False
                return None
            self._zygote = await module.ZygoteClient.spawn(
                self.settings.shim_state, debug=self.settings.shim_debug
            )
        return self._zygote or None

    async def _shim_for(
        self, namespace: str, group: str, container_id: str, bundle: Bundle, options: pb.Any
    ) -> Shim:
        """The live shim of ``group`` (reused) or a new one started in ``bundle``; counts the task on it."""
        async with self._group_lock(namespace, group):
            shim = self._groups.get((namespace, group))
            if shim is None or shim.gone.is_set():
                address = await self._start_shim(namespace, container_id, bundle, options)
                shim = await Shim.connect(
                    namespace=namespace,
                    address=address,
                    binary=self.settings.shim_binary,
                    on_gone=self.shim_gone,
                )
                shim.group = group
                self.register_shim(shim)
                log.info("shim.started", namespace=namespace, group=group, pid=shim.pid, address=address)
            shim.tasks.add(container_id)
            await asyncio.to_thread(bundle.write_shim, shim.address, shim.binary)
            return shim

    async def release_shim(self, shim: Shim) -> None:
        """Shut ``shim`` down once it serves no task (it exits itself); the connection is closed."""
        async with self._group_lock(shim.namespace, shim.group):
            if shim.tasks:
                return
            self._forget_shim(shim)
            shim.expect_exit()
            if not shim.gone.is_set():
                try:
                    await shim.call(
                        "Shutdown", ShutdownRequest(id=shim.group), pb.Empty, timeout=SHUTDOWN_TIMEOUT
                    )
                except Unavailable:
                    pass  # it exited while answering
                except BerthError as exc:
                    log.warning("shim.shutdown_failed", pid=shim.pid, error=str(exc))
                if not await shim.wait_gone(SHUTDOWN_TIMEOUT):
                    log.warning("shim.still_running", pid=shim.pid, address=shim.address)
            await shim.close()
            if shim.prepared:
                await self._group_dir(shim.namespace, shim.group).remove()

    # -- shims started ahead of their group's first task -----------------------

    def _group_dir(self, namespace: str, group: str) -> Bundle:
        return Bundle(self.settings.state / PREPARED, namespace, group)

    def prepare_shim(self, namespace: str, group: str) -> None:
        """Start ``group``'s shim in the background (see daemon.protocols.TaskManager.prepare_shim).

        Only berth's own shim forked by the zygote is prepared (another shim
        binary may group differently). A failure is logged: the group's first
        create then starts the shim as it always did.
        """
        key = (namespace, group)
        if self.settings.runtime_binary or key in self._preparing or key in self._groups:
            return
        job = asyncio.create_task(self._prepare(namespace, group), name=f"prepare-shim-{group[:16]}")
        self._preparing[key] = job

        def done(finished: asyncio.Task[None]) -> None:
            if self._preparing.get(key) is finished:
                del self._preparing[key]

        job.add_done_callback(done)

    async def _prepare(self, namespace: str, group: str) -> None:
        try:
            async with self._group_lock(namespace, group):
                found = self._groups.get((namespace, group))
                if found is not None and not found.gone.is_set():
                    return
                place = self._group_dir(namespace, group)
                await asyncio.to_thread(place.create_group)
                try:
                    address = await self._start_shim(namespace, group, place, pb.Any())
                    shim = await Shim.connect(
                        namespace=namespace,
                        address=address,
                        binary=self.settings.shim_binary,
                        on_gone=self.shim_gone,
                    )
                except Exception:
                    # (cancelled, it stays: the shim may start still, and recovery finds it through it)
                    await place.remove()
                    raise
                shim.group, shim.prepared = group, True
                self.register_shim(shim)
                log.info("shim.prepared", namespace=namespace, group=group, pid=shim.pid, address=address)
        except BerthError as exc:
            log.warning("shim.prepare_failed", namespace=namespace, group=group, error=str(exc))
        except OSError as exc:
            log.warning("shim.prepare_failed", namespace=namespace, group=group, error=str(exc))

    async def release_idle_shim(self, namespace: str, group: str) -> None:
        """Shut ``group``'s shim down if it serves no task (a prepare still running is waited for)."""
        preparing = self._preparing.get((namespace, group))
        if preparing is not None:
            await asyncio.wait([preparing])
        shim = self._groups.get((namespace, group))
        if shim is not None and not shim.tasks:
            await self.release_shim(shim)

    async def recover_prepared(self) -> int:
        """After a restart: group directories whose shim serves no adopted task are cleaned; how many.

        Such a shim (prepared, its pod never started a container before berthd
        went down) is shut down, a dead one's socket and state removed, and the
        directory goes. One whose group has adopted tasks is kept as prepared.
        """
        places = await asyncio.to_thread(lambda: list(walk(self.settings.state / PREPARED)))
        cleaned = 0
        for place in places:
            address = await asyncio.to_thread(place.read_address)
            serving = self._groups.get((place.namespace, place.id))
            if serving is not None and address and serving.address == address:
                serving.prepared = True
                continue
            if address:
                try:
                    found = await Shim.connect(
                        namespace=place.namespace,
                        address=address,
                        binary=self.settings.shim_binary,
                        on_gone=self.shim_gone,
                    )
                except BerthError:
                    await self._forget_dead_prepared(place.namespace, place.id, address)
                else:
                    found.group = place.id
                    await self.release_shim(found)
            await place.remove()
            cleaned += 1
            log.info("recovery.prepared_shim_cleaned", namespace=place.namespace, group=place.id)
        return cleaned

    async def _forget_dead_prepared(self, namespace: str, group: str, address: str) -> None:
        """A prepared shim that died: its socket and state directory (nothing else of it exists)."""
        await asyncio.to_thread(remove_stale_socket, address)
        layout = Layout(str(self.settings.shim_state), namespace, group, self.settings.address)
        await asyncio.to_thread(shutil.rmtree, layout.dir, True)

    async def shim_gone(self, shim: Shim) -> None:
        """A shim died: its processes are reported exited (137), its containers cleaned by ``delete``."""
        self._forget_shim(shim)
        if shim.prepared:
            async with self._group_lock(shim.namespace, shim.group):
                if not shim.tasks:
                    await self._forget_dead_prepared(shim.namespace, shim.group, shim.address)
                await self._group_dir(shim.namespace, shim.group).remove()
        now = datetime.now(UTC)
        for container_id in sorted(shim.tasks):
            task = self._tasks.get((shim.namespace, container_id))
            if task is None or task.shim is not shim:
                continue
            # Clean up first (Delete waits on the lock), then report: whoever sees the exit may delete.
            async with task.lock:
                await self.bootstrap_delete(shim.binary, task.bundle)
            for proc in [task.init, *task.execs.values()]:
                if proc.exit is None:
                    self.publish_exit(
                        shim.namespace, container_id, proc.exec_id, ExitStatus(proc.pid, KILLED_STATUS, now)
                    )
        await shim.close()
        await asyncio.to_thread(remove_stale_socket, shim.address)

    async def bootstrap_delete(self, binary: str, bundle: Bundle) -> DeleteResponse | None:
        """``<binary> delete`` in ``bundle``: runc container and rootfs mount gone; None if it failed."""
        s = self.settings
        try:
            return await bootstrap_delete(
                binary,
                bundle=bundle.path,
                namespace=bundle.namespace,
                id=bundle.id,
                address=s.address,
                ttrpc_address=s.ttrpc_address,
                publish_binary=s.publish_binary,
                env={"BERTH_SHIM_STATE": str(s.shim_state)},
            )
        except BerthError as exc:
            log.warning("shim.delete_failed", bundle=str(bundle.path), error=str(exc))
            return None

    # -- create -------------------------------------------------------------

    def _options(self, *candidates: Opaque | TypedValue | None) -> pb.Any:
        """runc options: the container's, then the request's, with berth's runc root always.

        Without any (every CRI container) the answer is always the same: encoded once.
        """
        if all(c is None for c in candidates):
            if self._default_options is None:
                self._default_options = self._encode_options(Options())
            return pb.Any(type_url=OPTIONS_TYPE, value=self._default_options)
        opts = Options()
        for candidate in candidates:
            if candidate is not None and candidate.type_url.rsplit("/", 1)[-1] == OPTIONS_TYPE:
                try:
                    opts = Options().parse(candidate.value)
                except Exception as exc:  # betterproto raises assorted types
                    raise InvalidArgument(f"options: not a {OPTIONS_TYPE}: {exc}") from exc
        return pb.Any(type_url=OPTIONS_TYPE, value=self._encode_options(opts))

    def _encode_options(self, opts: Options) -> bytes:
        opts.root = str(self.settings.runc_root)
        if not opts.binary_name:
            opts.binary_name = self.settings.runc_binary
        opts.systemd_cgroup = opts.systemd_cgroup or self.settings.systemd_cgroup
        return bytes(opts)

    async def create(
        self,
        namespace: str,
        container_id: str,
        *,
        io: TaskIO = NO_IO,
        rootfs: Sequence[Mount] = (),
        options: Opaque | None = None,
    ) -> ProcessState:
        key = (namespace, container_id)
        if key in self._tasks or key in self._creating:
            raise AlreadyExists(f"task {container_id!r} (namespace {namespace!r}): already exists")
        self._check_crilog(f"task {container_id!r}", io, self.settings.shim_binary)
        self._creating.add(key)
        try:
            task = await self._create(namespace, container_id, io, rootfs, options)
        finally:
            self._creating.discard(key)
        self._tasks[key] = task
        return task.init.snapshot(TaskStatus.CREATED)

    def _check_crilog(self, what: str, io: TaskIO, shim_binary: str) -> None:
        """Refuse crilog:// stdio up front when the shim would not understand it (containerd's)."""
        if not any(is_crilog(uri) for uri in (io.stdin, io.stdout, io.stderr)):
            return
        if not writes_crilog(shim_binary):
            raise FailedPrecondition(
                f"{what}: crilog:// stdio is written by berth's shim only, and runtime_binary "
                f"{self.settings.runtime_binary or shim_binary!r} is not berth's shim"
            )

    async def _create(
        self, namespace: str, container_id: str, io: TaskIO, rootfs: Sequence[Mount], options: Opaque | None
    ) -> Task:
        container = await self._containers.get(namespace, container_id)
        if not container.runtime.name.startswith(RUNTIME_PREFIX):
            raise FailedPrecondition(
                f"container {container_id!r}: runtime {container.runtime.name!r} is not supported "
                f"(this runtime runs {RUNTIME_NAME})"
            )
        if container.spec is None:
            raise FailedPrecondition(f"container {container_id!r}: has no spec")
        try:
            spec = json.loads(container.spec.value)
        except ValueError as exc:
            raise InvalidArgument(f"container {container_id!r}: spec is not JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise InvalidArgument(f"container {container_id!r}: spec is not a JSON object")
        mounts = list(rootfs)
        if not mounts and container.snapshot_key:
            try:
                sn = self._snapshotter(container.snapshotter)
                mounts = await sn.mounts(namespace, container.snapshot_key)
            except NotFound as exc:
                raise NotFound(
                    f"container {container_id!r}: snapshot {container.snapshot_key!r} "
                    f"(snapshotter {container.snapshotter!r}): {exc}"
                ) from None
        spec_bytes = bytes(container.spec.value)
        root = spec.get("root")
        if mounts and not (isinstance(root, dict) and root.get("path") == "rootfs"):
            spec["root"] = {**(root if isinstance(root, dict) else {}), "path": "rootfs"}
            spec_bytes = json.dumps(spec).encode()  # (re-encoded only when it changes: ~1 ms for a big spec)
        annotations = spec.get("annotations") or {}
        group = next((str(annotations[a]) for a in GROUP_ANNOTATIONS if annotations.get(a)), container_id)
        runc_options = self._options(container.runtime.options, options)
        bundle = Bundle(self.settings.state, namespace, container_id)
        try:
            await asyncio.to_thread(bundle.create, spec_bytes)  # AlreadyExists before writing anything
        except AlreadyExists:
            raise AlreadyExists(
                f"task {container_id!r} (namespace {namespace!r}): bundle {bundle.path} exists"
            ) from None
        reader = LogReader(bundle.log_fifo, namespace=namespace, shim=container_id)
        reader.open()
        shim: Shim | None = None
        try:
            shim = await self._shim_for(namespace, group, container_id, bundle, runc_options)
            created = await shim.call(
                "Create",
                CreateTaskRequest(
                    id=container_id,
                    bundle=str(bundle.path),
                    rootfs=[
                        PbMount(type=m.type, source=m.source, target=m.target, options=list(m.options))
                        for m in mounts
                    ],
                    terminal=io.terminal,
                    stdin=io.stdin,
                    stdout=io.stdout,
                    stderr=io.stderr,
                    options=runc_options,
                ),
                CreateTaskResponse,
            )
        except BaseException:
            if shim is not None:
                shim.tasks.discard(container_id)
                if shim.gone.is_set():  # it died during Create: runc's container may be left
                    await self.bootstrap_delete(shim.binary, bundle)
                if not shim.tasks:
                    await self.release_shim(shim)
            reader.close()
            await bundle.remove()
            raise
        log.info("task.created", namespace=namespace, id=container_id, pid=created.pid, shim=shim.pid)
        return Task(
            namespace, container_id, bundle, shim, Process(container_id, "", io, created.pid), log=reader
        )

    # -- lookups ------------------------------------------------------------

    def _task(self, namespace: str, container_id: str) -> Task:
        if not container_id:
            raise InvalidArgument("container_id: must not be empty")
        task = self._tasks.get((namespace, container_id))
        if task is None:
            raise NotFound(f"task {container_id!r} (namespace {namespace!r}): not found")
        return task

    def adopt(self, task: Task) -> None:
        """Take over a task found by recovery."""
        self._tasks[(task.namespace, task.id)] = task

    def tasks(self) -> list[Task]:
        return list(self._tasks.values())

    # -- lifecycle calls ----------------------------------------------------

    async def start(self, namespace: str, container_id: str, exec_id: str = "") -> int:
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)

        started = await task.shim.call("Start", StartRequest(id=container_id, exec_id=exec_id), StartResponse)
        proc.pid = started.pid
        log.info("task.started", namespace=namespace, id=container_id, exec_id=exec_id, pid=started.pid)
        return int(started.pid)

    async def delete(self, namespace: str, container_id: str) -> ExitStatus:
        task = self._task(namespace, container_id)
        async with task.lock:
            if (namespace, container_id) not in self._tasks:
                raise NotFound(f"task {container_id!r} (namespace {namespace!r}): not found")
            shim = task.shim
            if not shim.gone.is_set():
                try:
                    done = await shim.call("Delete", DeleteRequest(id=container_id), DeleteResponse)
                except Unavailable:
                    if not shim.gone.is_set():
                        raise
                    await self.bootstrap_delete(shim.binary, task.bundle)
                else:
                    task.init.record_exit(ExitStatus(done.pid, done.exit_status, when(done.exited_at)))
            exit_ = task.init.exit or ExitStatus(task.init.pid, KILLED_STATUS, datetime.now(UTC))
            del self._tasks[(namespace, container_id)]
            shim.tasks.discard(container_id)
            if not shim.tasks:
                await self.release_shim(shim)
            if task.log is not None:
                task.log.close()
            await task.bundle.remove()
        log.info("task.deleted", namespace=namespace, id=container_id, exit_status=exit_.exit_status)
        return exit_

    async def delete_process(self, namespace: str, container_id: str, exec_id: str) -> ExitStatus:
        if not exec_id:
            raise InvalidArgument("exec_id: must not be empty (delete the task itself with Delete)")
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)
        done = await task.shim.call("Delete", DeleteRequest(id=container_id, exec_id=exec_id), DeleteResponse)
        proc.record_exit(ExitStatus(done.pid, done.exit_status, when(done.exited_at)))
        task.execs.pop(exec_id, None)
        assert proc.exit is not None
        return proc.exit

    async def get(self, namespace: str, container_id: str, exec_id: str = "") -> ProcessState:
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)
        if task.shim.gone.is_set():
            return proc.snapshot(TaskStatus.UNKNOWN)
        try:
            st = await task.shim.call(
                "State", StateRequest(id=container_id, exec_id=exec_id), StateResponse, timeout=STATE_TIMEOUT
            )
        except Unavailable:
            return proc.snapshot(TaskStatus.UNKNOWN)
        status = _status(st.status)
        if st.pid:
            proc.pid = st.pid
        if status == TaskStatus.STOPPED:
            proc.record_exit(ExitStatus(st.pid, st.exit_status, when(st.exited_at)))
        return ProcessState(
            container_id=container_id,
            exec_id=exec_id,
            pid=st.pid,
            status=status,
            io=TaskIO(stdin=st.stdin, stdout=st.stdout, stderr=st.stderr, terminal=st.terminal),
            exit_status=st.exit_status,
            exited_at=when(st.exited_at) if status == TaskStatus.STOPPED else None,
        )

    async def list(self, namespace: str) -> list[ProcessState]:
        ids = sorted(cid for ns, cid in self._tasks if ns == namespace)
        found = await asyncio.gather(*(self.get(namespace, cid) for cid in ids), return_exceptions=True)
        out: list[ProcessState] = []
        for state in found:
            if isinstance(state, NotFound):
                continue  # deleted meanwhile
            if isinstance(state, BaseException):
                raise state
            out.append(state)
        return out

    async def kill(
        self,
        namespace: str,
        container_id: str,
        exec_id: str = "",
        *,
        signal: int,
        all: bool = False,  # noqa: A002 - the wire's name
    ) -> None:
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)
        if signal <= 0:
            raise InvalidArgument(f"signal: must be positive, got {signal}")
        if task.shim.gone.is_set():
            raise NotFound(f"task {container_id!r}: process already finished (its shim is gone)")
        if proc.exit is not None and not all:
            raise NotFound(f"task {container_id!r}: process already finished")
        await task.shim.call(
            "Kill", KillRequest(id=container_id, exec_id=exec_id, signal=signal, all=all), pb.Empty
        )

    async def exec(
        self, namespace: str, container_id: str, exec_id: str, *, spec: Opaque, io: TaskIO = NO_IO
    ) -> None:
        if not exec_id:
            raise InvalidArgument("exec_id: must not be empty")
        task = self._task(namespace, container_id)
        if exec_id in task.execs:
            raise AlreadyExists(f"task {container_id!r}: exec {exec_id!r}: already exists")
        if task.init.exit is not None or task.shim.gone.is_set():
            raise FailedPrecondition(f"task {container_id!r}: is stopped, cannot exec {exec_id!r} in it")
        self._check_crilog(f"task {container_id!r}: exec {exec_id!r}", io, task.shim.binary)
        proc = Process(container_id, exec_id, io)
        task.execs[exec_id] = proc
        try:
            await task.shim.call(
                "Exec",
                ExecProcessRequest(
                    id=container_id,
                    exec_id=exec_id,
                    terminal=io.terminal,
                    stdin=io.stdin,
                    stdout=io.stdout,
                    stderr=io.stderr,
                    spec=pb.Any(type_url=spec.type_url, value=spec.value),
                ),
                pb.Empty,
            )
        except BaseException:
            task.execs.pop(exec_id, None)
            raise

    async def resize_pty(
        self, namespace: str, container_id: str, exec_id: str, width: int, height: int
    ) -> None:
        task = self._task(namespace, container_id)
        task.process(exec_id)
        await task.shim.call(
            "ResizePty",
            ResizePtyRequest(id=container_id, exec_id=exec_id, width=width, height=height),
            pb.Empty,
        )

    async def close_io(self, namespace: str, container_id: str, exec_id: str, *, stdin: bool) -> None:
        task = self._task(namespace, container_id)
        task.process(exec_id)
        await task.shim.call(
            "CloseIO", CloseIoRequest(id=container_id, exec_id=exec_id, stdin=stdin), pb.Empty
        )

    async def pause(self, namespace: str, container_id: str) -> None:
        task = self._task(namespace, container_id)
        await task.shim.call("Pause", PauseRequest(id=container_id), pb.Empty)

    async def resume(self, namespace: str, container_id: str) -> None:
        task = self._task(namespace, container_id)
        await task.shim.call("Resume", ResumeRequest(id=container_id), pb.Empty)

    async def pids(self, namespace: str, container_id: str) -> builtins.list[PidInfo]:
        task = self._task(namespace, container_id)
        found = await task.shim.call("Pids", PidsRequest(id=container_id), PidsResponse)
        return [
            PidInfo(
                p.pid, Opaque(p.info.type_url, bytes(p.info.value)) if p.info and p.info.type_url else None
            )
            for p in found.processes
        ]

    async def update(
        self,
        namespace: str,
        container_id: str,
        *,
        resources: Opaque | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        task = self._task(namespace, container_id)
        request = UpdateTaskRequest(id=container_id, annotations=dict(annotations or {}))
        if resources is not None:
            request.resources = pb.Any(type_url=resources.type_url, value=resources.value)
        await task.shim.call("Update", request, pb.Empty)

    async def stats(self, namespace: str, container_id: str) -> Opaque | None:
        task = self._task(namespace, container_id)
        found = await task.shim.call("Stats", StatsRequest(id=container_id), StatsResponse)
        if found.stats is None or not found.stats.type_url:
            return None
        return Opaque(found.stats.type_url, bytes(found.stats.value))

    async def wait(self, namespace: str, container_id: str, exec_id: str = "") -> ExitStatus:
        task = self._task(namespace, container_id)
        proc = task.process(exec_id)
        if proc.exit is not None:
            return proc.exit
        if task.shim.gone.is_set():
            await proc.exited.wait()
            assert proc.exit is not None
            return proc.exit
        remote = asyncio.create_task(
            task.shim.call("Wait", WaitRequest(id=container_id, exec_id=exec_id), WaitResponse)
        )
        local = asyncio.create_task(proc.exited.wait())
        try:
            await asyncio.wait({remote, local}, return_when=asyncio.FIRST_COMPLETED)
            if not local.done():
                error = remote.exception()
                if error is None:
                    got = remote.result()
                    proc.record_exit(ExitStatus(proc.pid, got.exit_status, when(got.exited_at)))
                elif isinstance(error, Unavailable):
                    await local  # the shim is gone: the supervisor reports the exit
                else:
                    raise error
        finally:
            for pending in (remote, local):
                pending.cancel()
            await asyncio.gather(remote, local, return_exceptions=True)
        assert proc.exit is not None
        return proc.exit

    async def reopen_log(self, namespace: str, container_id: str) -> None:
        """Have the shim reopen the task's crilog:// files (see daemon.protocols.TaskManager)."""
        task = self._task(namespace, container_id)
        if not writes_crilog(task.shim.binary):
            raise FailedPrecondition(
                f"task {container_id!r}: its shim {task.shim.binary!r} writes no CRI log to reopen"
            )
        if task.shim.gone.is_set():
            raise FailedPrecondition(f"task {container_id!r}: its shim is gone, no log is written")
        await task.shim.client.call(
            LOGS_SERVICE,
            "Reopen",
            ReopenLogRequest(id=container_id),
            pb.Empty,
            timeout=REOPEN_TIMEOUT,
            metadata={NAMESPACE_KEY: namespace},
        )
        log.info("task.log_reopened", namespace=namespace, id=container_id)

    # -- shutdown -----------------------------------------------------------

    async def close(self) -> None:
        """Drop connections (shims and their tasks keep running), stop the zygote."""
        # a shim being prepared now is found by the next start's recovery through its group directory
        preparing = list(self._preparing.values())
        for job in preparing:
            job.cancel()
        await asyncio.gather(*preparing, return_exceptions=True)
        shims = {id(t.shim): t.shim for t in self._tasks.values()} | {id(s): s for s in self._groups.values()}
        for shim in shims.values():
            shim.expect_exit()
            await shim.close()
        for task in self._tasks.values():
            if task.log is not None:
                task.log.close()
        if self._zygote:
            with contextlib.suppress(Exception):
                await self._zygote.close()
