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
from protos.containerd.services.events.v1 import EventsBase, EventsStub, ForwardRequest, SubscribeRequest
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
from protos.containerd.services.version.v1 import VersionBase, VersionResponse, VersionStub
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
    assert seen == 5


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
    ],
    ids=lambda m: type(m).__name__,
)
def test_round_trip(message: betterproto.Message) -> None:
    assert type(message)().parse(bytes(message)) == message


# -- generate.py ----------------------------------------------------------------------------


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "protos"
    shutil.copytree(PROTOS, root, ignore=shutil.ignore_patterns("__pycache__"))
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


def test_check_flags_an_edited_proto_and_generate_repairs_it(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
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


def test_generate_restores_missing_and_removes_orphaned_modules(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    (root / "containerd/services/version/v1/__init__.py").unlink()
    (root / "containerd/services/images/v1/image.proto").unlink()
    handwritten = root / "containerd/services/images/notes.py"
    handwritten.write_text("NOTE = 1\n")

    drift = generate.check(root)
    assert drift.missing == ["containerd/services/version/v1/__init__.py"]
    assert drift.extra == [
        "containerd/services/images/__init__.py",
        "containerd/services/images/v1/__init__.py",
    ]
    # The type-URL table loses the image messages.
    assert drift.stale == ["typeurls/__init__.py"]

    generate.write(root)
    assert b"ImageCreate" not in (root / "typeurls/__init__.py").read_bytes()
    assert (root / "containerd/services/version/v1/__init__.py").read_bytes() == (
        PROTOS / "containerd/services/version/v1/__init__.py"
    ).read_bytes()
    assert not (root / "containerd/services/images/v1").exists()
    assert handwritten.read_text() == "NOTE = 1\n"
    assert (root / "__init__.py").exists()


def test_generate_reports_protoc_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_tree(tmp_path)
    (root / "containerd/types/platform.proto").write_text(
        'syntax = "proto3";\npackage containerd.types;\nmessage {\n'
    )
    before = (root / "containerd/types/__init__.py").read_bytes()
    assert generate.main(["--root", str(root)]) == 2
    assert "platform.proto" in capsys.readouterr().err
    assert (root / "containerd/types/__init__.py").read_bytes() == before
