"""CRI sandboxes and containers: what berth remembers of them, and where.

Two places, as containerd's CRI keeps them:

* the part fixed at creation (ids, names, the CRI config exactly as kubelet
  sent it, image, log path, namespace files) is a container record in the
  ``k8s.io`` namespace of the native API, labelled
  ``io.cri-containerd.kind=sandbox|container`` with the metadata in the
  extension :data:`EXTENSION` (JSON), so ``berth -n k8s.io containers ls`` and
  ``ctr`` show every CRI object;
* the part that changes (state, pid, IPs, timestamps, exit code, reason) is a
  small JSON status file per object under the plugin's root, replaced
  atomically (write + fsync + rename), so ``kill -9`` never leaves half a status.

:class:`CriStore` holds both in memory (dicts by id), loads them at start-up
and writes through on every change; blocking file and sqlite work runs in a
thread. Lookups accept a unique id prefix, as containerd's CRI does (crictl
prints truncated ids). Names are reserved in a :class:`NameIndex`: one name per
live object, a second RunPodSandbox/CreateContainer with the same name fails
with AlreadyExists naming the holder, as containerd answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog

from daemon.errors import AlreadyExists, InvalidArgument, NotFound
from daemon.metadata.containers import Container, ContainerStore, Runtime, TypedValue
from daemon.protocols import RUNC_V2_RUNTIME

log = structlog.get_logger(__name__)

NAMESPACE = "k8s.io"
EXTENSION = "berth.cri.v1.metadata"
EXTENSION_TYPE = "berth.cri.v1/metadata+json"
KIND_LABEL = "io.cri-containerd.kind"
KIND_SANDBOX = "sandbox"
KIND_CONTAINER = "container"
NAME_DELIMITER = "_"


def now_ns() -> int:
    return time.time_ns()


def sandbox_name(name: str, namespace: str, uid: str, attempt: int) -> str:
    """containerd's ``makeSandboxName``: the name a sandbox holds while it exists."""
    return NAME_DELIMITER.join([name, namespace, uid, str(attempt)])


def container_name(name: str, attempt: int, pod_name: str, pod_namespace: str, pod_uid: str) -> str:
    """containerd's ``makeContainerName``: unique per pod and attempt."""
    return NAME_DELIMITER.join([name, pod_name, pod_namespace, pod_uid, str(attempt)])


class NameIndex:
    """Reserved names: one holder each (a sandbox or container id)."""

    def __init__(self) -> None:
        self._holders: dict[str, str] = {}

    def reserve(self, name: str, key: str) -> None:
        holder = self._holders.get(name)
        if holder is not None and holder != key:
            raise AlreadyExists(f'name "{name}" is reserved for "{holder}"')
        self._holders[name] = key

    def release(self, name: str, key: str | None = None) -> None:
        """Free ``name``; with ``key``, only if ``key`` still holds it (a late undo frees no one else's)."""
        if key is None or self._holders.get(name) == key:
            self._holders.pop(name, None)

    def holder(self, name: str) -> str | None:
        return self._holders.get(name)


# -- records -------------------------------------------------------------------------------


@dataclass
class SandboxMeta:
    """Fixed at RunPodSandbox. ``config`` is the PodSandboxConfig as kubelet sent it (wire bytes)."""

    id: str
    name: str
    config: bytes
    runtime_handler: str = ""
    netns_path: str = ""
    ipc_path: str = ""
    uts_path: str = ""
    cgroup_parent: str = ""
    root_dir: str = ""  # berth's per-sandbox files (hosts, resolv.conf, hostname, shm)


@dataclass
class SandboxStatus:
    """Changes over the sandbox's life. ``state``: "ready" or "notready"."""

    state: str = "notready"
    created_at: int = 0
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    pid: int = 0  # the infra process, when the pod shares a PID namespace
    network_ready: bool = False  # CNI ADD done and not yet undone by DEL


@dataclass
class ContainerMeta:
    """Fixed at CreateContainer. ``config`` is the ContainerConfig as kubelet sent it (wire bytes)."""

    id: str
    name: str
    sandbox_id: str
    config: bytes
    image_ref: str = ""  # the image id (config digest) the container runs
    image_name: str = ""  # the image as the request named it
    log_path: str = ""  # absolute: the sandbox's log directory + the config's log path; "" = none


@dataclass
class ContainerStatus:
    """Changes over the container's life. ``state``: "created", "running", "exited" or "unknown"."""

    state: str = "created"
    created_at: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    pid: int = 0
    reason: str = ""
    message: str = ""
    resources: dict[str, Any] = field(default_factory=dict)  # LinuxContainerResources as JSON, if updated


M = TypeVar("M", SandboxMeta, ContainerMeta)
S = TypeVar("S", SandboxStatus, ContainerStatus)


@dataclass
class Entry(Generic[M, S]):
    """One CRI object: its fixed part, its status, a lock serializing changes to it."""

    meta: M
    status: S
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.meta.id


Sandbox = Entry[SandboxMeta, SandboxStatus]
CriContainer = Entry[ContainerMeta, ContainerStatus]


def _meta_json(
    meta: SandboxMeta | ContainerMeta, labels: Mapping[str, str], annotations: Mapping[str, str]
) -> bytes:
    doc = asdict(meta)
    doc["config"] = base64.b64encode(meta.config).decode()
    doc["labels"] = dict(labels)
    doc["annotations"] = dict(annotations)
    return json.dumps(doc, sort_keys=True).encode()


def _known(cls: type[Any], doc: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in doc.items() if k in names}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- the store -----------------------------------------------------------------------------


class CriStore:
    """Sandboxes and containers of the CRI plugin, in memory and written through.

    ``records`` is the metadata container store (``MetadataDB.containers``);
    ``root`` the plugin's directory for status files.
    """

    def __init__(self, records: ContainerStore, root: Path) -> None:
        self._records = records
        self._root = root
        self.sandboxes: dict[str, Sandbox] = {}
        self.containers: dict[str, CriContainer] = {}
        self.sandbox_names = NameIndex()
        self.container_names = NameIndex()

    def status_path(self, kind: str, id_: str) -> Path:
        return self._root / ("sandboxes" if kind == KIND_SANDBOX else "containers") / id_ / "status"

    # -- loading -------------------------------------------------------------------------

    async def load(self) -> None:
        """Read every CRI record of ``k8s.io`` and its status file (a missing one: unknown state)."""
        records = await self._records.list(NAMESPACE)
        for record in records:
            ext = record.extensions.get(EXTENSION)
            kind = record.labels.get(KIND_LABEL)
            if ext is None or kind not in (KIND_SANDBOX, KIND_CONTAINER):
                continue
            try:
                doc = json.loads(ext.value)
                labels, annotations = doc.pop("labels", {}), doc.pop("annotations", {})
                doc["config"] = base64.b64decode(doc.get("config", ""))
                status_doc = await asyncio.to_thread(self._read_status, kind, record.id)
            except (ValueError, TypeError) as exc:
                log.warning("cri.store.bad_record", id=record.id, error=str(exc))
                continue
            if kind == KIND_SANDBOX:
                sb_meta = SandboxMeta(**_known(SandboxMeta, doc))
                sb_status = SandboxStatus(**_known(SandboxStatus, status_doc or {}))
                self.sandboxes[record.id] = Entry(sb_meta, sb_status, labels, annotations)
                self._reserve_loaded(self.sandbox_names, sb_meta.name, record.id)
            else:
                c_meta = ContainerMeta(**_known(ContainerMeta, doc))
                c_status = ContainerStatus(**_known(ContainerStatus, status_doc or {"state": "unknown"}))
                self.containers[record.id] = Entry(c_meta, c_status, labels, annotations)
                self._reserve_loaded(self.container_names, c_meta.name, record.id)
        log.info("cri.store.loaded", sandboxes=len(self.sandboxes), containers=len(self.containers))

    @staticmethod
    def _reserve_loaded(index: NameIndex, name: str, id_: str) -> None:
        # Two records with one name cannot be made by berth; if found, both load, the first keeps it.
        try:
            index.reserve(name, id_)
        except AlreadyExists as exc:
            log.warning("cri.store.duplicate_name", id=id_, error=exc.message)

    def _read_status(self, kind: str, id_: str) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.status_path(kind, id_).read_bytes())
        except FileNotFoundError:
            return None
        return doc if isinstance(doc, dict) else None

    # -- lookups -------------------------------------------------------------------------

    def sandbox(self, id_or_prefix: str) -> Sandbox:
        return _find(self.sandboxes, id_or_prefix, "sandbox")

    def container(self, id_or_prefix: str) -> CriContainer:
        return _find(self.containers, id_or_prefix, "container")

    def containers_of(self, sandbox_id: str) -> list[CriContainer]:
        return [c for c in self.containers.values() if c.meta.sandbox_id == sandbox_id]

    # -- changes -------------------------------------------------------------------------

    async def add_sandbox(
        self,
        sb: Sandbox,
        record_labels: Mapping[str, str] | None = None,
        *,
        spec: bytes | None = None,
        image: str = "",
        snapshotter: str = "",
        snapshot_key: str = "",
    ) -> None:
        """Persist a new sandbox (record + status); its name must be reserved by the caller.

        ``spec`` (OCI JSON) is given when the sandbox runs an infra task: the
        runtime plugin creates that task from this record (id = sandbox id),
        as containerd runs the pause container from the sandbox's record.
        ``image``/``snapshot_key`` when that task runs from an image.
        """
        await self._create_record(
            KIND_SANDBOX, sb, record_labels, snapshot=(snapshotter, snapshot_key), image=image, spec=spec
        )
        self.sandboxes[sb.id] = sb

    async def add_container(
        self,
        c: CriContainer,
        *,
        spec: bytes,
        snapshotter: str,
        snapshot_key: str,
        record_labels: Mapping[str, str] | None = None,
    ) -> None:
        """Persist a new container: its record carries the OCI spec and snapshot like any container's."""
        await self._create_record(
            KIND_CONTAINER,
            c,
            record_labels,
            snapshot=(snapshotter, snapshot_key),
            image=c.meta.image_name,
            spec=spec,
        )
        self.containers[c.id] = c

    async def _create_record(
        self,
        kind: str,
        entry: Sandbox | CriContainer,
        record_labels: Mapping[str, str] | None,
        *,
        snapshot: tuple[str, str],
        image: str,
        spec: bytes | None = None,
    ) -> None:
        labels = {**(record_labels or {}), KIND_LABEL: kind}
        record = Container(
            id=entry.id,
            runtime=Runtime(name=RUNC_V2_RUNTIME),
            spec=TypedValue("types.containerd.io/opencontainers/runtime-spec/1/Spec", spec) if spec else None,
            image=image,
            labels=labels,
            snapshotter=snapshot[0],
            snapshot_key=snapshot[1],
            sandbox=entry.meta.sandbox_id if isinstance(entry.meta, ContainerMeta) else "",
            extensions={
                EXTENSION: TypedValue(EXTENSION_TYPE, _meta_json(entry.meta, entry.labels, entry.annotations))
            },
        )
        if entry.id in self.sandboxes or entry.id in self.containers:
            # before anything is written: the status file belongs to the existing object
            raise AlreadyExists(f'{kind} "{entry.id}": already exists')
        # Status file and record are independent writes (a file in a worker thread, a transaction in
        # the database's): side by side, then all or nothing. Both are let finish even when the
        # caller is cancelled, so what was written is known and undone.
        saving = asyncio.ensure_future(self.save_status(entry))
        creating = asyncio.ensure_future(self._records.create(NAMESPACE, record))
        cancelled = False
        try:
            await asyncio.wait([saving, creating])
        except asyncio.CancelledError:
            cancelled = True
            await asyncio.wait([saving, creating])
        failed = creating.exception() or saving.exception()
        if failed is None and not cancelled:
            return
        if creating.exception() is None:
            with contextlib.suppress(NotFound):
                await self._records.delete(NAMESPACE, entry.id)
        await asyncio.to_thread(shutil.rmtree, self.status_path(kind, entry.id).parent, True)
        if cancelled:
            raise asyncio.CancelledError
        assert failed is not None
        raise failed

    async def save_status(self, entry: Sandbox | CriContainer) -> None:
        """Write the entry's status file (atomically; in a thread)."""
        kind = KIND_SANDBOX if isinstance(entry.meta, SandboxMeta) else KIND_CONTAINER
        data = json.dumps(asdict(entry.status), sort_keys=True).encode()
        await asyncio.to_thread(_write_atomic, self.status_path(kind, entry.id), data)

    async def remove_sandbox(self, sb: Sandbox) -> None:
        await self._remove(KIND_SANDBOX, sb.id)
        self.sandboxes.pop(sb.id, None)
        self.sandbox_names.release(sb.meta.name, sb.id)

    async def remove_container(self, c: CriContainer) -> None:
        await self._remove(KIND_CONTAINER, c.id)
        self.containers.pop(c.id, None)
        self.container_names.release(c.meta.name, c.id)

    async def _remove(self, kind: str, id_: str) -> None:
        with contextlib.suppress(NotFound):
            await self._records.delete(NAMESPACE, id_)
        await asyncio.to_thread(shutil.rmtree, self.status_path(kind, id_).parent, True)


E = TypeVar("E", Sandbox, CriContainer)


def _find(table: Mapping[str, E], key: str, what: str) -> E:
    if not key:
        raise InvalidArgument(f"{what} id must not be empty")
    found = table.get(key)
    if found is not None:
        return found
    matches = [e for id_, e in table.items() if id_.startswith(key)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise InvalidArgument(f'{what} id prefix "{key}" is ambiguous: it matches {len(matches)} ids')
    raise NotFound(f'{what} "{key}" not found')
