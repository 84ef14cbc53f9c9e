"""OCI spec generation: containerd's defaults, every option, user resolution inside a rootfs, seccomp."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound
from daemon.oci import seccomp, spec, users
from daemon.oci.spec import Spec

CONTAINERD_CAPS = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment
broken line
app:x:1000:1000:App:/home/app:/bin/sh
"""
GROUP = """\
root:x:0:
wheel:x:10:app,root
app:x:1000:app
staff:x:50:other,app
audio:x:29:
"""


def make_rootfs(base: Path, passwd: str | None = PASSWD, group: str | None = GROUP) -> Path:
    root = base / "rootfs"
    (root / "etc").mkdir(parents=True)
    if passwd is not None:
        (root / "etc" / "passwd").write_text(passwd)
    if group is not None:
        (root / "etc" / "group").write_text(group)
    return root


@pytest.fixture
def rootfs(tmp_path: Path) -> str:
    return str(make_rootfs(tmp_path))


def gen(*opts: spec.SpecOpt) -> Spec:
    return spec.generate("c1", *opts, namespace="ns")


# -- defaults -----------------------------------------------------------------


def test_defaults_match_containerd() -> None:
    s = spec.default_spec("c1", namespace="k8s.io")
    assert s["ociVersion"] == "1.0.2-dev"
    assert s["root"] == {"path": "rootfs"}
    proc = s["process"]
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert proc["cwd"] == "/"
    assert proc["noNewPrivileges"] is True
    assert proc["terminal"] is False
    assert proc["env"] == ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    assert proc["capabilities"] == {
        "bounding": CONTAINERD_CAPS,
        "effective": CONTAINERD_CAPS,
        "permitted": CONTAINERD_CAPS,
    }
    assert proc["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert "oomScoreAdj" not in proc
    assert [(m["destination"], m["type"], m["source"]) for m in s["mounts"]] == [
        ("/proc", "proc", "proc"),
        ("/dev", "tmpfs", "tmpfs"),
        ("/dev/pts", "devpts", "devpts"),
        ("/dev/shm", "tmpfs", "shm"),
        ("/dev/mqueue", "mqueue", "mqueue"),
        ("/sys", "sysfs", "sysfs"),
        ("/sys/fs/cgroup", "cgroup", "cgroup"),
    ]
    by_dest = {m["destination"]: m["options"] for m in s["mounts"]}
    assert by_dest["/dev/pts"] == ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]
    assert by_dest["/dev/shm"] == ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
    assert "ro" in by_dest["/sys"] and "ro" in by_dest["/sys/fs/cgroup"]
    linux = s["linux"]
    assert linux["namespaces"] == [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")]
    assert linux["maskedPaths"][:10] == [
        "/proc/acpi",
        "/proc/asound",
        "/proc/kcore",
        "/proc/keys",
        "/proc/latency_stats",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/sys/firmware",
        "/proc/scsi",
    ]
    assert linux["readonlyPaths"] == [
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ]
    assert linux["cgroupsPath"] == "/k8s.io/c1"
    assert linux["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    assert "seccomp" not in linux
    json.dumps(s)


def test_defaults_are_fresh_copies() -> None:
    a = spec.default_spec("a", namespace="n")
    a["mounts"][0]["options"].append("x")
    a["process"]["rlimits"][0]["hard"] = 1
    b = spec.default_spec("b", namespace="n")
    assert "x" not in b["mounts"][0]["options"]
    assert b["process"]["rlimits"][0]["hard"] == 1024


@pytest.mark.parametrize(("cid", "ns"), [("", "n"), ("a/b", "n"), ("c", ""), ("c", "x/y")])
def test_bad_ids_rejected(cid: str, ns: str) -> None:
    with pytest.raises(InvalidArgument):
        spec.default_spec(cid, namespace=ns)


def test_generate_applies_in_order_and_accepts_custom_options() -> None:
    def custom(s: Spec) -> None:
        s["annotations"] = {"k": "v"}

    s = gen(spec.with_cwd("/a"), spec.with_cwd("/b"), custom)
    assert s["process"]["cwd"] == "/b"
    assert s["annotations"] == {"k": "v"}


def test_encode_rejects_unserialisable() -> None:
    bad = gen(lambda s: s.__setitem__("bad", object()))
    with pytest.raises(InvalidArgument, match="c1"):
        spec.encode(bad, "c1")
    assert json.loads(spec.encode(gen(), "c1"))["ociVersion"] == spec.OCI_VERSION


# -- process options ----------------------------------------------------------


def test_process_args_env_cwd_tty() -> None:
    s = gen(
        spec.with_process_args(["/bin/sh", "-c", "true"]),
        spec.with_env(["A=1", "PATH=/bin", "B=2"]),
        spec.with_env(["A=3", "B"]),
        spec.with_cwd("/work"),
        spec.with_tty(),
    )
    assert s["process"]["args"] == ["/bin/sh", "-c", "true"]
    assert s["process"]["env"] == ["PATH=/bin", "A=3", "TERM=xterm"]
    assert s["process"]["cwd"] == "/work"
    assert s["process"]["terminal"] is True
    with pytest.raises(InvalidArgument):
        spec.with_process_args([])
    with pytest.raises(InvalidArgument, match="cwd"):
        spec.with_cwd("relative")


def test_image_config(rootfs: str) -> None:
    config = {
        "architecture": "amd64",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "LANG=C"],
            "Entrypoint": ["/entry"],
            "Cmd": ["serve", "--port=80"],
            "WorkingDir": "/srv",
            "User": "app",
        },
    }
    s = gen(spec.with_image_config(json.dumps(config).encode(), rootfs), spec.with_env(["LANG=en"]))
    proc = s["process"]
    assert proc["env"] == ["PATH=/usr/bin:/bin", "LANG=en"]
    assert proc["args"] == ["/entry", "serve", "--port=80"]
    assert proc["cwd"] == "/srv"
    assert proc["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 10, 50]}
    s = gen(spec.with_image_config(config, rootfs, args=["other"]))
    assert s["process"]["args"] == ["/entry", "other"]


def test_image_config_without_user_or_cwd_is_root_in_slash(rootfs: str) -> None:
    s = gen(spec.with_image_config({"config": {"Cmd": ["sh"]}}, rootfs))
    assert s["process"]["user"] == {"uid": 0, "gid": 0, "additionalGids": [0, 10]}
    assert s["process"]["cwd"] == "/"
    assert s["process"]["env"] == [spec.DEFAULT_PATH_ENV]


def test_image_config_bad_documents(rootfs: str) -> None:
    with pytest.raises(InvalidArgument, match="image config"):
        spec.with_image_config(b"{not json", rootfs)
    with pytest.raises(InvalidArgument, match="image config"):
        spec.with_image_config("[1]", rootfs)
    with pytest.raises(NotFound, match="ghost"):
        gen(spec.with_image_config({"config": {"User": "ghost"}}, rootfs))


def test_rlimit_and_no_new_privileges() -> None:
    s = gen(spec.with_rlimit("RLIMIT_NOFILE", 4096, 2048), spec.with_rlimit("RLIMIT_NPROC", 10, 10))
    assert s["process"]["rlimits"] == [
        {"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 2048},
        {"type": "RLIMIT_NPROC", "hard": 10, "soft": 10},
    ]
    assert gen(spec.with_no_new_privileges(False))["process"]["noNewPrivileges"] is False
    with pytest.raises(InvalidArgument):
        spec.with_rlimit("NOFILE", 1, 1)
    with pytest.raises(InvalidArgument, match="soft"):
        spec.with_rlimit("RLIMIT_NOFILE", 1, 2)


# -- oom_score_adj ------------------------------------------------------------


@pytest.mark.parametrize(
    ("adj", "floor", "want"), [(-500, 0, 0), (-500, -100, -100), (500, 0, 500), (-998, -999, -998)]
)
def test_oom_score_adj_clamped_to_floor(
    adj: int, floor: int, want: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = spec.default_spec("c1", namespace="ns")
    spec.with_oom_score_adj(adj, floor=floor)(bare)
    assert bare["process"]["oomScoreAdj"] == want
    # generate's own guard uses berthd's value
    monkeypatch.setattr(spec, "current_oom_score_adj", lambda: floor)
    assert gen(spec.with_oom_score_adj(adj))["process"]["oomScoreAdj"] == want


def test_oom_score_adj_floor_defaults_to_berthds_own(monkeypatch: pytest.MonkeyPatch) -> None:
    own = int(Path("/proc/self/oom_score_adj").read_text())
    assert spec.current_oom_score_adj() == own
    monkeypatch.setattr(spec, "current_oom_score_adj", lambda: 300)
    assert gen(spec.with_oom_score_adj(-1000))["process"]["oomScoreAdj"] == 300
    assert gen(spec.with_oom_score_adj(999))["process"]["oomScoreAdj"] == 999


def test_generate_clamps_what_any_option_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec, "current_oom_score_adj", lambda: -10)
    s = gen(lambda s: s["process"].__setitem__("oomScoreAdj", -999))
    assert s["process"]["oomScoreAdj"] == -10


def test_oom_score_adj_range() -> None:
    for bad in (-1001, 1001):
        with pytest.raises(InvalidArgument, match="oomScoreAdj"):
            spec.with_oom_score_adj(bad)


# -- capabilities and confinement ---------------------------------------------


def test_capabilities_add_drop() -> None:
    s = gen(spec.with_capabilities(add=["sys_admin", "CAP_NET_ADMIN"], drop=["CAP_MKNOD", "kill"]))
    for key in ("bounding", "effective", "permitted"):
        caps = s["process"]["capabilities"][key]
        assert "CAP_SYS_ADMIN" in caps and "CAP_NET_ADMIN" in caps
        assert "CAP_MKNOD" not in caps and "CAP_KILL" not in caps
    assert "inheritable" not in s["process"]["capabilities"]
    s = gen(spec.with_capabilities(add=["NET_BIND_SERVICE"], drop=["ALL"]))
    assert s["process"]["capabilities"]["bounding"] == ["CAP_NET_BIND_SERVICE"]
    s = gen(spec.with_capabilities(add=["ALL"]))
    assert set(s["process"]["capabilities"]["effective"]) == set(spec.host_capabilities())
    with pytest.raises(InvalidArgument, match="CAP_NOPE"):
        spec.with_capabilities(add=["CAP_NOPE"])


def test_privileged() -> None:
    s = gen(spec.with_default_seccomp(), spec.with_privileged())
    assert s["process"]["capabilities"]["bounding"] == spec.host_capabilities()
    assert "CAP_SYS_ADMIN" in s["process"]["capabilities"]["bounding"]
    assert s["linux"]["maskedPaths"] == [] and s["linux"]["readonlyPaths"] == []
    assert "seccomp" not in s["linux"]
    for mount in s["mounts"]:
        if mount["type"] in ("sysfs", "cgroup"):
            assert "ro" not in mount["options"] and "rw" in mount["options"]


def test_seccomp_option() -> None:
    profile = {"defaultAction": "SCMP_ACT_LOG"}
    s = gen(spec.with_seccomp(profile))
    assert s["linux"]["seccomp"] == profile
    assert "seccomp" not in gen(spec.with_seccomp(profile), spec.with_seccomp(None))["linux"]
    with pytest.raises(InvalidArgument, match="defaultAction"):
        spec.with_seccomp({})


def test_default_seccomp_follows_capabilities_at_that_point() -> None:
    def names(s: Spec) -> set[str]:
        return {
            n
            for rule in s["linux"]["seccomp"]["syscalls"]
            if rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
            for n in rule["names"]
        }

    after = gen(spec.with_capabilities(add=["SYS_ADMIN"]), spec.with_default_seccomp())
    before = gen(spec.with_default_seccomp(), spec.with_capabilities(add=["SYS_ADMIN"]))
    assert "mount" in names(after)
    assert "mount" not in names(before)


def test_masked_readonly_paths() -> None:
    s = gen(spec.with_masked_paths(["/proc/x"]), spec.with_readonly_paths([]))
    assert s["linux"]["maskedPaths"] == ["/proc/x"]
    assert s["linux"]["readonlyPaths"] == []


# -- filesystem, namespaces, cgroups ------------------------------------------


def test_root_and_mounts() -> None:
    bind = {"destination": "/data/", "type": "bind", "source": "/srv", "options": ["rbind", "ro"]}
    shm = {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["size=1g"]}
    s = gen(spec.with_rootfs_path("/abs/rootfs"), spec.with_readonly_rootfs(), spec.with_mounts([bind, shm]))
    assert s["root"] == {"path": "/abs/rootfs", "readonly": True}
    dests = [m["destination"] for m in s["mounts"]]
    assert dests.count("/dev/shm") == 1 and dests[-1] == "/data"
    assert next(m for m in s["mounts"] if m["destination"] == "/dev/shm")["options"] == ["size=1g"]
    with pytest.raises(InvalidArgument, match="destination"):
        spec.with_mounts([{"destination": "rel", "type": "bind", "source": "/x"}])
    with pytest.raises(InvalidArgument, match="destination"):
        spec.with_mounts([{"type": "bind"}])


def test_hostname_and_annotations() -> None:
    s = gen(spec.with_hostname("box"), spec.with_annotations({"a": "1"}))
    assert s["hostname"] == "box" and s["annotations"] == {"a": "1"}
    with pytest.raises(InvalidArgument):
        spec.with_hostname("x" * 65)


def test_namespaces() -> None:
    s = gen(
        spec.with_namespace_path("network", "/run/netns/pod"),
        spec.with_host_namespace("pid"),
        spec.with_new_namespace("cgroup"),
        spec.with_namespace_path("user", "/proc/1/ns/user"),
    )
    assert s["linux"]["namespaces"] == [
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
        {"type": "network", "path": "/run/netns/pod"},
        {"type": "cgroup"},
        {"type": "user", "path": "/proc/1/ns/user"},
    ]
    with pytest.raises(InvalidArgument, match="net"):
        spec.with_host_namespace("net")
    with pytest.raises(InvalidArgument, match="absolute"):
        spec.with_namespace_path("ipc", "ns/ipc")


def test_cgroups_and_resources() -> None:
    s = gen(
        spec.with_cgroups_path("/berth/x"),
        spec.with_memory_limit(64 << 20),
        spec.with_cpu_shares(512),
        spec.with_cpu_quota(50_000),
    )
    linux = s["linux"]
    assert linux["cgroupsPath"] == "/berth/x"
    assert linux["resources"]["memory"] == {"limit": 64 << 20}
    assert linux["resources"]["cpu"] == {"shares": 512, "quota": 50_000, "period": 100_000}
    assert linux["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    with pytest.raises(InvalidArgument, match="memory"):
        spec.with_memory_limit(0)
    with pytest.raises(InvalidArgument, match="shares"):
        spec.with_cpu_shares(1)
    with pytest.raises(InvalidArgument, match="quota"):
        spec.with_cpu_quota(10)


# -- users --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "uid", "gid", "extra", "home"),
    [
        ("", 0, 0, (0, 10), "/root"),
        ("root", 0, 0, (0, 10), "/root"),
        ("app", 1000, 1000, (1000, 10, 50), "/home/app"),
        ("1000", 1000, 1000, (1000, 10, 50), "/home/app"),
        ("4242", 4242, 0, (0,), "/"),
        ("1000:50", 1000, 50, (50, 10), "/home/app"),
        ("app:audio", 1000, 29, (29, 10, 50), "/home/app"),
        ("4242:wheel", 4242, 10, (10,), "/"),
        ("app:7", 1000, 7, (7, 10, 50), "/home/app"),
    ],
)
def test_resolve_user(rootfs: str, user: str, uid: int, gid: int, extra: tuple[int, ...], home: str) -> None:
    got = users.resolve_user(rootfs, user)
    assert (got.uid, got.gid, got.additional_gids, got.home) == (uid, gid, extra, home)


def test_missing_names_are_errors_naming_user_and_rootfs(rootfs: str) -> None:
    with pytest.raises(NotFound, match="ghost") as info:
        users.resolve_user(rootfs, "ghost")
    assert rootfs in str(info.value)
    with pytest.raises(NotFound, match="nogroup"):
        users.resolve_user(rootfs, "app:nogroup")
    with pytest.raises(InvalidArgument):
        users.resolve_user(rootfs, "a:b:c")
    with pytest.raises(InvalidArgument, match="range"):
        users.resolve_user(rootfs, str(2**32))


def test_no_passwd(tmp_path: Path) -> None:
    root = str(make_rootfs(tmp_path, passwd=None, group=None))
    assert users.resolve_user(root, "1234") == users.User(1234, 0, (0,), "/")
    with pytest.raises(NotFound, match="no /etc/passwd"):
        users.resolve_user(root, "app")


def test_user_options(rootfs: str) -> None:
    s = gen(spec.with_user("app", rootfs))
    assert s["process"]["user"] == {"uid": 1000, "gid": 1000}
    s = gen(
        spec.with_user("app", rootfs),
        spec.with_additional_gids("app", rootfs),
        spec.with_supplemental_groups([7, 10]),
    )
    assert s["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 10, 50, 7]}
    s = gen(spec.with_user("1000:29", rootfs), spec.with_additional_gids("1000", rootfs))
    assert s["process"]["user"]["additionalGids"] == [29, 10, 50]
    with pytest.raises(NotFound, match="ghost"):
        gen(spec.with_user("ghost", rootfs))


def test_symlink_to_hosts_passwd_is_not_followed(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, passwd=None)
    (root / "etc" / "passwd").symlink_to("/etc/passwd")
    # resolved inside the rootfs, /etc/passwd is the link itself: a loop, never the host's file
    with pytest.raises(FailedPrecondition, match="symbolic links"):
        users.resolve_user(str(root), "root")


def test_symlinks_escaping_the_rootfs_resolve_inside_it(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "passwd").write_text("hostonly:x:7:7::/:/bin/sh\n")
    root = make_rootfs(tmp_path, passwd=None)
    (root / "etc" / "passwd").symlink_to(str(host / "passwd"))
    with pytest.raises(NotFound, match="hostonly"):
        users.resolve_user(str(root), "hostonly")
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to("../../../../../../../.." + str(host / "passwd"))
    with pytest.raises(NotFound, match="hostonly"):
        users.resolve_user(str(root), "hostonly")
    # the same absolute target, present inside the rootfs, is what gets read
    inside = root / str(host / "passwd").lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_text("inside:x:9:9::/in:/bin/sh\n")
    assert users.resolve_user(str(root), "inside").uid == 9


def test_symlinked_directories_inside_the_rootfs_work(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "usr" / "etc").mkdir(parents=True)
    (root / "usr" / "etc" / "passwd").write_text(PASSWD)
    (root / "etc").symlink_to("usr/etc")
    assert users.resolve_user(str(root), "app").uid == 1000


def test_special_files_are_refused(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, passwd=None)
    os.mkfifo(root / "etc" / "passwd")
    with pytest.raises(FailedPrecondition, match="regular"):
        users.resolve_user(str(root), "app")


def test_parsers_skip_malformed_lines() -> None:
    entries = users.parse_passwd("a:x:1:2:g:/h:/s\nb:x:nope:2\nc:x:3\n\nd:x:4:5\n")
    assert [(e.name, e.uid, e.gid, e.home) for e in entries] == [("a", 1, 2, "/h"), ("d", 4, 5, "/")]
    groups = users.parse_group("g:x:5:a,b\nh:x:bad:\ni:x:6\n")
    assert [(g.name, g.gid, g.members) for g in groups] == [("g", 5, ("a", "b")), ("i", 6, ())]


# -- seccomp ------------------------------------------------------------------


def _allowed(profile: dict[str, Any]) -> set[str]:
    return {
        name
        for rule in profile["syscalls"]
        if rule["action"] == seccomp.ACT_ALLOW and not rule.get("args")
        for name in rule["names"]
    }


def test_seccomp_profile_structure() -> None:
    profile = seccomp.default_profile(CONTAINERD_CAPS, machine="x86_64", kernel="6.1.0-13-amd64")
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    allowed = _allowed(profile)
    assert {"read", "write", "execve", "openat", "arch_prctl", "ptrace", "chroot"} <= allowed
    for blocked in (
        "mount",
        "unshare",
        "setns",
        "keyctl",
        "add_key",
        "kexec_load",
        "reboot",
        "clone3",
        "bpf",
    ):
        assert blocked not in allowed
    personality = [r["args"][0]["value"] for r in profile["syscalls"] if r["names"] == ["personality"]]
    assert personality == [0, 8, 0x20000, 0x20008, 0xFFFFFFFF]
    clone = next(r for r in profile["syscalls"] if r["names"] == ["clone"])
    assert clone["args"] == [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    clone3 = next(r for r in profile["syscalls"] if r["names"] == ["clone3"])
    assert clone3 == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
    json.dumps(profile)


def test_seccomp_arch_and_kernel() -> None:
    arm = seccomp.default_profile([], machine="aarch64", kernel="5.10")
    assert arm["architectures"] == ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"]
    assert "set_tls" in _allowed(arm) and "arch_prctl" not in _allowed(arm)
    assert "ptrace" not in _allowed(seccomp.default_profile([], machine="x86_64", kernel="4.4.0"))
    s390 = seccomp.default_profile([], machine="s390x", kernel="5.4")
    assert next(r for r in s390["syscalls"] if r["names"] == ["clone"])["args"][0]["index"] == 1


@pytest.mark.parametrize(
    ("cap", "opens"),
    [
        ("CAP_SYS_ADMIN", {"mount", "unshare", "setns", "clone", "clone3", "umount2"}),
        ("CAP_SYS_PTRACE", {"process_vm_readv", "kcmp"}),
        ("CAP_SYS_MODULE", {"init_module", "finit_module", "delete_module"}),
        ("CAP_SYS_TIME", {"settimeofday", "clock_settime"}),
        ("CAP_SYS_BOOT", {"reboot"}),
        ("CAP_DAC_READ_SEARCH", {"open_by_handle_at"}),
        ("CAP_BPF", {"bpf"}),
        ("CAP_PERFMON", {"perf_event_open"}),
        ("CAP_SYSLOG", {"syslog"}),
    ],
)
def test_seccomp_capability_rules(cap: str, opens: set[str]) -> None:
    without = _allowed(seccomp.default_profile(CONTAINERD_CAPS, machine="x86_64", kernel="6.1"))
    with_cap = seccomp.default_profile([*CONTAINERD_CAPS, cap], machine="x86_64", kernel="6.1")
    assert opens <= _allowed(with_cap)
    assert not opens & without


def test_seccomp_sys_admin_lifts_clone_restrictions() -> None:
    profile = seccomp.default_profile(["CAP_SYS_ADMIN"], machine="x86_64", kernel="6.1")
    assert not [r for r in profile["syscalls"] if r["names"] in (["clone"], ["clone3"])]
    dropped_chroot = seccomp.default_profile([], machine="x86_64", kernel="6.1")
    assert "chroot" not in _allowed(dropped_chroot)
