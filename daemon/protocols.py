"""The interfaces plugins implement and consume, in one place.

Implementations live in ``plugins/`` (one folder each) and in third-party
packages; consumers get them from the registry (``ic.get(type)``) and code
against these protocols only. Every implementation of a protocol runs the
same conformance suite (``daemon.testsuite``).

Errors are always those of :mod:`daemon.errors` (NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument, Unavailable ...), never OSError.

Plugin types: ``berth.content.v1`` -> :class:`ContentStore`,
``berth.snapshotter.v1`` -> :class:`Snapshotter`, ``berth.diff.v1`` ->
:class:`Applier`, ``berth.runtime.v2`` -> :class:`TaskManager`.
"""

from __future__ import annotations

import builtins
import enum
import hashlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import betterproto.lib.google.protobuf as pb

if TYPE_CHECKING:
    from daemon.metadata.images import Image

# -- shared data -------------------------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, how big, and its digest."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Mount:
    """One mount(2) call, as containerd describes it (``types.Mount``).

    ``type`` is ``bind`` or ``overlay`` for the built-ins; ``options`` are
    mount options (``ro``, ``rbind``, ``lowerdir=...``, ``upperdir=...``,
    ``workdir=...``). ``target`` is usually empty: the consumer picks it.
    """

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


# -- content -----------------------------------------------------------------


@dataclass
class ContentInfo:
    digest: str
    size: int
    created_at: datetime
    updated_at: datetime
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class IngestStatus:
    """A write in progress, resumable from ``offset``."""

    ref: str
    offset: int
    total: int
    expected: str
    started_at: datetime
    updated_at: datetime


class ContentReader(Protocol):
    size: int

    async def read_at(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset``; fewer only at the end of the blob."""
        ...

    async def close(self) -> None: ...


class ContentWriter(Protocol):
    """One ingest, held exclusively (a second writer on the ref is refused).

    Bytes appended with :meth:`write` are durable on disk as written (a crash
    leaves them for a later writer to resume from :attr:`offset`); nothing is
    visible as content until :meth:`commit` verifies size and digest and
    renames the blob into place atomically.
    """

    ref: str
    offset: int

    async def write(self, data: bytes) -> None: ...

    def digest(self) -> str:
        """Digest of the bytes written so far (``sha256:<hex>``)."""
        ...

    async def truncate(self, size: int) -> None:
        """Drop everything after ``size`` (0 restarts the ingest)."""
        ...

    async def commit(self, size: int = 0, expected: str = "", labels: Mapping[str, str] | None = None) -> str:
        """Verify (``size`` and ``expected`` when non-zero/non-empty) and publish; the digest.

        Mismatch: FailedPrecondition naming expected and actual, nothing
        committed, the ingest kept. Already present: AlreadyExists (the
        ingest is removed; callers treat it as success).
        """
        ...

    async def close(self) -> None:
        """Release the ref's lock; the ingest stays for resumption."""
        ...


@runtime_checkable
class ContentStore(Protocol):
    """Content-addressed blobs, plus resumable ingests.

    The local store is namespace-agnostic; the metadata layer scopes it to
    namespaces and keeps labels, exactly as containerd's metadata/content does.
    """

    async def info(self, digest: str) -> ContentInfo: ...

    async def update(self, info: ContentInfo, fieldpaths: Sequence[str] = ()) -> ContentInfo: ...

    def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[ContentInfo]: ...

    async def delete(self, digest: str) -> None: ...

    async def reader(self, digest: str) -> ContentReader: ...

    async def writer(self, ref: str, total: int = 0, expected: str = "") -> ContentWriter:
        """Open (or resume) the ingest ``ref``. Unavailable("ref ... locked") if held."""
        ...

    async def status(self, ref: str) -> IngestStatus: ...

    async def list_statuses(self, filters: Sequence[str] = ()) -> list[IngestStatus]: ...

    async def abort(self, ref: str) -> None: ...


# -- snapshots ---------------------------------------------------------------


class Kind(enum.IntEnum):
    """Snapshot kinds, numbered as containerd's ``snapshots.Kind`` on the wire."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


@dataclass
class SnapshotInfo:
    kind: Kind
    name: str
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class Usage:
    inodes: int = 0
    size: int = 0


@runtime_checkable
class Snapshotter(Protocol):
    """Layered filesystems for containers, the way containerd defines them.

    How an image is unpacked (layer by layer)::

        mounts = await sn.prepare("extract-1", parent="")       # an empty active snapshot
        await applier.apply(layer1, mounts, stream)             # write the layer into it
        await sn.commit("sha256:<chainid1>", "extract-1")       # freeze it under its chain id
        mounts = await sn.prepare("extract-2", parent="sha256:<chainid1>")
        ...                                                     # and so on for each layer

    How a container runs on top::

        mounts = await sn.prepare("ctr-rootfs", parent="sha256:<chainidN>")
        # mount ``mounts`` at the bundle's rootfs; the container writes there
        await sn.remove("ctr-rootfs")                           # when the container is deleted

    Keys and names share one space. ``prepare`` makes an ACTIVE (writable)
    snapshot, ``view`` a VIEW (read-only, never committable), ``commit`` turns
    an ACTIVE into a COMMITTED one under a new name and removes the active key.
    Only COMMITTED snapshots can be parents. ``remove`` refuses a snapshot that
    is the parent of another (FailedPrecondition). ``mounts`` may be called
    again for an ACTIVE or VIEW key. ``cleanup`` deletes on-disk leftovers of
    removed snapshots (removal itself only drops the record, fast).
    Implementations must survive a crash at any point without corrupting a
    committed snapshot.
    """

    async def stat(self, key: str) -> SnapshotInfo: ...

    async def update(self, info: SnapshotInfo, fieldpaths: Sequence[str] = ()) -> SnapshotInfo:
        """Change labels only (``labels`` or ``labels.<key>`` field paths)."""
        ...

    async def usage(self, key: str) -> Usage: ...

    async def mounts(self, key: str) -> list[Mount]: ...

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    async def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]: ...

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None: ...

    async def remove(self, key: str) -> None: ...

    def walk(self, filters: Sequence[str] = ()) -> AsyncIterator[SnapshotInfo]: ...

    async def cleanup(self) -> None: ...

    async def close(self) -> None: ...


# -- diff --------------------------------------------------------------------


class ByteStream(Protocol):
    """An async source of bytes (an aiohttp body, a content reader, a file)."""

    async def read(self, n: int = -1) -> bytes: ...


@runtime_checkable
class Applier(Protocol):
    """Applies a layer (an OCI/Docker tar, possibly compressed) onto mounts.

    The mounts are those of an ACTIVE snapshot. The applier never lets an
    entry land outside them. It returns the descriptor of the *uncompressed*
    tar (its digest is the layer's diff id, checked against the image config
    by the caller).
    """

    async def apply(self, desc: Descriptor, mounts: Sequence[Mount], stream: ByteStream) -> Descriptor: ...


# -- runtime -----------------------------------------------------------------


#: the runtime name containerd's clients (ctr, its CRI) put in container records, and berth's too
RUNC_V2_RUNTIME = "io.containerd.runc.v2"


class TaskStatus(enum.IntEnum):
    """A process's state, numbered as containerd's ``task.Status`` on the wire."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


@dataclass(frozen=True)
class Opaque:
    """A ``google.protobuf.Any`` the runtime passes through (runc options, OCI resources, stats)."""

    type_url: str
    value: bytes = b""

    @classmethod
    def of(cls, value: pb.Any | None) -> Opaque | None:
        """The wire Any as an Opaque; None for an absent or empty one (no type URL)."""
        if value is None or not value.type_url:
            return None
        return cls(value.type_url, bytes(value.value))

    def to_any(self) -> pb.Any:
        return pb.Any(type_url=self.type_url, value=self.value)


@dataclass(frozen=True)
class TaskIO:
    """Where a process's stdio goes: FIFO paths or URIs (``file://``, ``binary://``), as given."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


#: no stdio at all (the default of create and exec)
NO_IO = TaskIO()


@dataclass(frozen=True)
class ExitStatus:
    pid: int
    exit_status: int
    exited_at: datetime


@dataclass(frozen=True)
class ProcessState:
    """A task's init process (``exec_id`` empty) or one of its execs, as Tasks.Get reports it."""

    container_id: str
    exec_id: str
    pid: int
    status: TaskStatus
    io: TaskIO = NO_IO
    exit_status: int = 0
    exited_at: datetime | None = None


@dataclass(frozen=True)
class PidInfo:
    pid: int
    info: Opaque | None = None


@runtime_checkable
class TaskManager(Protocol):
    """Tasks: the running side of containers (plugin type ``berth.runtime.v2``).

    How a container is run, step by step (the Tasks service maps its RPCs
    one to one onto these calls)::

        await rt.create(ns, "web", io=TaskIO(stdout="/run/x/web.out"))  # bundle + shim + runc create
        await rt.start(ns, "web")                                      # runc start; /tasks/start
        ...
        await rt.kill(ns, "web", signal=15)
        exited = await rt.wait(ns, "web")                              # the init's exit status
        await rt.delete(ns, "web")                                     # runc delete, unmount, bundle gone

    ``create`` reads the container record (spec, snapshot) from metadata:
    NotFound for an unknown container or snapshot, AlreadyExists for a
    second task of the same container. ``rootfs`` mounts given by the client
    win over the container's snapshot (``ctr`` passes them). Every process
    exit is published on the bus as ``/tasks/exit`` at least once, also when
    its shim dies (status 137) or when it happened while berthd was down.
    Errors of the shim keep their codes (NotFound for an unknown exec,
    FailedPrecondition for deleting a running task ...).
    """

    async def create(
        self,
        namespace: str,
        container_id: str,
        *,
        io: TaskIO = NO_IO,
        rootfs: Sequence[Mount] = (),
        options: Opaque | None = None,
    ) -> ProcessState: ...

    async def start(self, namespace: str, container_id: str, exec_id: str = "") -> int:
        """Start the init (or an exec added with :meth:`exec`); its pid."""
        ...

    async def delete(self, namespace: str, container_id: str) -> ExitStatus:
        """Delete a stopped (or never started) task: nothing of it is left afterwards."""
        ...

    async def delete_process(self, namespace: str, container_id: str, exec_id: str) -> ExitStatus: ...

    async def get(self, namespace: str, container_id: str, exec_id: str = "") -> ProcessState: ...

    async def list(self, namespace: str) -> list[ProcessState]:
        """Every task (init processes) of ``namespace``."""
        ...

    async def kill(
        self,
        namespace: str,
        container_id: str,
        exec_id: str = "",
        *,
        signal: int,
        all: bool = False,  # noqa: A002
    ) -> None: ...

    async def exec(
        self, namespace: str, container_id: str, exec_id: str, *, spec: Opaque, io: TaskIO = NO_IO
    ) -> None:
        """Add an exec (``spec``: an OCI process, JSON); it runs once started."""
        ...

    async def resize_pty(
        self, namespace: str, container_id: str, exec_id: str, width: int, height: int
    ) -> None: ...

    async def close_io(self, namespace: str, container_id: str, exec_id: str, *, stdin: bool) -> None: ...

    async def pause(self, namespace: str, container_id: str) -> None: ...

    async def resume(self, namespace: str, container_id: str) -> None: ...

    async def pids(self, namespace: str, container_id: str) -> builtins.list[PidInfo]: ...

    async def update(
        self,
        namespace: str,
        container_id: str,
        *,
        resources: Opaque | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None: ...

    async def stats(self, namespace: str, container_id: str) -> Opaque | None:
        """The shim's cgroup statistics (``io.containerd.cgroups.v1.Metrics`` or ``.v2.Metrics``)."""
        ...

    async def wait(self, namespace: str, container_id: str, exec_id: str = "") -> ExitStatus:
        """Block until the process exits (returns at once if it has); never hangs on a dead shim."""
        ...

    async def reopen_log(self, namespace: str, container_id: str) -> None:
        """Reopen the ``crilog://`` log file(s) the task's shim writes (kubelet rotated them).

        Stdio URIs ``crilog:///abs/path/0.log`` (stdout and stderr the same path; a
        terminal names stdout only; optional ``?max_line=N``, default 16384) make
        the shim write the CRI log format itself, so nothing depends on berthd
        being up. Lines written after this call land in the new file, none lost.
        FailedPrecondition if the task writes no such file or its runtime_binary
        is not berth's shim (which alone understands crilog://).
        """
        ...

    def prepare_shim(self, namespace: str, group: str) -> None:
        """Start the shim of ``group`` in the background, ahead of the group's first task.

        A group is what a task's spec annotations name (``io.containerd.runc.v2.group``,
        else ``io.kubernetes.cri.sandbox-id``): the CRI calls this at RunPodSandbox
        so StartContainer finds the pod's shim running, as containerd's does after
        starting the pause container. Never fails nor waits: without it (or if it
        fails, or the runtime cannot prepare) the first create starts the shim.
        A prepared shim serves the group's tasks like any other; while it serves
        none it lives until :meth:`release_idle_shim` (or its last task's delete),
        and a berthd restart shuts it down.
        """
        ...

    async def release_idle_shim(self, namespace: str, group: str) -> None:
        """Shut down ``group``'s shim if it serves no task (StopPodSandbox); quiet if there is none."""
        ...


# -- images (appended with ImageManager: these imports serve it alone) -----------


@dataclass(frozen=True)
class RegistryCredentials:
    """What to authenticate to a registry with; secrets are kept out of ``repr``.

    The images plugin's configured credentials and a caller's per-pull ones
    (a CRI PullImage's AuthConfig) share this shape.
    """

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token or self.registry_token)

    @property
    def key(self) -> str:
        """A fingerprint for caches keyed by credentials (never the secrets themselves)."""
        raw = "\0".join((self.username, self.password, self.identity_token, self.registry_token))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


class ImageManager(Protocol):
    """The images plugin (``berth.images.v1``) as other plugins call it (the CRI plugin first).

    Every call takes the namespace first. Records are :class:`daemon.metadata.images.Image`
    (a name pointing at a target descriptor); changes publish containerd's
    ``/images/create|update|delete`` events. How a CRI PullImage uses it::

        image = await images.pull("k8s.io", "docker.io/library/busybox:latest",
                                  auth=creds, labels={"io.cri-containerd.image": "managed"})
        local = await images.inspect("k8s.io", image)        # manifest + config for the platform
        await images.save("k8s.io", local.config.descriptor.digest, image.target, labels)
    """

    async def get(self, namespace: str, name: str) -> Image:
        """The record ``name``; NotFound if there is none."""
        ...

    async def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Image]:
        """Records matching containerd filters (``name==...``, ``labels."k"==v``); all without filters."""
        ...

    async def save(
        self, namespace: str, name: str, target: Descriptor, labels: Mapping[str, str] | None = None
    ) -> Image:
        """Point ``name`` at ``target`` (create, or update the target and these labels)."""
        ...

    async def remove(self, namespace: str, name: str, *, target_digest: str = "", sync: bool = False) -> None:
        """Delete the record (NotFound if absent, or no longer pointing at ``target_digest``).

        Its blobs and snapshots go with the next garbage collection, before returning if ``sync``.
        """
        ...

    async def pull(
        self,
        namespace: str,
        ref: str,
        *,
        platform: str | None = None,
        auth: RegistryCredentials | None = None,
        labels: Mapping[str, str] | None = None,
        snapshotter: str | None = None,
        unpack: bool = True,
    ) -> Image:
        """Fetch ``ref`` (a normalized reference), unpack it into ``snapshotter``, record it; the record.

        ``auth`` replaces the configured credentials of the registry host for this pull:
        None, or an object with the attributes of the images plugin's ``Credentials``
        (``username``, ``password``, ``identity_token``, ``registry_token`` strings, ``key``
        a non-secret fingerprint, false when all are empty). Identical concurrent pulls
        share one download. Errors: InvalidArgument (reference), NotFound (no such
        image or platform), PermissionDenied (credentials), Unavailable (registry down).
        """
        ...

    async def inspect(self, namespace: str, image: Image | str, *, platform: str | None = None) -> Any:
        """The image as the content store holds it for ``platform`` (default: configured, else host).

        The result has ``config.descriptor`` (the config blob's Descriptor: its digest is
        the image id), ``config.raw`` (the config JSON as a dict), ``chain_ids`` (list of
        str, bottom layer first) and ``size`` (bytes of index, manifest, config, layers).
        NotFound naming the missing blob if the content is not there.
        """
        ...
