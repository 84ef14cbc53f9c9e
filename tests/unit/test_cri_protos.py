"""The CRI runtime.v1 protos (protos/runtime/v1/api.proto) and their betterproto module.

kubelet, crictl and the conformance suite only ever see bytes, so the checks that matter
are against bytes built by hand from upstream k8s.io/cri-api's field numbers and types:
a renumbered or retyped field still round-trips with itself and would pass a pure
round-trip test. Where the machine has Debian's containerd, the runtime.v1 descriptor
compiled into it (an older cri-api) is an independent copy of upstream to compare with.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import betterproto
import grpclib.const
import pytest
from google.protobuf import (  # type: ignore[import-untyped]
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
)
from grpclib.client import Channel
from grpclib.server import Server

from protos.runtime import v1 as cri

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
SOURCE = "runtime/v1/api.proto"
CONTAINERD = Path("/usr/bin/containerd")

# Every RPC of Kubernetes 1.36's cri-api, written out rather than read from the .proto.
RUNTIME_RPCS = {
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "StreamPodSandboxes",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "StreamContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "StreamContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "StreamPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "StreamPodSandboxMetrics",
    "RuntimeConfig",
    "UpdatePodSandboxResources",
}
RUNTIME_SERVER_STREAMS = {
    "StreamPodSandboxes",
    "StreamContainers",
    "StreamContainerStats",
    "StreamPodSandboxStats",
    "StreamPodSandboxMetrics",
    "GetContainerEvents",
}
IMAGE_RPCS = {"ListImages", "StreamImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"}
IMAGE_SERVER_STREAMS = {"StreamImages"}


# -- hand-made wire bytes ------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 go on the wire as 10-byte two's complement
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def vfield(number: int, value: int) -> bytes:
    return tag(number, 0) + varint(value)


def lfield(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return tag(number, 2) + varint(len(data)) + data


def entry(number: int, key: str, value: str) -> bytes:
    """One map<string, string> entry: a nested message with key = 1, value = 2."""
    return lfield(number, lfield(1, key) + lfield(2, value))


def test_helpers_match_known_encodings() -> None:
    assert varint(300) == b"\xac\x02"
    assert varint(-1) == b"\xff" * 9 + b"\x01"
    assert tag(17, 2) == b"\x8a\x01"


# -- the module and its services -----------------------------------------------------------


def _methods(base: type[Any], service: str) -> dict[str, grpclib.const.Cardinality]:
    prefix = f"/runtime.v1.{service}/"
    mapping = base().__mapping__()
    assert all(path.startswith(prefix) for path in mapping), sorted(mapping)
    return {path.removeprefix(prefix): handler.cardinality for path, handler in mapping.items()}


@pytest.mark.parametrize(
    ("base", "service", "rpcs", "streams"),
    [
        (cri.RuntimeServiceBase, "RuntimeService", RUNTIME_RPCS, RUNTIME_SERVER_STREAMS),
        (cri.ImageServiceBase, "ImageService", IMAGE_RPCS, IMAGE_SERVER_STREAMS),
    ],
)
def test_services_have_exactly_the_cri_rpcs(
    base: type[Any], service: str, rpcs: set[str], streams: set[str]
) -> None:
    methods = _methods(base, service)
    assert set(methods) == rpcs
    assert {m for m, c in methods.items() if c is grpclib.const.Cardinality.UNARY_STREAM} == streams
    assert {m for m, c in methods.items() if c is grpclib.const.Cardinality.UNARY_UNARY} == rpcs - streams


def test_stub_has_a_method_per_rpc() -> None:
    for stub, rpcs in ((cri.RuntimeServiceStub, RUNTIME_RPCS), (cri.ImageServiceStub, IMAGE_RPCS)):
        for rpc in rpcs:
            assert callable(getattr(stub, betterproto.casing.snake_case(rpc))), rpc


class _Runtime(cri.RuntimeServiceBase):  # type: ignore[misc]
    """Answers Version and streams ListContainers' answer in chunks of two."""

    async def version(self, version_request: cri.VersionRequest) -> cri.VersionResponse:
        return cri.VersionResponse(
            version=version_request.version, runtime_name="berth", runtime_api_version="v1"
        )

    async def stream_containers(
        self, stream_containers_request: cri.StreamContainersRequest
    ) -> AsyncIterator[cri.StreamContainersResponse]:
        ids = [f"c{i}" for i in range(5)]
        wanted = stream_containers_request.filter.pod_sandbox_id
        for i in range(0, len(ids), 2):
            yield cri.StreamContainersResponse(
                containers=[cri.Container(id=c, pod_sandbox_id=wanted) for c in ids[i : i + 2]]
            )


async def test_grpclib_serves_unary_and_server_stream_rpcs(tmp_path: Path) -> None:
    server = Server([_Runtime()])
    path = str(tmp_path / "cri.sock")
    await server.start(path=path)
    channel = Channel(path=path)
    try:
        stub = cri.RuntimeServiceStub(channel)
        reply = await stub.version(cri.VersionRequest(version="v1"), timeout=5)
        chunks = [
            [c.id for c in r.containers]
            async for r in stub.stream_containers(
                cri.StreamContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id="p1")), timeout=5
            )
        ]
        with pytest.raises(grpclib.GRPCError) as err:
            await stub.checkpoint_container(cri.CheckpointContainerRequest(container_id="x"), timeout=5)
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
    assert (reply.version, reply.runtime_name, reply.runtime_api_version) == ("v1", "berth", "v1")
    assert chunks == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert err.value.status is grpclib.const.Status.UNIMPLEMENTED


# -- round trips ---------------------------------------------------------------------------


def pod_config() -> Any:
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", uid="u-1", namespace="default", attempt=3),
        hostname="web-0",
        log_directory="/var/log/pods/default_web_u-1",
        dns_config=cri.DnsConfig(servers=["10.0.0.10"], searches=["svc.cluster.local"], options=["ndots:5"]),
        port_mappings=[
            cri.PortMapping(protocol=cri.Protocol.UDP, container_port=53, host_port=5353, host_ip="127.0.0.1")
        ],
        labels={"app": "web", "io.kubernetes.pod.name": "web"},
        annotations={"note": "ünïcode ✓"},
        linux=cri.LinuxPodSandboxConfig(
            cgroup_parent="/kubepods/besteffort/podu-1",
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=cri.NamespaceOption(
                    network=cri.NamespaceMode.POD,
                    pid=cri.NamespaceMode.CONTAINER,
                    ipc=cri.NamespaceMode.NODE,
                    userns_options=cri.UserNamespace(
                        mode=cri.NamespaceMode.POD,
                        uids=[cri.IdMapping(host_id=100000, container_id=0, length=65536)],
                        gids=[cri.IdMapping(host_id=100000, container_id=0, length=65536)],
                    ),
                ),
                run_as_user=cri.Int64Value(value=0),
                run_as_group=cri.Int64Value(value=1000),
                supplemental_groups=[0, 1000, 2**40],
                supplemental_groups_policy=cri.SupplementalGroupsPolicy.Strict,
                seccomp=cri.SecurityProfile(
                    profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref="/p.json"
                ),
            ),
            sysctls={"net.ipv4.ip_unprivileged_port_start": "0"},
            overhead=cri.LinuxContainerResources(cpu_shares=2),
            resources=cri.LinuxContainerResources(
                cpu_period=100000,
                cpu_quota=-1,
                memory_limit_in_bytes=64 << 20,
                hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=1 << 30)],
                unified={"memory.high": "60000000"},
            ),
        ),
    )


def container_config() -> Any:
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name="app", attempt=2),
        image=cri.ImageSpec(
            image="sha256:" + "ab" * 32,
            annotations={"a": "b"},
            user_specified_image="docker.io/library/busybox:1.36",
            runtime_handler="runc",
        ),
        command=["/bin/sh", "-c"],
        args=["echo hi"],
        working_dir="/srv",
        envs=[cri.KeyValue(key="PATH", value="/bin"), cri.KeyValue(key="EMPTY", value="")],
        mounts=[
            cri.Mount(
                container_path="/data",
                host_path="/var/lib/data",
                readonly=True,
                propagation=cri.MountPropagation.PROPAGATION_BIDIRECTIONAL,
                uid_mappings=[cri.IdMapping(host_id=1, container_id=2, length=3)],
                recursive_read_only=True,
            ),
            cri.Mount(
                container_path="/img", image=cri.ImageSpec(image="sha256:" + "cd" * 32), image_sub_path="etc"
            ),
        ],
        devices=[cri.Device(container_path="/dev/fuse", host_path="/dev/fuse", permissions="rwm")],
        labels={"io.kubernetes.container.name": "app"},
        annotations={"io.kubernetes.container.restartCount": "2"},
        log_path="app/2.log",
        stdin=True,
        tty=True,
        linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(oom_score_adj=1000, cpuset_cpus="0-1"),
            security_context=cri.LinuxContainerSecurityContext(
                capabilities=cri.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["ALL"]),
                run_as_group=cri.Int64Value(value=0),
                run_as_username="nobody",
                readonly_rootfs=True,
                supplemental_groups_policy=cri.SupplementalGroupsPolicy.Strict,
                no_new_privs=True,
                masked_paths=["/proc/kcore"],
                readonly_paths=["/proc/sys"],
                seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.RuntimeDefault),
            ),
        ),
        cdi_devices=[cri.CdiDevice(name="vendor.com/gpu=0")],
        stop_signal=cri.Signal.SIGTERM,
    )


@pytest.fixture(scope="module")
def upb(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pool.DescriptorPool:
    """Google's own protobuf runtime, loaded with our .proto: an encoder betterproto did not write."""
    out = tmp_path_factory.mktemp("cri") / "set.pb"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTOS}",
            f"--descriptor_set_out={out}",
            str(PROTOS / SOURCE),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"protoc warnings: {proc.stderr}"
    pool = descriptor_pool.DescriptorPool()
    for fd in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file:
        pool.Add(fd)
    return pool


def test_proto_follows_the_house_layout(upb: descriptor_pool.DescriptorPool) -> None:
    fd = descriptor_pb2.FileDescriptorProto()
    upb.FindFileByName(SOURCE).CopyToProto(fd)
    assert (fd.package, fd.syntax) == ("runtime.v1", "proto3")
    assert not fd.dependency, "no imports: gogoproto and friends are dropped"
    assert not fd.options.HasField("go_package")
    assert {s.name for s in fd.service} == {"RuntimeService", "ImageService"}


def _upb_dict(pool: descriptor_pool.DescriptorPool, name: str, data: bytes) -> dict[str, Any]:
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"runtime.v1.{name}"))
    msg = cls.FromString(data)
    result: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return result


@pytest.mark.parametrize("build", [pod_config, container_config])
def test_round_trip(build: Any, upb: descriptor_pool.DescriptorPool) -> None:
    original = build()
    data = bytes(original)
    decoded = type(original)().parse(data)
    assert decoded == original
    assert bytes(decoded) == data
    # Google's decoder reads the same bytes back, and what it writes betterproto reads as the same message.
    cls = message_factory.GetMessageClass(upb.FindMessageTypeByName(f"runtime.v1.{type(original).__name__}"))
    assert type(original)().parse(cls.FromString(data).SerializeToString()) == original


def test_pod_config_as_google_protobuf_reads_it(upb: descriptor_pool.DescriptorPool) -> None:
    d = _upb_dict(upb, "PodSandboxConfig", bytes(pod_config()))
    assert d["metadata"] == {"name": "web", "uid": "u-1", "namespace": "default", "attempt": 3}
    assert d["port_mappings"] == [
        {"protocol": "UDP", "container_port": 53, "host_port": 5353, "host_ip": "127.0.0.1"}
    ]
    assert d["labels"] == {"app": "web", "io.kubernetes.pod.name": "web"}
    assert d["annotations"] == {"note": "ünïcode ✓"}
    sc = d["linux"]["security_context"]
    assert sc["namespace_options"]["pid"] == "CONTAINER"
    assert sc["namespace_options"]["ipc"] == "NODE"
    assert sc["namespace_options"]["userns_options"]["uids"] == [{"host_id": 100000, "length": 65536}]
    assert sc["run_as_user"] == {}  # present with value 0: "run as root", not "unset"
    assert sc["run_as_group"] == {"value": "1000"}
    assert sc["supplemental_groups"] == ["0", "1000", str(2**40)]
    assert sc["supplemental_groups_policy"] == "Strict"
    assert sc["seccomp"] == {"profile_type": "Localhost", "localhost_ref": "/p.json"}
    assert d["linux"]["resources"]["cpu_quota"] == "-1"
    assert d["linux"]["resources"]["unified"] == {"memory.high": "60000000"}


def test_container_config_as_google_protobuf_reads_it(upb: descriptor_pool.DescriptorPool) -> None:
    d = _upb_dict(upb, "ContainerConfig", bytes(container_config()))
    assert d["image"]["user_specified_image"] == "docker.io/library/busybox:1.36"
    assert d["envs"][1] == {"key": "EMPTY"}
    assert d["mounts"][0]["propagation"] == "PROPAGATION_BIDIRECTIONAL"
    assert d["mounts"][0]["uidMappings"] == [{"host_id": 1, "container_id": 2, "length": 3}]
    assert d["mounts"][0]["recursive_read_only"] is True
    assert d["mounts"][1]["image_sub_path"] == "etc"
    assert d["CDI_devices"] == [{"name": "vendor.com/gpu=0"}]
    assert d["stop_signal"] == "SIGTERM"
    sc = d["linux"]["security_context"]
    assert sc["seccomp"] == {}  # RuntimeDefault is enum 0: present, but empty
    assert sc["run_as_group"] == {}
    assert sc["supplemental_groups_policy"] == "Strict"


# -- wire bytes against upstream's numbers -------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # ContainerConfig.log_path = 11 (string): tag (11 << 3) | 2 = 0x5a.
        (cri.ContainerConfig(log_path="c/0.log"), b"\x5a\x07c/0.log"),
        # PodSandboxConfig.linux = 8 (message) -> 0x42; LinuxPodSandboxConfig.cgroup_parent = 1.
        (
            cri.PodSandboxConfig(linux=cri.LinuxPodSandboxConfig(cgroup_parent="/kubepods")),
            b"\x42\x0b\x0a\x09/kubepods",
        ),
        # ContainerStatus.exit_code = 7 (int32): tag 0x38, 137 = 0x89 0x01, negatives take 10 bytes.
        (cri.ContainerStatus(exit_code=137), b"\x38\x89\x01"),
        (cri.ContainerStatus(exit_code=-1), b"\x38" + b"\xff" * 9 + b"\x01"),
        # ContainerStatus.stop_signal = 19 (enum) -> 0x98 0x01; SIGKILL = 13.
        (cri.ContainerStatus(stop_signal=cri.Signal.SIGKILL), b"\x98\x01\x0d"),
        # ContainerConfig.stop_signal = 18 -> 0x90 0x01; SIGTERM = 23. CDI_devices = 17 -> 0x8a 0x01.
        (cri.ContainerConfig(stop_signal=cri.Signal.SIGTERM), b"\x90\x01\x17"),
        (cri.ContainerConfig(cdi_devices=[cri.CdiDevice(name="v/g=0")]), b"\x8a\x01\x07\x0a\x05v/g=0"),
        # ImageSpec: image = 1, then 18, 19, 20 (two-byte tags).
        (
            cri.ImageSpec(image="i", user_specified_image="u", runtime_handler="r", image_ref="d"),
            b"\x0a\x01i\x92\x01\x01u\x9a\x01\x01r\xa2\x01\x01d",
        ),
        # Map entries are messages {key = 1, value = 2}; PodSandboxConfig.labels = 6.
        (cri.PodSandboxConfig(labels={"k": "v"}), b"\x32\x06\x0a\x01k\x12\x01v"),
        # Repeated int64 is packed in proto3: LinuxSandboxSecurityContext.supplemental_groups = 5.
        (cri.LinuxSandboxSecurityContext(supplemental_groups=[1, 1000]), b"\x2a\x03\x01\xe8\x07"),
        # Namespace.options = 2 (field 1 is unused upstream); NamespaceOption.pid = 2, CONTAINER = 1.
        (
            cri.Namespace(options=cri.NamespaceOption(pid=cri.NamespaceMode.CONTAINER)),
            b"\x12\x02\x10\x01",
        ),
        # ContainerEventResponse.pod_sandbox_status = 4, containers_statuses = 5.
        (
            cri.ContainerEventResponse(
                pod_sandbox_status=cri.PodSandboxStatus(id="p"),
                containers_statuses=[cri.ContainerStatus(id="c")],
            ),
            b"\x22\x03\x0a\x01p\x2a\x03\x0a\x01c",
        ),
        # ImageFsInfoResponse.container_filesystems = 2; FilesystemUsage.timestamp = 1.
        (
            cri.ImageFsInfoResponse(container_filesystems=[cri.FilesystemUsage(timestamp=5)]),
            b"\x12\x02\x08\x05",
        ),
        # PsiData.Avg10 = 2 is a double: wire type 1, eight little-endian bytes.
        (cri.PsiData(avg10=1.5), b"\x11" + struct.pack("<d", 1.5)),
        # UpdatePodSandboxResourcesRequest.resources = 3; LinuxContainerResources.cpu_quota = 2.
        (
            cri.UpdatePodSandboxResourcesRequest(
                pod_sandbox_id="p", resources=cri.LinuxContainerResources(cpu_quota=5)
            ),
            b"\x0a\x01p\x1a\x02\x10\x05",
        ),
        # ExecRequest.audit_request_id = 7; AttachRequest.audit_request_id = 6.
        (cri.ExecRequest(audit_request_id="a"), b"\x3a\x01a"),
        (cri.AttachRequest(audit_request_id="a"), b"\x32\x01a"),
        # ListContainersResponse.containers = 1; Container.image_id = 10, state = 6 (EXITED = 2).
        (
            cri.ListContainersResponse(
                containers=[cri.Container(state=cri.ContainerState.CONTAINER_EXITED, image_id="x")]
            ),
            b"\x0a\x05\x30\x02\x52\x01x",
        ),
        # RuntimeConfigResponse.linux = 1; LinuxRuntimeConfiguration.cgroup_driver = 1, CGROUPFS = 1.
        (
            cri.RuntimeConfigResponse(
                linux=cri.LinuxRuntimeConfiguration(cgroup_driver=cri.CgroupDriver.CGROUPFS)
            ),
            b"\x0a\x02\x08\x01",
        ),
    ],
)
def test_encodes_upstream_bytes(message: betterproto.Message, expected: bytes) -> None:
    assert bytes(message) == expected
    assert type(message)().parse(expected) == message


def test_decodes_a_security_context_in_upstream_field_order() -> None:
    """Go writes fields in number order, which is not our declaration order (run_as_group = 12)."""
    data = (
        lfield(1, lfield(1, "NET_RAW") + lfield(2, "ALL") + lfield(3, "CHOWN"))
        + vfield(2, 1)  # privileged
        + lfield(5, vfield(1, 0))  # run_as_user: root, present
        + lfield(6, "nobody")
        + vfield(7, 1)  # readonly_rootfs
        + lfield(8, varint(5) + varint(6))  # supplemental_groups, packed
        + lfield(9, "deprecated-apparmor")
        + lfield(10, "deprecated-seccomp")
        + vfield(11, 1)  # no_new_privs
        + lfield(12, vfield(1, 7))  # run_as_group
        + lfield(13, "/proc/kcore")
        + lfield(14, "/proc/sys")
        + lfield(15, vfield(1, 2) + lfield(2, "/s.json"))
        + lfield(16, vfield(1, 1))
        + vfield(17, 1)  # supplemental_groups_policy: Strict
    )
    sc = cri.LinuxContainerSecurityContext().parse(data)
    assert sc.capabilities == cri.Capability(
        add_capabilities=["NET_RAW"], drop_capabilities=["ALL"], add_ambient_capabilities=["CHOWN"]
    )
    assert sc.privileged and sc.readonly_rootfs and sc.no_new_privs
    assert betterproto.serialized_on_wire(sc.run_as_user) and sc.run_as_user.value == 0
    assert sc.run_as_group.value == 7
    assert sc.run_as_username == "nobody"
    assert sc.supplemental_groups == [5, 6]
    assert (sc.apparmor_profile, sc.seccomp_profile_path) == ("deprecated-apparmor", "deprecated-seccomp")
    assert (sc.masked_paths, sc.readonly_paths) == (["/proc/kcore"], ["/proc/sys"])
    assert sc.seccomp.profile_type is cri.SecurityProfileProfileType.Localhost
    assert sc.seccomp.localhost_ref == "/s.json"
    assert sc.apparmor.profile_type is cri.SecurityProfileProfileType.Unconfined
    assert sc.supplemental_groups_policy is cri.SupplementalGroupsPolicy.Strict


def test_decodes_a_mount_with_image_volume_and_idmaps() -> None:
    data = (
        lfield(1, "/c")
        + vfield(3, 1)
        + vfield(5, 1)  # PROPAGATION_HOST_TO_CONTAINER
        + lfield(6, vfield(1, 1000) + vfield(2, 0) + vfield(3, 1))
        + lfield(7, vfield(1, 2000) + vfield(3, 1))
        + vfield(8, 1)
        + lfield(9, lfield(1, "sha256:ab"))
        + lfield(10, "sub")
    )
    m = cri.Mount().parse(data)
    assert (m.container_path, m.readonly, m.recursive_read_only) == ("/c", True, True)
    assert m.propagation is cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER
    assert m.uid_mappings == [cri.IdMapping(host_id=1000, container_id=0, length=1)]
    assert m.gid_mappings == [cri.IdMapping(host_id=2000, length=1)]
    assert (m.image.image, m.image_sub_path) == ("sha256:ab", "sub")


def test_decodes_auth_config_and_pull_request() -> None:
    auth = (
        lfield(1, "u")
        + lfield(2, "p")
        + lfield(3, "dTpw")
        + lfield(4, "r.io")
        + lfield(5, "id")
        + lfield(6, "rt")
    )
    req = cri.PullImageRequest().parse(
        lfield(1, lfield(1, "busybox")) + lfield(2, auth) + lfield(3, lfield(2, "h"))
    )
    assert req.image.image == "busybox"
    assert req.auth == cri.AuthConfig(
        username="u",
        password="p",
        auth="dTpw",
        server_address="r.io",
        identity_token="id",
        registry_token="rt",
    )
    assert req.sandbox_config.hostname == "h"


def test_filter_presence_is_visible_even_for_enum_zero() -> None:
    """A state filter of CONTAINER_CREATED (0) is an empty wrapper on the wire, not an absent one.

    Servers must test presence with betterproto.serialized_on_wire, not truthiness.
    """
    created = cri.ContainerFilter().parse(lfield(2, b""))
    assert betterproto.serialized_on_wire(created.state)
    assert created.state.state is cri.ContainerState.CONTAINER_CREATED
    assert not betterproto.serialized_on_wire(cri.ContainerFilter().parse(b"").state)
    ready = cri.PodSandboxFilter().parse(lfield(2, b""))
    assert betterproto.serialized_on_wire(ready.state)
    assert ready.state.state is cri.PodSandboxState.SANDBOX_READY
    # And the other way round: a filter we build for CREATED goes out as the empty wrapper.
    out = cri.ContainerFilter(state=cri.ContainerStateValue(state=cri.ContainerState.CONTAINER_CREATED))
    assert bytes(out) == b"\x12\x00"


def test_signal_enum_is_upstreams_dense_index() -> None:
    names = [s.name for s in sorted(cri.Signal, key=lambda s: s.value)]
    assert [s.value for s in sorted(cri.Signal, key=lambda s: s.value)] == list(range(66))
    assert names[:2] == ["RUNTIME_DEFAULT", "SIGABRT"]
    assert names[cri.Signal.SIGTERM.value] == "SIGTERM" and cri.Signal.SIGTERM.value == 23
    assert names[35:37] == ["SIGRTMIN", "SIGRTMINPLUS1"]
    assert names[50:52] == ["SIGRTMINPLUS15", "SIGRTMAXMINUS14"]
    assert names[-2:] == ["SIGRTMAXMINUS1", "SIGRTMAX"]


# -- against the runtime.v1 descriptor compiled into Debian's containerd --------------------

# Upstream renamed and retyped ContainerEventResponse field 4 after the cri-api that
# containerd 1.6 vendors (PodSandboxMetadata pod_sandbox_metadata -> PodSandboxStatus pod_sandbox_status).
KNOWN_UPSTREAM_CHANGES = {("ContainerEventResponse", "pod_sandbox_metadata")}


def _containerd_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """Go's gogo-generated code keeps each file descriptor gzipped in the binary."""
    if not CONTAINERD.is_file():
        pytest.skip(f"{CONTAINERD} is not installed")
    data = CONTAINERD.read_bytes()
    start = 0
    while (start := data.find(b"\x1f\x8b\x08", start)) >= 0:
        try:
            raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start : start + 1_000_000])
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        except Exception:  # noqa: BLE001 - most gzip magics in a binary are not descriptors
            fd = None
        if fd is not None and fd.package == "runtime.v1" and fd.service:
            return fd
        start += 3
    pytest.skip(f"no runtime.v1 descriptor in {CONTAINERD}")


def _fields(fd: descriptor_pb2.FileDescriptorProto) -> dict[tuple[str, str], tuple[int, int, int, str]]:
    out: dict[tuple[str, str], tuple[int, int, int, str]] = {}

    def walk(prefix: str, messages: Any) -> None:
        for m in messages:
            for f in m.field:
                out[(prefix + m.name, f.name)] = (f.number, f.type, f.label, f.type_name)
            walk(f"{prefix}{m.name}.", m.nested_type)

    walk("", fd.message_type)
    return out


def _enums(fd: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, int]]:
    out = {e.name: {v.name: v.number for v in e.value} for e in fd.enum_type}
    for m in fd.message_type:
        out.update({f"{m.name}.{e.name}": {v.name: v.number for v in e.value} for e in m.enum_type})
    return out


def test_every_field_containerd_knows_is_ours_too(upb: descriptor_pool.DescriptorPool) -> None:
    theirs = _containerd_descriptor()
    ours = descriptor_pb2.FileDescriptorProto()
    upb.FindFileByName(SOURCE).CopyToProto(ours)
    our_fields, their_fields = _fields(ours), _fields(theirs)
    differ = {
        key: (value, our_fields.get(key))
        for key, value in their_fields.items()
        if our_fields.get(key) != value and key not in KNOWN_UPSTREAM_CHANGES
    }
    assert not differ
    assert len(their_fields) > 400  # the comparison covered the bulk of the API
    assert our_fields[("ContainerEventResponse", "pod_sandbox_status")] == (
        4,
        descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
        descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        ".runtime.v1.PodSandboxStatus",
    )
    our_enums = _enums(ours)
    for name, values in _enums(theirs).items():
        assert values.items() <= our_enums[name].items(), name
    for their_service in theirs.service:
        (our_service,) = (s for s in ours.service if s.name == their_service.name)
        our_methods = {m.name: m for m in our_service.method}
        for m in their_service.method:
            mine = our_methods[m.name]
            assert (mine.input_type, mine.output_type, mine.server_streaming, mine.client_streaming) == (
                m.input_type,
                m.output_type,
                m.server_streaming,
                m.client_streaming,
            ), m.name
