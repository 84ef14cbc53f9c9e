"""The .proto sources, their generated betterproto modules, and protos/generate.py.

Wire facts are checked against bytes built by hand from upstream containerd's field
numbers, so a renumbered or retyped field in our .proto files fails here even though
the generated code would still round-trip with itself.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import betterproto
import betterproto.lib.google.protobuf as wkt
import grpclib.const
import pytest
from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]
from grpclib.client import Channel
from grpclib.server import Server, Stream

from protos import generate
from protos.containerd import events as ev
from protos.containerd import types
from protos.containerd.runc import v1 as runc
from protos.containerd.services.containers import v1 as containers
from protos.containerd.services.content import v1 as content
from protos.containerd.services.diff import v1 as diff
from protos.containerd.services.events.v1 import EventsBase, EventsStub, ForwardRequest, SubscribeRequest
from protos.containerd.services.images import v1 as images
from protos.containerd.services.images.v1 import ImageCreate
from protos.containerd.services.introspection.v1 import (
    IntrospectionBase,
    Plugin,
    PluginsResponse,
    ServerResponse,
)
from protos.containerd.services.leases.v1 import (
    AddResourceRequest,
    CreateRequest,
    Lease,
    LeasesBase,
    Resource,
)
from protos.containerd.services.namespaces.v1 import Namespace, NamespacesBase, UpdateNamespaceRequest
from protos.containerd.services.snapshots import v1 as snapshots
from protos.containerd.services.tasks import v1 as tasks
from protos.containerd.services.version.v1 import VersionBase, VersionResponse, VersionStub
from protos.containerd.task import v2 as shim
from protos.containerd.v1 import types as task_types
from protos.google.rpc import Status

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"


# -- hand encoding (protobuf wire format) -------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def vfield(number: int, value: int) -> bytes:
    """A varint field (wire type 0)."""
    return varint(number << 3) + varint(value)


def lfield(number: int, payload: bytes | str) -> bytes:
    """A length-delimited field (wire type 2): strings, bytes, messages, map entries."""
    data = payload.encode() if isinstance(payload, str) else payload
    return varint(number << 3 | 2) + varint(len(data)) + data


def entry(number: int, key: str, value: str) -> bytes:
    """One map<string, string> entry: a nested message with key = 1, value = 2."""
    return lfield(number, lfield(1, key) + lfield(2, value))


# -- every .proto compiles ----------------------------------------------------------------


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    sources = generate.find_protos(PROTOS)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTOS}",
            f"--descriptor_set_out={out}",
            *(str(PROTOS / s) for s in sources),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"protoc warnings: {proc.stderr}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    assert sorted(f.name for f in fds.file) == sources
    return fds


def test_every_proto_compiles_into_its_path_package(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    names = {f.name for f in descriptor_set.file}
    assert {
        "containerd/services/version/v1/version.proto",
        "containerd/services/namespaces/v1/namespace.proto",
        "containerd/services/introspection/v1/introspection.proto",
        "containerd/services/events/v1/events.proto",
        "containerd/services/leases/v1/leases.proto",
        "containerd/events/task.proto",
        "containerd/types/event.proto",
        "containerd/types/metrics.proto",
        "containerd/services/content/v1/content.proto",
        "containerd/services/snapshots/v1/snapshots.proto",
        "containerd/services/images/v1/images.proto",
        "containerd/services/diff/v1/diff.proto",
        "containerd/services/containers/v1/containers.proto",
        "containerd/services/tasks/v1/tasks.proto",
        "containerd/v1/types/task.proto",
        "containerd/task/v2/shim.proto",
        "containerd/runc/v1/oci.proto",
        "google/rpc/status.proto",
    } <= names
    for f in descriptor_set.file:
        # The house layout: protos/<package as path>/<name>.proto.
        assert f.name.rsplit("/", 1)[0] == f.package.replace(".", "/"), f.name
        assert f.syntax == "proto3", f.name
        assert not f.options.HasField("go_package"), f"{f.name}: go-only option left in"


def test_generated_handlers_cover_every_rpc(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    """Each service's Base maps exactly the RPCs the .proto declares, with the right streaming shape."""
    import importlib

    seen = 0
    for f in descriptor_set.file:
        for service in f.service:
            module = importlib.import_module(f"protos.{f.package}")
            base = getattr(module, f"{service.name}Base")()
            mapping = base.__mapping__()
            expected = {
                f"/{f.package}.{service.name}/{m.name}": (m.client_streaming, m.server_streaming)
                for m in service.method
            }
            assert {path: tuple(h.cardinality.value) for path, h in mapping.items()} == expected
            seen += 1
    # 13 containerd services (ttrpc Events too), berth Transfer, GC and shim Logs, CRI Runtime and Image
    assert seen == 18


# -- service paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "paths"),
    [
        (VersionBase, ["/containerd.services.version.v1.Version/Version"]),
        (
            NamespacesBase,
            [
                f"/containerd.services.namespaces.v1.Namespaces/{m}"
                for m in ("Get", "List", "Create", "Update", "Delete")
            ],
        ),
        (
            IntrospectionBase,
            [
                f"/containerd.services.introspection.v1.Introspection/{m}"
                for m in ("Plugins", "Server", "PluginInfo")
            ],
        ),
        (
            EventsBase,
            [f"/containerd.services.events.v1.Events/{m}" for m in ("Publish", "Forward", "Subscribe")],
        ),
        (
            LeasesBase,
            [
                f"/containerd.services.leases.v1.Leases/{m}"
                for m in ("Create", "Delete", "List", "AddResource", "DeleteResource", "ListResources")
            ],
        ),
    ],
)
def test_service_paths_are_containerds(base: type[Any], paths: list[str]) -> None:
    assert sorted(base().__mapping__()) == sorted(paths)


_U = grpclib.const.Cardinality.UNARY_UNARY
_US = grpclib.const.Cardinality.UNARY_STREAM
_SS = grpclib.const.Cardinality.STREAM_STREAM


@pytest.mark.parametrize(
    ("base", "service", "methods"),
    [
        (
            content.ContentBase,
            "containerd.services.content.v1.Content",
            {
                "Info": _U,
                "Update": _U,
                "List": _US,
                "Delete": _U,
                "Read": _US,
                "Status": _U,
                "ListStatuses": _U,
                "Write": _SS,
                "Abort": _U,
            },
        ),
        (
            snapshots.SnapshotsBase,
            "containerd.services.snapshots.v1.Snapshots",
            {
                **dict.fromkeys(
                    ("Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "Usage", "Cleanup"),
                    _U,
                ),
                "List": _US,
            },
        ),
        (
            images.ImagesBase,
            "containerd.services.images.v1.Images",
            dict.fromkeys(("Get", "List", "Create", "Update", "Delete"), _U),
        ),
        (diff.DiffBase, "containerd.services.diff.v1.Diff", {"Apply": _U, "Diff": _U}),
        (
            containers.ContainersBase,
            "containerd.services.containers.v1.Containers",
            {**dict.fromkeys(("Get", "List", "Create", "Update", "Delete"), _U), "ListStream": _US},
        ),
        (
            tasks.TasksBase,
            "containerd.services.tasks.v1.Tasks",
            dict.fromkeys(
                [
                    "Create",
                    "Start",
                    "Delete",
                    "DeleteProcess",
                    "Get",
                    "List",
                    "Kill",
                    "Exec",
                    "ResizePty",
                    "CloseIO",
                    "Pause",
                    "Resume",
                    "ListPids",
                    "Checkpoint",
                    "Update",
                    "Metrics",
                    "Wait",
                ],
                _U,
            ),
        ),
        (
            shim.TaskBase,
            "containerd.task.v2.Task",
            dict.fromkeys(
                [
                    "Create",
                    "Start",
                    "Delete",
                    "Pids",
                    "Pause",
                    "Resume",
                    "Checkpoint",
                    "Kill",
                    "Exec",
                    "ResizePty",
                    "CloseIO",
                    "Update",
                    "Wait",
                    "Stats",
                    "Connect",
                    "Shutdown",
                    "State",
                ],
                _U,
            ),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_method_paths_and_cardinalities(
    base: type[Any], service: str, methods: dict[str, grpclib.const.Cardinality]
) -> None:
    """Upstream's method names and streaming shapes, written out rather than read from our .proto."""
    mapping = base().__mapping__()
    assert {path: h.cardinality for path, h in mapping.items()} == {
        f"/{service}/{name}": cardinality for name, cardinality in methods.items()
    }


class _LiteralVersion:
    """A server keyed by the literal upstream path, independent of the generated Base."""

    def __init__(self) -> None:
        self.calls = 0

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            "/containerd.services.version.v1.Version/Version": grpclib.const.Handler(
                self._version, grpclib.const.Cardinality.UNARY_UNARY, wkt.Empty, VersionResponse
            )
        }

    async def _version(self, stream: Stream[wkt.Empty, VersionResponse]) -> None:
        await stream.recv_message()
        self.calls += 1
        await stream.send_message(VersionResponse(version="v9", revision="abc"))


@pytest.fixture
async def unix_server(tmp_path: Path) -> AsyncIterator[Any]:
    servers: list[Server] = []

    async def start(*handlers: Any) -> str:
        path = str(tmp_path / f"s{len(servers)}.sock")
        server = Server(list(handlers))
        await server.start(path=path)
        servers.append(server)
        return path

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_version_stub_calls_the_upstream_path(unix_server: Any) -> None:
    service = _LiteralVersion()
    channel = Channel(path=await unix_server(service))
    try:
        reply = await VersionStub(channel).version(wkt.Empty(), timeout=5)
    finally:
        channel.close()
    assert (reply.version, reply.revision) == ("v9", "abc")
    assert service.calls == 1


class _TwoEvents(EventsBase):  # type: ignore[misc]
    async def subscribe(self, subscribe_request: SubscribeRequest) -> AsyncIterator[types.Envelope]:
        for topic in subscribe_request.filters:
            yield types.Envelope(namespace="default", topic=topic)


async def test_events_subscribe_streams_envelopes(unix_server: Any) -> None:
    channel = Channel(path=await unix_server(_TwoEvents()))
    try:
        got = [e.topic async for e in EventsStub(channel).subscribe(SubscribeRequest(filters=["/a", "/b"]))]
    finally:
        channel.close()
    assert got == ["/a", "/b"]


class _EchoContent(content.ContentBase):  # type: ignore[misc]
    """Answers each Write message as it arrives, so the test sees the stream interleave."""

    async def write(
        self, write_content_request_iterator: AsyncIterator[content.WriteContentRequest]
    ) -> AsyncIterator[content.WriteContentResponse]:
        offset = 0
        async for request in write_content_request_iterator:
            offset += len(request.data)
            yield content.WriteContentResponse(action=request.action, offset=offset, total=request.total)


async def test_content_write_is_a_bidi_stream(unix_server: Any) -> None:
    channel = Channel(path=await unix_server(_EchoContent()))
    requests = [
        content.WriteContentRequest(action=content.WriteAction.STAT, ref="r", total=5),
        content.WriteContentRequest(action=content.WriteAction.WRITE, data=b"hel"),
        content.WriteContentRequest(action=content.WriteAction.COMMIT, data=b"lo", offset=3),
    ]
    try:
        got = [(r.action, r.offset) async for r in content.ContentStub(channel).write(requests)]
    finally:
        channel.close()
    assert got == [
        (content.WriteAction.STAT, 0),
        (content.WriteAction.WRITE, 3),
        (content.WriteAction.COMMIT, 5),
    ]


# -- wire facts -----------------------------------------------------------------------------


def test_namespace_field_numbers() -> None:
    wire = lfield(1, "k8s.io") + entry(2, "team", "infra") + entry(2, "tier", "gold")
    ns = Namespace().parse(wire)
    assert ns.name == "k8s.io"
    assert ns.labels == {"team": "infra", "tier": "gold"}
    assert bytes(ns) == wire

    update = UpdateNamespaceRequest().parse(lfield(1, lfield(1, "x")) + lfield(2, lfield(1, "labels.team")))
    assert update.namespace.name == "x"
    assert update.update_mask.paths == ["labels.team"]


def test_introspection_plugin_field_numbers() -> None:
    platform = lfield(1, "linux") + lfield(2, "arm64") + lfield(3, "v8") + lfield(4, "10.0.17763")
    status = (
        vfield(1, 9)
        + lfield(2, "needs overlay")
        + lfield(3, lfield(1, "type.googleapis.com/x") + lfield(2, b"\x01"))
    )
    wire = (
        lfield(1, "io.containerd.snapshotter.v1")
        + lfield(2, "overlayfs")
        + lfield(3, "io.containerd.content.v1")
        + lfield(4, platform)
        + entry(5, "root", "/var/lib/x")
        + lfield(6, "remap-ids")
        + lfield(7, status)
    )
    plugin = Plugin().parse(wire)
    assert (plugin.type, plugin.id, plugin.requires) == (
        "io.containerd.snapshotter.v1",
        "overlayfs",
        ["io.containerd.content.v1"],
    )
    assert plugin.platforms == [
        types.Platform(os="linux", architecture="arm64", variant="v8", os_version="10.0.17763")
    ]
    assert plugin.exports == {"root": "/var/lib/x"}
    assert plugin.capabilities == ["remap-ids"]
    assert plugin.init_err == Status(
        code=9, message="needs overlay", details=[wkt.Any(type_url="type.googleapis.com/x", value=b"\x01")]
    )
    assert bytes(plugin) == wire
    assert PluginsResponse().parse(lfield(1, wire)).plugins == [plugin]

    server = ServerResponse().parse(lfield(1, "uuid-1") + vfield(2, 4242) + vfield(3, 4026531836))
    assert (server.uuid, server.pid, server.pidns) == ("uuid-1", 4242, 4026531836)


def test_envelope_field_numbers_and_event_payload() -> None:
    # containerd 2.x containerd.types.Envelope and 1.6's containerd.services.events.v1.Envelope
    # share these numbers, so the bytes below are what either generation of ctr sends and reads.
    exited = (
        lfield(1, "c1")
        + lfield(2, "c1")
        + vfield(3, 4321)
        + vfield(4, 137)
        + lfield(5, vfield(1, 1_700_000_000))
    )
    any_event = lfield(1, "containerd.events.TaskExit") + lfield(2, exited)
    wire = (
        lfield(1, vfield(1, 1_700_000_000) + vfield(2, 5000))
        + lfield(2, "default")
        + lfield(3, "/tasks/exit")
        + lfield(4, any_event)
    )
    envelope = types.Envelope().parse(wire)
    assert envelope.timestamp == datetime(2023, 11, 14, 22, 13, 20, 5, tzinfo=UTC)
    assert (envelope.namespace, envelope.topic) == ("default", "/tasks/exit")
    assert envelope.event.type_url == "containerd.events.TaskExit"
    exit_event = ev.TaskExit().parse(envelope.event.value)
    assert (exit_event.container_id, exit_event.id, exit_event.pid, exit_event.exit_status) == (
        "c1",
        "c1",
        4321,
        137,
    )
    assert exit_event.exited_at == datetime.fromtimestamp(1_700_000_000, UTC)
    assert bytes(envelope) == wire

    forward = ForwardRequest().parse(lfield(1, wire))
    assert forward.envelope == envelope


def test_event_payload_field_numbers() -> None:
    # Upstream leaves gaps: snapshotter is 5 in all three snapshot events.
    assert bytes(ev.SnapshotPrepare(key="k", parent="p", snapshotter="overlayfs")) == (
        lfield(1, "k") + lfield(2, "p") + lfield(5, "overlayfs")
    )
    assert bytes(ev.SnapshotCommit(key="k", name="n", snapshotter="s")) == lfield(1, "k") + lfield(
        2, "n"
    ) + lfield(5, "s")
    assert bytes(ev.SnapshotRemove(key="k", snapshotter="s")) == lfield(1, "k") + lfield(5, "s")

    create = ev.TaskCreate().parse(
        lfield(1, "c")
        + lfield(2, "/run/b")
        + lfield(3, lfield(1, "overlay") + lfield(2, "overlay") + lfield(3, "/") + lfield(4, "ro"))
        + lfield(4, lfield(1, "in") + lfield(2, "out") + lfield(3, "err") + vfield(4, 1))
        + lfield(5, "cp")
        + vfield(6, 7)
    )
    assert create.rootfs == [types.Mount(type="overlay", source="overlay", target="/", options=["ro"])]
    assert create.io == ev.TaskIo(stdin="in", stdout="out", stderr="err", terminal=True)
    assert (create.checkpoint, create.pid) == ("cp", 7)

    deleted = ev.TaskDelete().parse(lfield(1, "c") + vfield(2, 1) + vfield(3, 2) + lfield(5, "exec-1"))
    assert (deleted.pid, deleted.exit_status, deleted.id) == (1, 2, "exec-1")

    container = ev.ContainerCreate().parse(
        lfield(1, "c") + lfield(2, "img") + lfield(3, lfield(1, "io.containerd.runc.v2"))
    )
    assert container.runtime.name == "io.containerd.runc.v2"
    assert ev.ContainerUpdate().parse(entry(3, "a", "b") + lfield(4, "snap")).snapshot_key == "snap"
    assert ev.ContentCreate().parse(lfield(1, "sha256:aa") + vfield(2, 99)).size == 99
    assert ev.NamespaceCreate().parse(lfield(1, "n") + entry(2, "a", "b")).labels == {"a": "b"}
    assert bytes(ImageCreate(name="docker.io/library/busybox:latest", labels={"a": "b"})) == (
        lfield(1, "docker.io/library/busybox:latest") + entry(2, "a", "b")
    )


def test_types_field_numbers() -> None:
    descriptor = types.Descriptor().parse(
        lfield(1, "application/vnd.oci.image.manifest.v1+json")
        + lfield(2, "sha256:ab")
        + vfield(3, 512)
        + entry(5, "k", "v")
    )
    assert descriptor == types.Descriptor(
        media_type="application/vnd.oci.image.manifest.v1+json",
        digest="sha256:ab",
        size=512,
        annotations={"k": "v"},
    )
    info = types.RuntimeInfo().parse(
        lfield(1, "io.containerd.runc.v2") + lfield(2, lfield(1, "1.7") + lfield(2, "r"))
    )
    assert info.version == types.RuntimeVersion(version="1.7", revision="r")
    assert types.RuntimeRequest().parse(lfield(1, "/usr/bin/runc")).runtime_path == "/usr/bin/runc"


def test_leases_field_numbers() -> None:
    lease = Lease().parse(
        lfield(1, "l1") + lfield(2, vfield(1, 60)) + entry(3, "containerd.io/gc.expire", "x")
    )
    assert lease.created_at == datetime(1970, 1, 1, 0, 1, tzinfo=UTC)
    assert lease.labels == {"containerd.io/gc.expire": "x"}
    # CreateRequest skips number 2.
    assert bytes(CreateRequest(id="l1", labels={"a": "b"})) == lfield(1, "l1") + entry(3, "a", "b")
    add = AddResourceRequest().parse(
        lfield(1, "l1") + lfield(2, lfield(1, "sha256:ab") + lfield(2, "content"))
    )
    assert add.resource == Resource(id="sha256:ab", type="content")


def timestamp(seconds: int, nanos: int = 0) -> bytes:
    """A google.protobuf.Timestamp payload."""
    return vfield(1, seconds) + (vfield(2, nanos) if nanos else b"")


MOUNT = lfield(1, "overlay") + lfield(2, "overlay") + lfield(4, "lowerdir=/l") + lfield(4, "upperdir=/u")
PARSED_MOUNT = types.Mount(type="overlay", source="overlay", options=["lowerdir=/l", "upperdir=/u"])
EPOCH_MINUTE = datetime(1970, 1, 1, 0, 1, tzinfo=UTC)


def test_content_field_numbers() -> None:
    wire = (
        vfield(1, 2)  # action COMMIT
        + lfield(2, "ref-1")
        + vfield(3, 5)
        + lfield(4, "sha256:2cf2")
        + vfield(5, 3)
        + lfield(6, b"lo")
        + entry(7, "containerd.io/gc.ref.content", "sha256:aa")
    )
    request = content.WriteContentRequest().parse(wire)
    assert request == content.WriteContentRequest(
        action=content.WriteAction.COMMIT,
        ref="ref-1",
        total=5,
        expected="sha256:2cf2",
        offset=3,
        data=b"lo",
        labels={"containerd.io/gc.ref.content": "sha256:aa"},
    )
    assert bytes(request) == wire

    response = content.WriteContentResponse().parse(
        vfield(1, 0)  # STAT is the zero value: sent by old clients, parsed all the same
        + lfield(2, timestamp(60))
        + lfield(3, timestamp(60, 5000))
        + vfield(4, 3)
        + vfield(5, 5)
        + lfield(6, "sha256:partial")
    )
    assert response.action is content.WriteAction.STAT
    assert (response.started_at, response.offset, response.total, response.digest) == (
        EPOCH_MINUTE,
        3,
        5,
        "sha256:partial",
    )
    assert response.updated_at == datetime(1970, 1, 1, 0, 1, 0, 5, tzinfo=UTC)

    info = content.Info().parse(
        lfield(1, "sha256:aa") + vfield(2, 4096) + lfield(3, timestamp(60)) + entry(5, "a", "b")
    )
    assert (info.digest, info.size, info.created_at, info.labels) == (
        "sha256:aa",
        4096,
        EPOCH_MINUTE,
        {"a": "b"},
    )
    status = content.StatusResponse().parse(
        lfield(1, lfield(3, "ref-1") + vfield(4, 7) + lfield(6, "sha256:x"))
    )
    assert (status.status.ref, status.status.offset, status.status.expected) == ("ref-1", 7, "sha256:x")
    read = content.ReadContentRequest(digest="sha256:aa", offset=10, size=20)
    assert bytes(read) == lfield(1, "sha256:aa") + vfield(2, 10) + vfield(3, 20)


def test_snapshots_field_numbers() -> None:
    wire = lfield(1, "overlayfs") + lfield(2, "extract-1") + lfield(3, "sha256:p") + entry(4, "k", "v")
    prepare = snapshots.PrepareSnapshotRequest().parse(wire)
    assert (prepare.snapshotter, prepare.key, prepare.parent, prepare.labels) == (
        "overlayfs",
        "extract-1",
        "sha256:p",
        {"k": "v"},
    )
    assert bytes(prepare) == wire
    assert snapshots.PrepareSnapshotResponse().parse(lfield(1, MOUNT)).mounts == [PARSED_MOUNT]

    # parent (5) is a 2.x addition; labels keep 4.
    commit = snapshots.CommitSnapshotRequest(
        snapshotter="s", name="n", key="k", labels={"a": "b"}, parent="p"
    )
    assert bytes(commit) == lfield(1, "s") + lfield(2, "n") + lfield(3, "k") + entry(4, "a", "b") + lfield(
        5, "p"
    )

    info = snapshots.Info().parse(
        lfield(1, "n") + lfield(2, "p") + vfield(3, 3) + lfield(4, timestamp(60)) + entry(6, "a", "b")
    )
    assert (info.kind, info.created_at, info.labels) == (snapshots.Kind.COMMITTED, EPOCH_MINUTE, {"a": "b"})
    usage = snapshots.UsageResponse().parse(vfield(1, 8192) + vfield(2, 12))
    assert (usage.size, usage.inodes) == (8192, 12)
    listed = snapshots.ListSnapshotsRequest().parse(lfield(1, "native") + lfield(2, "kind==committed"))
    assert listed.filters == ["kind==committed"]


def test_image_field_numbers() -> None:
    target = lfield(1, "application/vnd.oci.image.index.v1+json") + lfield(2, "sha256:ix") + vfield(3, 1234)
    wire = (
        lfield(1, "docker.io/library/busybox:latest")
        + entry(2, "io.cri-containerd.image", "managed")
        + lfield(3, target)
        + lfield(7, timestamp(60))
        + lfield(8, timestamp(120))
    )
    image = images.Image().parse(wire)
    assert image.name == "docker.io/library/busybox:latest"
    assert image.labels == {"io.cri-containerd.image": "managed"}
    assert image.target == types.Descriptor(
        media_type="application/vnd.oci.image.index.v1+json", digest="sha256:ix", size=1234
    )
    assert (image.created_at, image.updated_at) == (EPOCH_MINUTE, datetime(1970, 1, 1, 0, 2, tzinfo=UTC))
    assert bytes(image) == wire
    assert images.ListImagesResponse().parse(lfield(1, wire)).images == [image]

    created = images.CreateImageRequest().parse(lfield(1, lfield(1, "x")) + lfield(2, timestamp(60)))
    assert created.source_date_epoch == EPOCH_MINUTE
    # target is proto3 optional: absent and empty are different requests.
    assert bytes(images.DeleteImageRequest(name="x", sync=True)) == lfield(1, "x") + vfield(2, 1)
    assert bytes(images.DeleteImageRequest(name="x", target=types.Descriptor())) == lfield(1, "x") + lfield(
        3, b""
    )
    assert images.DeleteImageRequest().parse(lfield(1, "x")).target is None
    assert images.DeleteImageRequest().parse(lfield(3, b"")).target == types.Descriptor()


def test_diff_field_numbers() -> None:
    apply = diff.ApplyRequest().parse(
        lfield(1, lfield(2, "sha256:layer"))
        + lfield(2, MOUNT)
        + lfield(3, lfield(1, "tar") + lfield(2, lfield(1, "type/x") + lfield(2, b"\x01")))
        + vfield(4, 1)
    )
    assert apply.diff.digest == "sha256:layer"
    assert apply.mounts == [PARSED_MOUNT]
    assert apply.payloads == {"tar": wkt.Any(type_url="type/x", value=b"\x01")}
    assert apply.sync_fs is True
    # Upstream numbers DiffResponse.diff 3.
    assert bytes(diff.DiffResponse(diff=types.Descriptor(digest="d"))) == lfield(3, lfield(2, "d"))
    request = diff.DiffRequest().parse(
        lfield(1, MOUNT) + lfield(2, MOUNT) + lfield(3, "m") + lfield(4, "r") + entry(5, "a", "b")
    )
    assert (request.left, request.right, request.media_type, request.ref) == (
        [PARSED_MOUNT],
        [PARSED_MOUNT],
        "m",
        "r",
    )


def test_container_field_numbers() -> None:
    spec = lfield(1, "types.containerd.io/opencontainers/runtime-spec/1/Spec") + lfield(2, b"{}")
    wire = (
        lfield(1, "c1")
        + entry(2, "io.kubernetes.pod.name", "p")
        + lfield(3, "docker.io/library/busybox:latest")
        + lfield(4, lfield(1, "io.containerd.runc.v2") + lfield(2, lfield(1, "containerd.runc.v1.Options")))
        + lfield(5, spec)
        + lfield(6, "overlayfs")
        + lfield(7, "c1-snapshot")
        + lfield(8, timestamp(60))
        + lfield(9, timestamp(60))
        + lfield(10, lfield(1, "ext") + lfield(2, lfield(1, "type/ext")))
        + lfield(11, "sandbox-1")
    )
    container = containers.Container().parse(wire)
    assert container.runtime == containers.ContainerRuntime(
        name="io.containerd.runc.v2", options=wkt.Any(type_url="containerd.runc.v1.Options")
    )
    assert container.spec == wkt.Any(
        type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec", value=b"{}"
    )
    assert (container.snapshotter, container.snapshot_key, container.sandbox) == (
        "overlayfs",
        "c1-snapshot",
        "sandbox-1",
    )
    assert container.extensions == {"ext": wkt.Any(type_url="type/ext")}
    assert container.created_at == container.updated_at == EPOCH_MINUTE
    assert bytes(container) == wire
    assert containers.ListContainerMessage().parse(lfield(1, wire)).container == container
    listed = containers.ListContainersRequest().parse(lfield(1, "labels.a==b") + lfield(1, "image~=busybox"))
    assert listed.filters == ["labels.a==b", "image~=busybox"]


def test_tasks_field_numbers() -> None:
    checkpoint = lfield(1, "application/vnd.containerd.container.criu.checkpoint.criu.tar") + lfield(
        2, "sha256:c"
    )
    wire = (
        lfield(1, "c1")
        + lfield(3, MOUNT)
        + lfield(4, "/run/fifo/in")
        + lfield(5, "/run/fifo/out")
        + lfield(6, "binary:///log")
        + vfield(7, 1)
        + lfield(8, checkpoint)
        + lfield(9, lfield(1, "containerd.runc.v1.Options") + lfield(2, vfield(9, 1)))
        + lfield(10, "/usr/bin/containerd-shim-runc-v2")
    )
    create = tasks.CreateTaskRequest().parse(wire)
    assert create.rootfs == [PARSED_MOUNT]
    assert (create.stdin, create.stdout, create.stderr, create.terminal) == (
        "/run/fifo/in",
        "/run/fifo/out",
        "binary:///log",
        True,
    )
    assert create.checkpoint.digest == "sha256:c"
    assert runc.Options().parse(create.options.value) == runc.Options(systemd_cgroup=True)
    assert create.runtime_path == "/usr/bin/containerd-shim-runc-v2"
    assert bytes(create) == wire

    process = (
        lfield(1, "c1")
        + lfield(2, "exec-1")
        + vfield(3, 4242)
        + vfield(4, 3)
        + lfield(5, "i")
        + lfield(6, "o")
        + lfield(7, "e")
        + vfield(8, 1)
        + vfield(9, 137)
        + lfield(10, timestamp(60))
    )
    got = tasks.GetResponse().parse(lfield(1, process)).process
    assert got == task_types.Process(
        container_id="c1",
        id="exec-1",
        pid=4242,
        status=task_types.Status.STOPPED,
        stdin="i",
        stdout="o",
        stderr="e",
        terminal=True,
        exit_status=137,
        exited_at=EPOCH_MINUTE,
    )
    pids = tasks.ListPidsResponse().parse(
        lfield(1, vfield(1, 7) + lfield(2, lfield(1, "containerd.runc.v1.ProcessDetails")))
    )
    assert pids.processes[0].pid == 7
    metric = tasks.MetricsResponse().parse(
        lfield(1, lfield(1, timestamp(60)) + lfield(2, "c1") + lfield(3, lfield(1, "t")))
    )
    assert metric.metrics == [types.Metric(timestamp=EPOCH_MINUTE, id="c1", data=wkt.Any(type_url="t"))]
    exec_request = tasks.ExecProcessRequest(
        container_id="c1", terminal=True, spec=wkt.Any(type_url="s"), exec_id="e"
    )
    assert bytes(exec_request) == lfield(1, "c1") + vfield(5, 1) + lfield(6, lfield(1, "s")) + lfield(7, "e")
    deleted = tasks.DeleteResponse().parse(
        lfield(1, "c1") + vfield(2, 7) + vfield(3, 1) + lfield(4, timestamp(60))
    )
    assert (deleted.id, deleted.pid, deleted.exit_status, deleted.exited_at) == ("c1", 7, 1, EPOCH_MINUTE)


def test_shim_field_numbers() -> None:
    # Not the tasks.v1 layout: terminal moves to 4, checkpoint is a path string, options is 10.
    wire = (
        lfield(1, "c1")
        + lfield(2, "/run/berth/bundles/default/c1")
        + lfield(3, MOUNT)
        + vfield(4, 1)
        + lfield(5, "in")
        + lfield(6, "out")
        + lfield(7, "err")
        + lfield(8, "/ckpt")
        + lfield(9, "/parent")
        + lfield(10, lfield(1, "containerd.runc.v1.Options"))
    )
    create = shim.CreateTaskRequest().parse(wire)
    assert create == shim.CreateTaskRequest(
        id="c1",
        bundle="/run/berth/bundles/default/c1",
        rootfs=[PARSED_MOUNT],
        terminal=True,
        stdin="in",
        stdout="out",
        stderr="err",
        checkpoint="/ckpt",
        parent_checkpoint="/parent",
        options=wkt.Any(type_url="containerd.runc.v1.Options"),
    )
    assert bytes(create) == wire

    state_wire = (
        lfield(1, "c1")
        + lfield(2, "/b")
        + vfield(3, 4242)
        + vfield(4, 2)
        + lfield(5, "in")
        + lfield(6, "out")
        + lfield(7, "err")
        + vfield(8, 1)
        + vfield(9, 0)
        + lfield(10, timestamp(60))
        + lfield(11, "exec-1")
    )
    state = shim.StateResponse().parse(state_wire)
    assert (state.id, state.bundle, state.pid, state.status) == ("c1", "/b", 4242, task_types.Status.RUNNING)
    assert (state.stdin, state.stdout, state.stderr, state.terminal) == ("in", "out", "err", True)
    assert (state.exit_status, state.exited_at, state.exec_id) == (0, EPOCH_MINUTE, "exec-1")
    # A zero exit_status is the default and is not re-sent.
    assert bytes(state) == state_wire.replace(vfield(9, 0), b"")

    connect = shim.ConnectResponse().parse(vfield(1, 100) + vfield(2, 4242) + lfield(3, "v2"))
    assert (connect.shim_pid, connect.task_pid, connect.version) == (100, 4242, "v2")
    assert bytes(shim.ShutdownRequest(id="c1", now=True)) == lfield(1, "c1") + vfield(2, 1)
    assert bytes(shim.CheckpointTaskRequest(id="c1", path="/p")) == lfield(1, "c1") + lfield(2, "/p")
    waited = shim.WaitResponse().parse(vfield(1, 9) + lfield(2, timestamp(60)))
    assert (waited.exit_status, waited.exited_at) == (9, EPOCH_MINUTE)


def test_runc_options_field_numbers() -> None:
    options = runc.Options(binary_name="runc", root="/run/runc", systemd_cgroup=True, task_api_version=3)
    assert bytes(options) == lfield(6, "runc") + lfield(7, "/run/runc") + vfield(9, 1) + vfield(13, 3)
    # 1.x sent criu_path as field 8; 2.x reserves it, and it must not disturb the rest.
    old = runc.Options().parse(lfield(8, "/usr/sbin/criu") + vfield(9, 1) + lfield(10, "/img"))
    assert (old.systemd_cgroup, old.criu_image_path) == (True, "/img")
    checkpoint = runc.CheckpointOptions(
        exit=True, empty_namespaces=["network"], cgroups_mode="soft", work_path="/w"
    )
    assert bytes(checkpoint) == vfield(1, 1) + lfield(6, "network") + lfield(7, "soft") + lfield(9, "/w")
    assert runc.ProcessDetails().parse(lfield(1, "exec-1")).exec_id == "exec-1"


@pytest.mark.parametrize(
    "message",
    [
        Plugin(
            type="t",
            id="i",
            requires=["a", "b"],
            platforms=[types.Platform(os="linux", architecture="amd64")],
            exports={"x": "y"},
            capabilities=["c"],
            init_err=Status(code=2, message="boom"),
        ),
        types.Envelope(
            timestamp=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
            namespace="ns",
            topic="/containers/create",
            event=wkt.Any(
                type_url="containerd.events.ContainerCreate", value=bytes(ev.ContainerCreate(id="c"))
            ),
        ),
        Lease(id="l", created_at=datetime(2024, 1, 2, tzinfo=UTC), labels={"a": "b"}),
        types.ActivationInfo(
            name="m",
            active=[types.ActiveMount(mount=types.Mount(type="bind"), mount_point="/mnt", data={"k": "v"})],
            system=[types.Mount(source="/dev/sda1")],
        ),
        ev.TaskExecStarted(container_id="c", exec_id="e", pid=2**32 - 1),
        content.WriteContentResponse(
            action=content.WriteAction.COMMIT,
            started_at=datetime(2024, 1, 2, tzinfo=UTC),
            updated_at=datetime(2024, 1, 2, 0, 0, 1, tzinfo=UTC),
            offset=2**40,
            total=2**40,
            digest="sha256:ff",
        ),
        snapshots.ListSnapshotsResponse(
            info=[
                snapshots.Info(name="a", kind=snapshots.Kind.ACTIVE),
                snapshots.Info(name="b", labels={"x": "y"}),
            ]
        ),
        images.UpdateImageRequest(
            image=images.Image(name="n", target=types.Descriptor(digest="d", size=1, annotations={"a": "b"})),
            update_mask=wkt.FieldMask(paths=["labels", "target"]),
        ),
        containers.UpdateContainerRequest(
            container=containers.Container(id="c", extensions={"a": wkt.Any(type_url="t", value=b"v")}),
            update_mask=wkt.FieldMask(paths=["extensions.a"]),
        ),
        tasks.ListTasksResponse(
            tasks=[task_types.Process(container_id="c", status=task_types.Status.PAUSING)]
        ),
        shim.PidsResponse(processes=[task_types.ProcessInfo(pid=1), task_types.ProcessInfo(pid=2)]),
        shim.UpdateTaskRequest(id="c", resources=wkt.Any(type_url="r"), annotations={"a": "b"}),
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip(message: betterproto.Message) -> None:
    assert type(message)().parse(bytes(message)) == message


# -- generate.py ----------------------------------------------------------------------------


# The generate.py tests work on a few sources with no containerd imports, so that their
# generated modules are byte-identical to the real tree's and each generation stays quick.
SMALL_TREE = (
    "containerd/services/leases/v1/leases.proto",
    "containerd/services/version/v1/version.proto",
    "containerd/runc/v1/oci.proto",
    "containerd/types/platform.proto",
    "google/rpc/status.proto",
)


@pytest.fixture(scope="module")
def small_tree_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "protos"
    for rel in SMALL_TREE:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROTOS / rel, root / rel)
    generate.write(root)
    return root


def _copy_tree(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "protos"
    shutil.copytree(template, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_check_passes_on_the_tree() -> None:
    """Fails when someone edits a .proto without regenerating (or edits generated code)."""
    proc = subprocess.run(
        [sys.executable, "protos/generate.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_flags_an_edited_proto_and_generate_repairs_it(
    small_tree_template: Path, tmp_path: Path
) -> None:
    root = _copy_tree(small_tree_template, tmp_path)
    proto = root / "containerd/services/leases/v1/leases.proto"
    proto.write_text(
        proto.read_text().replace(
            "map<string, string> labels = 3;\n}", "map<string, string> labels = 3;\n  string note = 4;\n}", 1
        )
    )

    assert generate.main(["--check", "--root", str(root)]) == 1
    drift = generate.check(root)
    assert drift.stale == ["containerd/services/leases/v1/__init__.py"]
    assert (drift.missing, drift.extra) == ([], [])
    assert generate.main(["--root", str(root)]) == 0
    assert (
        "note: str = betterproto.string_field(4)"
        in (root / "containerd/services/leases/v1/__init__.py").read_text()
    )
    assert not generate.check(root)
    # The real tree is untouched.
    assert "note" not in (PROTOS / "containerd/services/leases/v1/leases.proto").read_text()


def test_generate_restores_missing_and_removes_orphaned_modules(
    small_tree_template: Path, tmp_path: Path
) -> None:
    root = _copy_tree(small_tree_template, tmp_path)
    (root / "containerd/services/version/v1/__init__.py").unlink()
    (root / "containerd/runc/v1/oci.proto").unlink()
    handwritten = root / "containerd/runc/notes.py"
    handwritten.write_text("NOTE = 1\n")

    drift = generate.check(root)
    assert drift.missing == ["containerd/services/version/v1/__init__.py"]
    assert drift.extra == [
        "containerd/runc/__init__.py",
        "containerd/runc/v1/__init__.py",
    ]
    # The type-URL table loses the runc messages.
    assert drift.stale == ["typeurls/__init__.py"]

    generate.write(root)
    assert b"containerd.runc.v1" not in (root / "typeurls/__init__.py").read_bytes()
    assert (root / "containerd/services/version/v1/__init__.py").read_bytes() == (
        PROTOS / "containerd/services/version/v1/__init__.py"
    ).read_bytes()
    assert not (root / "containerd/runc/v1").exists()
    assert handwritten.read_text() == "NOTE = 1\n"
    assert (root / "__init__.py").exists()


def test_generate_reports_protoc_errors(
    small_tree_template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_tree(small_tree_template, tmp_path)
    (root / "containerd/types/platform.proto").write_text(
        'syntax = "proto3";\npackage containerd.types;\nmessage {\n'
    )
    before = (root / "containerd/types/__init__.py").read_bytes()
    assert generate.main(["--root", str(root)]) == 2
    assert "platform.proto" in capsys.readouterr().err
    assert (root / "containerd/types/__init__.py").read_bytes() == before
