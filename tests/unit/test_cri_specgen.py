"""CRI ContainerConfig -> OCI spec (plugins.cri.container.specgen), against a tiny rootfs in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import InvalidArgument, NotFound, Unimplemented
from daemon.oci.spec import DEFAULT_MASKED_PATHS, current_oom_score_adj
from plugins.cri.container import specgen
from plugins.cri.container.create import resolve_log_path
from plugins.cri.container.signals import image_stop_signal, signal_number
from protos.runtime import v1 as cri

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nvideo:x:44:app\naudio:x:29:app,root\n"
IMAGE = {"config": {"Env": ["PATH=/usr/bin:/bin", "FOO=image"], "Entrypoint": ["/ep"], "Cmd": ["c1", "c2"]}}
SID = "s" * 64
CID = "c" * 64


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    return root


@pytest.fixture
def pod_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pod"
    (d / "shm").mkdir(parents=True)
    for name in ("hosts", "resolv.conf", "hostname"):
        (d / name).write_text(name + "\n")
    return d


def pod(pod_dir: Path, **linux: Any) -> specgen.PodInfo:
    config = cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name="web", namespace="default", uid="u1"),
        hostname="web-0",
        linux=cri.LinuxPodSandboxConfig(sysctls={"net.ipv4.ip_forward": "1"}, **linux),
    )
    return specgen.PodInfo(
        id=SID,
        config=config,
        netns_path="/run/pod/net",
        ipc_path="/run/pod/ipc",
        uts_path="/run/pod/uts",
        root_dir=str(pod_dir),
        cgroup_parent="/kubepods/pod1",
    )


def container(**kw: Any) -> cri.ContainerConfig:
    kw.setdefault("metadata", cri.ContainerMetadata(name="app"))
    kw.setdefault("image", cri.ImageSpec(image="docker.io/library/bb:1"))
    return cri.ContainerConfig(**kw)


def security(**kw: Any) -> cri.LinuxContainerConfig:
    return cri.LinuxContainerConfig(security_context=cri.LinuxContainerSecurityContext(**kw))


def make(rootfs: Path, podinfo: specgen.PodInfo, config: cri.ContainerConfig, **kw: Any) -> dict[str, Any]:
    inp = specgen.SpecInput(
        container_id=CID,
        config=config,
        pod=podinfo,
        image_name=config.image.image,
        image_config=kw.pop("image_config", IMAGE),
        rootfs=str(rootfs),
        **kw,
    )
    spec = specgen.container_spec(inp)
    json.dumps(spec)
    return spec


def ns_of(spec: dict[str, Any]) -> dict[str, str | None]:
    return {n["type"]: n.get("path") for n in spec["linux"]["namespaces"]}


def mount(spec: dict[str, Any], dest: str) -> dict[str, Any] | None:
    return next((m for m in spec["mounts"] if m["destination"] == dest), None)


def test_args_env_cwd_follow_kubelets_rules(rootfs: Path, pod_dir: Path) -> None:
    p = pod(pod_dir)
    spec = make(rootfs, p, container())
    assert spec["process"]["args"] == ["/ep", "c1", "c2"]
    assert make(rootfs, p, container(args=["a"]))["process"]["args"] == ["/ep", "a"]
    assert make(rootfs, p, container(command=["/bin/x"]))["process"]["args"] == ["/bin/x"]
    assert make(rootfs, p, container(command=["/bin/x"], args=["y"]))["process"]["args"] == ["/bin/x", "y"]
    with pytest.raises(InvalidArgument, match="no command specified"):
        make(rootfs, p, container(), image_config={"config": {}})
    env = make(rootfs, p, container(envs=[cri.KeyValue("FOO", "mine"), cri.KeyValue("BAR", "1")]))["process"][
        "env"
    ]
    assert env == ["PATH=/usr/bin:/bin", "FOO=mine", "HOSTNAME=web-0", "BAR=1"]
    assert spec["process"]["cwd"] == "/"
    assert make(rootfs, p, container(working_dir="/w"))["process"]["cwd"] == "/w"
    tty = make(rootfs, p, container(tty=True))["process"]
    assert tty["terminal"] is True and "TERM=xterm" in tty["env"]
    assert "rlimits" not in spec["process"]


def test_pod_namespaces_files_cgroup_and_annotations(rootfs: Path, pod_dir: Path) -> None:
    spec = make(rootfs, pod(pod_dir), container())
    assert ns_of(spec) == {
        "pid": None,
        "ipc": "/run/pod/ipc",
        "uts": "/run/pod/uts",
        "mount": None,
        "network": "/run/pod/net",
    }
    for dest, name in (
        ("/etc/hosts", "hosts"),
        ("/etc/resolv.conf", "resolv.conf"),
        ("/etc/hostname", "hostname"),
    ):
        m = mount(spec, dest)
        assert m is not None and m["source"] == str(pod_dir / name) and "rw" in m["options"]
    shm = mount(spec, "/dev/shm")
    assert shm is not None and shm["source"] == str(pod_dir / "shm") and shm["type"] == "bind"
    assert spec["linux"]["cgroupsPath"] == f"/kubepods/pod1/{CID}"
    assert spec["linux"]["sysctl"] == {"net.ipv4.ip_forward": "1"}
    ann = spec["annotations"]
    assert ann["io.kubernetes.cri.sandbox-id"] == SID
    assert ann["io.kubernetes.cri.container-type"] == "container"
    assert ann["io.kubernetes.cri.container-name"] == "app"
    assert ann["io.kubernetes.cri.sandbox-namespace"] == "default"
    assert ann["io.kubernetes.cri.image-name"] == "docker.io/library/bb:1"
    systemd = make(rootfs, pod(pod_dir), container(), cgroup_driver="systemd")
    assert systemd["linux"]["cgroupsPath"] == f"pod1:cri-berth:{CID}"


def test_host_namespaces_and_shared_pid(rootfs: Path, pod_dir: Path) -> None:
    nodes = cri.NamespaceOption(
        network=cri.NamespaceMode.NODE, ipc=cri.NamespaceMode.NODE, pid=cri.NamespaceMode.NODE
    )
    p = pod(pod_dir, security_context=cri.LinuxSandboxSecurityContext(namespace_options=nodes))
    spec = make(rootfs, p, container(linux=security(namespace_options=nodes)), host_hostname="node1")
    assert ns_of(spec) == {"mount": None}
    assert mount(spec, "/dev/shm") == {
        "destination": "/dev/shm",
        "type": "bind",
        "source": "/dev/shm",
        "options": ["rbind", "rprivate", "rw"],
    }
    pod_pid = container(linux=security(namespace_options=cri.NamespaceOption(pid=cri.NamespaceMode.POD)))
    assert ns_of(make(rootfs, pod(pod_dir), pod_pid))["pid"] is None  # no infra process: its own
    shared = specgen.PodInfo(**{**pod(pod_dir).__dict__, "infra_pid": 4242})
    assert ns_of(make(rootfs, shared, pod_pid))["pid"] == "/proc/4242/ns/pid"
    target = container(
        linux=security(namespace_options=cri.NamespaceOption(pid=cri.NamespaceMode.TARGET, target_id="x"))
    )
    assert ns_of(make(rootfs, pod(pod_dir), target, target_pid=77))["pid"] == "/proc/77/ns/pid"
    with pytest.raises(NotFound, match="target_id"):
        make(rootfs, pod(pod_dir), target)
    userns = container(
        linux=security(
            namespace_options=cri.NamespaceOption(
                userns_options=cri.UserNamespace(mode=cri.NamespaceMode.POD)
            )
        )
    )
    with pytest.raises(Unimplemented, match="userns_options"):
        make(rootfs, pod(pod_dir), userns)


def test_users_and_supplemental_groups(rootfs: Path, pod_dir: Path) -> None:
    p = pod(pod_dir)
    assert make(rootfs, p, container())["process"]["user"] == {"uid": 0, "gid": 0, "additionalGids": [0, 29]}
    by_uid = make(rootfs, p, container(linux=security(run_as_user=cri.Int64Value(1000))))
    assert by_uid["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 44, 29]}
    merged = make(
        rootfs,
        p,
        container(
            linux=security(run_as_username="app", run_as_group=cri.Int64Value(5), supplemental_groups=[7, 44])
        ),
    )
    assert merged["process"]["user"] == {"uid": 1000, "gid": 5, "additionalGids": [5, 44, 29, 7]}
    strict = make(
        rootfs,
        p,
        container(
            linux=security(
                run_as_user=cri.Int64Value(1000),
                supplemental_groups=[7],
                supplemental_groups_policy=cri.SupplementalGroupsPolicy.Strict,
            )
        ),
    )
    assert strict["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 7]}
    image_user = make(rootfs, p, container(), image_config={"config": {"User": "app", "Cmd": ["x"]}})
    assert image_user["process"]["user"]["uid"] == 1000
    with pytest.raises(InvalidArgument, match="run_as_group"):
        make(rootfs, p, container(linux=security(run_as_group=cri.Int64Value(5))))
    with pytest.raises(InvalidArgument, match="run_as_username"):
        make(rootfs, p, container(linux=security(run_as_username="ghost")))


def test_security_context(rootfs: Path, pod_dir: Path) -> None:
    p = pod(pod_dir)
    plain = make(rootfs, p, container())
    assert plain["process"]["noNewPrivileges"] is False
    assert "seccomp" not in plain["linux"]  # unset profile: unconfined, as containerd
    assert plain["linux"]["maskedPaths"] == list(DEFAULT_MASKED_PATHS)
    caps = make(
        rootfs,
        p,
        container(
            linux=security(
                capabilities=cri.Capability(add_capabilities=["NET_ADMIN"], drop_capabilities=["ALL"]),
                seccomp=cri.SecurityProfile(profile_type=cri.SecurityProfileProfileType.RuntimeDefault),
                no_new_privs=True,
                readonly_rootfs=True,
                masked_paths=["/proc/x"],
                readonly_paths=["/proc/y"],
            )
        ),
    )
    assert caps["process"]["capabilities"]["bounding"] == ["CAP_NET_ADMIN"]
    assert caps["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert caps["process"]["noNewPrivileges"] is True
    assert caps["root"]["readonly"] is True
    assert caps["linux"]["maskedPaths"] == ["/proc/x"] and caps["linux"]["readonlyPaths"] == ["/proc/y"]
    hosts = mount(caps, "/etc/hosts")
    assert hosts is not None and "ro" in hosts["options"]
    with pytest.raises(InvalidArgument, match="capabilities"):
        make(rootfs, p, container(linux=security(capabilities=cri.Capability(add_capabilities=["NOPE"]))))

    profile = pod_dir / "profile.json"
    profile.write_text(json.dumps({"defaultAction": "SCMP_ACT_LOG"}))
    local = cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref=str(profile)
    )
    assert make(rootfs, p, container(linux=security(seccomp=local)))["linux"]["seccomp"] == {
        "defaultAction": "SCMP_ACT_LOG"
    }
    missing = cri.SecurityProfile(
        profile_type=cri.SecurityProfileProfileType.Localhost, localhost_ref="/nope.json"
    )
    with pytest.raises(NotFound, match=r"nope\.json"):
        make(rootfs, p, container(linux=security(seccomp=missing)))

    with pytest.raises(InvalidArgument, match="privileged"):
        make(rootfs, p, container(linux=security(privileged=True)))
    priv_pod = pod(pod_dir, security_context=cri.LinuxSandboxSecurityContext(privileged=True))
    priv = make(rootfs, priv_pod, container(linux=security(privileged=True)))
    assert priv["linux"]["maskedPaths"] == [] and priv["linux"]["readonlyPaths"] == []
    assert "CAP_SYS_ADMIN" in priv["process"]["capabilities"]["bounding"]
    assert {"allow": True, "access": "rwm"} in priv["linux"]["resources"]["devices"]
    assert any(d["path"] == "/dev/null" for d in priv["linux"]["devices"])


def test_mounts_devices_and_resources(rootfs: Path, pod_dir: Path, tmp_path: Path) -> None:
    p = pod(pod_dir)
    mounts = [
        cri.Mount(container_path="/data", host_path=str(tmp_path), readonly=True),
        cri.Mount(
            container_path="/shared",
            host_path=str(tmp_path),
            propagation=cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
        ),
        cri.Mount(container_path="/etc/hosts", host_path=str(pod_dir / "hosts")),
    ]
    resources = cri.LinuxContainerResources(
        cpu_period=100000,
        cpu_quota=50000,
        cpu_shares=512,
        memory_limit_in_bytes=64 << 20,
        oom_score_adj=-999,
        cpuset_cpus="0",
        hugepage_limits=[cri.HugepageLimit(page_size="2MB", limit=0)],
        unified={"memory.high": "1"},
    )
    spec = make(
        rootfs,
        p,
        container(
            mounts=mounts,
            devices=[cri.Device(container_path="/dev/mynull", host_path="/dev/null", permissions="rw")],
            linux=cri.LinuxContainerConfig(resources=resources),
        ),
    )
    assert mount(spec, "/data") == {
        "destination": "/data",
        "type": "bind",
        "source": str(tmp_path),
        "options": ["rbind", "rprivate", "ro"],
    }
    shared = mount(spec, "/shared")
    assert shared is not None and "rslave" in shared["options"]
    assert spec["linux"]["rootfsPropagation"] == "rslave"
    assert [m["source"] for m in spec["mounts"] if m["destination"] == "/etc/hosts"] == [
        str(pod_dir / "hosts")
    ]
    dev = next(d for d in spec["linux"]["devices"] if d["path"] == "/dev/mynull")
    assert (dev["type"], dev["major"], dev["minor"]) == ("c", 1, 3)
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"} in spec["linux"]["resources"][
        "devices"
    ]
    r = spec["linux"]["resources"]
    assert r["cpu"] == {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0"}
    assert r["memory"] == {"limit": 64 << 20}
    assert r["hugepageLimits"] == [{"pageSize": "2MB", "limit": 0}]
    assert r["unified"] == {"memory.high": "1"}
    assert spec["process"]["oomScoreAdj"] == max(-999, current_oom_score_adj())


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (cri.ContainerConfig(image=cri.ImageSpec(image="x")), "config.metadata.name"),
        (
            cri.ContainerConfig(metadata=cri.ContainerMetadata(name="a/b"), image=cri.ImageSpec(image="x")),
            "'/'",
        ),
        (cri.ContainerConfig(metadata=cri.ContainerMetadata(name="a")), "config.image.image"),
        (container(labels={"k": "v" * 5000}), "config.labels"),
        (
            container(
                linux=cri.LinuxContainerConfig(
                    resources=cri.LinuxContainerResources(memory_limit_in_bytes=-1)
                )
            ),
            "memory_limit_in_bytes",
        ),
        (
            container(linux=cri.LinuxContainerConfig(resources=cri.LinuxContainerResources(cpu_shares=-2))),
            "cpu_shares",
        ),
        (container(mounts=[cri.Mount(container_path="rel", host_path="/x")]), "container_path"),
        (
            container(mounts=[cri.Mount(container_path="/x", host_path="/x", recursive_read_only=True)]),
            "recursive_read_only",
        ),
    ],
)
def test_invalid_configs_name_the_field(config: cri.ContainerConfig, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        specgen.validate_config(config)


def test_log_paths_and_signals() -> None:
    assert resolve_log_path("/var/log/pods/p", "app/0.log") == "/var/log/pods/p/app/0.log"
    assert resolve_log_path("", "app/0.log") == ""
    assert resolve_log_path("/var/log/pods/p", "") == ""
    with pytest.raises(InvalidArgument, match="escapes"):
        resolve_log_path("/var/log/pods/p", "../../etc/passwd")
    with pytest.raises(InvalidArgument, match="relative"):
        resolve_log_path("/var/log/pods/p", "/etc/x")
    assert signal_number(cri.Signal.RUNTIME_DEFAULT) == 0
    assert signal_number(cri.Signal.SIGTERM) == 15
    assert signal_number(cri.Signal.SIGKILL) == 9
    assert signal_number(cri.Signal.SIGRTMINPLUS1) == 35
    assert image_stop_signal({"config": {"StopSignal": "SIGQUIT"}}) == 3
    assert image_stop_signal({"config": {"StopSignal": "USR1"}}) == 10
    assert image_stop_signal({}) == 0


def test_recursive_read_only_needs_runc_support(rootfs: Path, pod_dir: Path, tmp_path: Path) -> None:
    rro = container(
        mounts=[
            cri.Mount(container_path="/d", host_path=str(tmp_path), readonly=True, recursive_read_only=True)
        ]
    )
    with pytest.raises(Unimplemented, match="recursive_read_only"):
        make(rootfs, pod(pod_dir), rro)
    spec = make(rootfs, pod(pod_dir), rro, features=specgen.Features(rro=True))
    m = mount(spec, "/d")
    assert m is not None and "rro" in m["options"]
