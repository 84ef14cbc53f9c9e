"""The OCI runtime spec (``config.json``) of a container, built like containerd builds it.

A spec is a plain JSON-ready dict in the shape of the OCI runtime spec
(``ociVersion`` 1.0.2-dev, what runc 1.1 speaks). :func:`default_spec` gives
containerd's Linux defaults (``populateDefaultUnixSpec``) plus the read-only
``/sys/fs/cgroup`` mount containerd's CRI adds; options change it.

Options follow containerd's ``SpecOpts``: each ``with_*`` function returns an
option, a callable ``(spec) -> None`` that edits the spec in place, and
:func:`generate` applies them in order, so a later option wins over an earlier
one (``with_image_config`` then ``with_env`` overrides the image's env). Any
callable of that shape is an option, so callers can add their own.

Order matters in two places, as in containerd: :func:`with_default_seccomp`
derives the profile from the capabilities the spec holds at that point (apply
it after capability options), and :func:`with_image_config` resolves the
image's user against the rootfs it is given.

Options that read the rootfs (``with_image_config``, ``with_user``,
``with_additional_gids``) block on file reads: generate specs in a thread.

One rule is the daemon's own, not containerd's default: a container never gets
an ``oomScoreAdj`` lower than berthd's (containerd's ``restrict_oom_score_adj``).
Lowering it needs CAP_SYS_RESOURCE, which berthd may not have; runc would then
fail the start. :func:`with_oom_score_adj` clamps, and :func:`generate` clamps
again whatever an option put there.
"""

from __future__ import annotations

import copy
import functools
import json
import posixpath
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from daemon.errors import InvalidArgument
from daemon.oci import seccomp, users

Spec = dict[str, Any]
SpecOpt = Callable[[Spec], None]

OCI_VERSION = "1.0.2-dev"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_ROOTFS = "rootfs"

#: containerd's default capability set (``defaultUnixCaps``)
DEFAULT_CAPABILITIES: tuple[str, ...] = (
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
)

#: every capability by number (linux/capability.h); the host's cap_last_cap bounds "ALL"
ALL_CAPABILITIES: tuple[str, ...] = tuple(
    "CAP_" + name
    for name in [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ]
)

#: namespaces a container gets by default, in containerd's order
DEFAULT_NAMESPACES: tuple[str, ...] = ("pid", "ipc", "uts", "mount", "network")
NAMESPACE_KINDS = frozenset({"pid", "network", "mount", "ipc", "uts", "user", "cgroup"})

DEFAULT_MASKED_PATHS: tuple[str, ...] = (
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
    # in containerd 2.x and moby: RAPL energy counters leak (CVE-2020-8694)
    "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

#: containerd's ``defaultMounts`` (without 2.x's /run tmpfs, which hides images' /run) + CRI's cgroup mount
DEFAULT_MOUNTS: tuple[dict[str, Any], ...] = (
    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
    {
        "destination": "/dev",
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
    },
    {
        "destination": "/dev/pts",
        "type": "devpts",
        "source": "devpts",
        "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
    },
    {
        "destination": "/dev/shm",
        "type": "tmpfs",
        "source": "shm",
        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
    },
    {
        "destination": "/dev/mqueue",
        "type": "mqueue",
        "source": "mqueue",
        "options": ["nosuid", "noexec", "nodev"],
    },
    {
        "destination": "/sys",
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    },
    {
        "destination": "/sys/fs/cgroup",
        "type": "cgroup",
        "source": "cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
    },
)

DEFAULT_RLIMITS: tuple[dict[str, Any], ...] = ({"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},)

OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ_MAX = 1000


def default_spec(container_id: str, *, namespace: str) -> Spec:
    """containerd's default Linux spec for container ``container_id`` of ``namespace`` (a fresh dict).

    Root at ``rootfs`` (relative to the bundle), uid/gid 0, cwd ``/``, the
    default PATH, the default capabilities (bounding, effective, permitted),
    ``RLIMIT_NOFILE`` 1024, no_new_privileges, the default mounts, masked and
    read-only paths, new pid/ipc/uts/mount/network namespaces, every device
    denied (runc adds its standard ones), cgroup ``/<namespace>/<id>``.
    No seccomp profile: that is an option, as in containerd.
    """
    if not container_id or "/" in container_id:
        raise InvalidArgument(f"container id {container_id!r}: must be non-empty and contain no '/'")
    if not namespace or "/" in namespace:
        raise InvalidArgument(f"namespace {namespace!r}: must be non-empty and contain no '/'")
    caps = list(DEFAULT_CAPABILITIES)
    return {
        "ociVersion": OCI_VERSION,
        "root": {"path": DEFAULT_ROOTFS},
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [],
            "env": [DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": {"bounding": list(caps), "effective": list(caps), "permitted": list(caps)},
            "rlimits": copy.deepcopy(list(DEFAULT_RLIMITS)),
            "noNewPrivileges": True,
        },
        "mounts": copy.deepcopy(list(DEFAULT_MOUNTS)),
        "linux": {
            "namespaces": [{"type": kind} for kind in DEFAULT_NAMESPACES],
            "maskedPaths": list(DEFAULT_MASKED_PATHS),
            "readonlyPaths": list(DEFAULT_READONLY_PATHS),
            "cgroupsPath": f"/{namespace}/{container_id}",
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        },
    }


def current_oom_score_adj() -> int:
    """berthd's own oom_score_adj: the floor for every container's."""
    with open("/proc/self/oom_score_adj") as f:
        return int(f.read().strip())


def clamp_oom_score_adj(adj: int, floor: int | None = None) -> int:
    """``adj`` raised to ``floor`` (default: berthd's own) when it is lower."""
    if not OOM_SCORE_ADJ_MIN <= adj <= OOM_SCORE_ADJ_MAX:
        raise InvalidArgument(f"oomScoreAdj {adj}: must be within [{OOM_SCORE_ADJ_MIN}, {OOM_SCORE_ADJ_MAX}]")
    floor = current_oom_score_adj() if floor is None else floor
    return max(adj, floor)


def generate(container_id: str, *opts: SpecOpt, namespace: str = "default") -> Spec:
    """The spec of container ``container_id``: :func:`default_spec`, then each option in order.

    After the options, ``process.oomScoreAdj`` (if any) is clamped to
    berthd's own. Turn the result into ``config.json`` bytes with :func:`encode`.
    """
    spec = default_spec(container_id, namespace=namespace)
    for opt in opts:
        opt(spec)
    process = spec.get("process")
    if isinstance(process, dict) and "oomScoreAdj" in process:
        process["oomScoreAdj"] = clamp_oom_score_adj(int(process["oomScoreAdj"]))
    return spec


def encode(spec: Spec, container_id: str) -> bytes:
    """``spec`` as ``config.json`` bytes, encoded once (with its seccomp profile it takes a few ms).

    InvalidArgument naming ``container_id`` and what an option left there that JSON cannot hold.
    """
    try:
        return json.dumps(spec).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"container {container_id!r}: spec is not JSON-serialisable: {exc}") from exc


# -- helpers ------------------------------------------------------------------


def _process(spec: Spec) -> dict[str, Any]:
    return spec.setdefault("process", {})  # type: ignore[no-any-return]


def _linux(spec: Spec) -> dict[str, Any]:
    return spec.setdefault("linux", {})  # type: ignore[no-any-return]


def _resources(spec: Spec) -> dict[str, Any]:
    return _linux(spec).setdefault("resources", {})  # type: ignore[no-any-return]


def _capabilities(spec: Spec) -> dict[str, list[str]]:
    return _process(spec).setdefault("capabilities", {})  # type: ignore[no-any-return]


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def merge_env(base: Sequence[str], overrides: Iterable[str]) -> list[str]:
    """containerd's ``replaceOrAppendEnvValues``: each ``K=V`` replaces ``K`` in place or is appended.

    An override without ``=`` removes the variable.
    """
    result = list(base)
    for entry in overrides:
        key = _env_key(entry)
        idx = next((i for i, cur in enumerate(result) if _env_key(cur) == key), None)
        if "=" not in entry:
            if idx is not None:
                del result[idx]
        elif idx is None:
            result.append(entry)
        else:
            result[idx] = entry
    return result


def _normalise_cap(name: str) -> str:
    cap = name.upper()
    if cap != "ALL" and not cap.startswith("CAP_"):
        cap = "CAP_" + cap
    if cap != "ALL" and cap not in ALL_CAPABILITIES:
        raise InvalidArgument(f"capability {name!r}: unknown")
    return cap


@functools.cache
def _host_capabilities() -> tuple[str, ...]:
    # The kernel's cap_last_cap is fixed for the boot: read once, not per spec (nor per set).
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read().strip())
    except (OSError, ValueError):
        last = len(ALL_CAPABILITIES) - 1
    return tuple(ALL_CAPABILITIES[: last + 1])


def host_capabilities() -> list[str]:
    """Every capability this kernel knows (up to /proc/sys/kernel/cap_last_cap); a fresh list."""
    return list(_host_capabilities())


def _check_abs(path: str, what: str) -> None:
    if not path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r}: must be an absolute path")


# -- process ------------------------------------------------------------------


def with_process_args(args: Sequence[str]) -> SpecOpt:
    """Set ``process.args`` (argv; ``args[0]`` is looked up in the container's PATH by runc)."""
    argv = list(args)
    if not argv:
        raise InvalidArgument("process args: must not be empty")

    def opt(spec: Spec) -> None:
        _process(spec)["args"] = list(argv)

    return opt


def with_env(env: Iterable[str]) -> SpecOpt:
    """Replace or append ``K=V`` variables (``K`` alone removes ``K``); see :func:`merge_env`."""
    entries = list(env)

    def opt(spec: Spec) -> None:
        process = _process(spec)
        process["env"] = merge_env(process.get("env", []), entries)

    return opt


def with_cwd(cwd: str) -> SpecOpt:
    _check_abs(cwd, "cwd")

    def opt(spec: Spec) -> None:
        _process(spec)["cwd"] = cwd

    return opt


def with_tty(enabled: bool = True) -> SpecOpt:
    """Allocate a terminal; like containerd's ``WithTTY`` it also sets ``TERM=xterm``."""

    def opt(spec: Spec) -> None:
        process = _process(spec)
        process["terminal"] = enabled
        if enabled:
            process["env"] = merge_env(process.get("env", []), ["TERM=xterm"])

    return opt


def with_image_config(
    config: Mapping[str, Any] | bytes | str, rootfs: str, *, args: Sequence[str] = ()
) -> SpecOpt:
    """Env, args, cwd and user from an OCI/Docker image config document (the config blob).

    As containerd's ``WithImageConfigArgs``: the image's env is merged over
    the spec's (so the image's PATH replaces the default), args are
    ``Entrypoint + (args or Cmd)``, cwd is ``WorkingDir`` or ``/``, and the
    image's ``User`` is resolved in ``rootfs`` with its supplementary groups
    (root's when the image names no user).
    """
    try:
        document = json.loads(config) if isinstance(config, bytes | str) else dict(config)
    except ValueError as exc:
        raise InvalidArgument(f"image config: not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise InvalidArgument("image config: not a JSON object")
    section = document.get("config") or {}
    if not isinstance(section, dict):
        raise InvalidArgument("image config: 'config' is not an object")
    image_env = list(section.get("Env") or [])
    entrypoint = list(section.get("Entrypoint") or [])
    cmd = list(args) if args else list(section.get("Cmd") or [])
    cwd = section.get("WorkingDir") or "/"
    user = section.get("User") or ""

    def opt(spec: Spec) -> None:
        process = _process(spec)
        process["env"] = merge_env(process.get("env", []), image_env)
        process["args"] = entrypoint + cmd
        process["cwd"] = cwd
        resolved = users.resolve_user(rootfs, user)
        _set_user(spec, resolved)

    return opt


def _set_user(spec: Spec, user: users.User) -> None:
    entry: dict[str, Any] = {"uid": user.uid, "gid": user.gid}
    if user.additional_gids:
        entry["additionalGids"] = list(user.additional_gids)
    _process(spec)["user"] = entry


def with_user(user: str, rootfs: str) -> SpecOpt:
    """Run as ``user`` (``name``, ``uid``, ``uid:gid``, ``name:group``, ...) resolved in ``rootfs``.

    Sets uid and gid only, as containerd's ``WithUser``; the supplementary
    groups come from :func:`with_additional_gids`. A name missing from the
    image is NotFound (naming user and rootfs); a bare uid it lacks runs with gid 0.
    """

    def opt(spec: Spec) -> None:
        resolved = users.resolve_user(rootfs, user)
        process_user = _process(spec).setdefault("user", {})
        process_user["uid"], process_user["gid"] = resolved.uid, resolved.gid

    return opt


def with_additional_gids(user: str, rootfs: str) -> SpecOpt:
    """Supplementary groups of ``user`` (a name or uid) from ``rootfs``'s /etc/group.

    As containerd's ``WithAdditionalGIDs``: the spec's primary gid first, then
    each group listing the user. A uid the image does not list gets the primary gid only.
    """

    def opt(spec: Spec) -> None:
        process_user = _process(spec).setdefault("user", {"uid": 0, "gid": 0})
        gid = int(process_user.get("gid", 0))
        name = user
        if user.isascii() and user.isdigit():
            text = users.read_in_root(rootfs, "/etc/passwd") or ""
            uid = int(user)
            name = next((e.name for e in users.parse_passwd(text) if e.uid == uid), "")
        process_user["additionalGids"] = list(users.additional_gids(rootfs, name, gid))

    return opt


def with_supplemental_groups(gids: Iterable[int]) -> SpecOpt:
    """Append numeric supplementary gids (CRI's ``supplemental_groups``), keeping order, no duplicates."""
    extra = [int(g) for g in gids]
    for gid in extra:
        if not 0 <= gid <= users.MAX_ID:
            raise InvalidArgument(f"supplemental group {gid}: out of range")

    def opt(spec: Spec) -> None:
        process_user = _process(spec).setdefault("user", {"uid": 0, "gid": 0})
        current = list(process_user.get("additionalGids", []))
        current += [g for g in extra if g not in current]
        process_user["additionalGids"] = current

    return opt


def with_rlimit(kind: str, hard: int, soft: int) -> SpecOpt:
    """Set (replace) one rlimit, e.g. ``with_rlimit("RLIMIT_NOFILE", 65536, 65536)``."""
    if not kind.startswith("RLIMIT_"):
        raise InvalidArgument(f"rlimit {kind!r}: must be an RLIMIT_* name")
    if soft > hard:
        raise InvalidArgument(f"rlimit {kind}: soft {soft} above hard {hard}")

    def opt(spec: Spec) -> None:
        process = _process(spec)
        limits = [r for r in process.get("rlimits", []) if r.get("type") != kind]
        limits.append({"type": kind, "hard": hard, "soft": soft})
        process["rlimits"] = limits

    return opt


def with_no_new_privileges(enabled: bool = True) -> SpecOpt:
    def opt(spec: Spec) -> None:
        _process(spec)["noNewPrivileges"] = enabled

    return opt


def with_oom_score_adj(adj: int, *, floor: int | None = None) -> SpecOpt:
    """Set ``process.oomScoreAdj``, never below ``floor`` (default: berthd's own, read when applied).

    :func:`generate` clamps again to berthd's own, so a ``floor`` below it has no effect there.
    """
    clamp_oom_score_adj(adj, 0)  # range check now, where the caller is

    def opt(spec: Spec) -> None:
        _process(spec)["oomScoreAdj"] = clamp_oom_score_adj(adj, floor)

    return opt


# -- capabilities and security ------------------------------------------------


def with_capabilities(add: Iterable[str] = (), drop: Iterable[str] = ()) -> SpecOpt:
    """CRI's add/drop on the bounding, effective and permitted sets; ``ALL`` is every capability.

    Drops apply first, then adds (``drop=["ALL"], add=["NET_BIND_SERVICE"]``
    leaves just that one). Names may omit ``CAP_``; unknown names are
    InvalidArgument. Inheritable is never set (CVE-2022-24769).
    """
    adds = [_normalise_cap(c) for c in add]
    drops = [_normalise_cap(c) for c in drop]

    def opt(spec: Spec) -> None:
        caps = _capabilities(spec)
        for key in ("bounding", "effective", "permitted"):
            current = list(caps.get(key, []))
            if "ALL" in drops:
                current = []
            current = [c for c in current if c not in drops]
            for cap in host_capabilities() if "ALL" in adds else adds:
                if cap != "ALL" and cap not in current:
                    current.append(cap)
            caps[key] = current

    return opt


def with_privileged() -> SpecOpt:
    """containerd's ``WithPrivileged``: every capability, no masked/read-only paths,
    writable sysfs and cgroupfs, no seccomp/AppArmor/SELinux confinement.

    (Host devices are not added here; the CRI layer decides that.)
    """

    def opt(spec: Spec) -> None:
        caps = host_capabilities()
        _capabilities(spec).update({k: list(caps) for k in ("bounding", "effective", "permitted")})
        linux = _linux(spec)
        linux["maskedPaths"] = []
        linux["readonlyPaths"] = []
        linux.pop("seccomp", None)
        process = _process(spec)
        process.pop("apparmorProfile", None)
        process.pop("selinuxLabel", None)
        for mount in spec.get("mounts", []):
            if mount.get("type") in ("sysfs", "cgroup"):
                mount["options"] = ["rw" if o == "ro" else o for o in mount.get("options", [])]

    return opt


def with_seccomp(profile: Mapping[str, Any] | None) -> SpecOpt:
    """Use ``profile`` as ``linux.seccomp``; None means unconfined (removes any profile)."""
    chosen = copy.deepcopy(dict(profile)) if profile is not None else None
    if chosen is not None and "defaultAction" not in chosen:
        raise InvalidArgument("seccomp profile: missing defaultAction")

    def opt(spec: Spec) -> None:
        linux = _linux(spec)
        if chosen is None:
            linux.pop("seccomp", None)
        else:
            linux["seccomp"] = copy.deepcopy(chosen)

    return opt


def with_default_seccomp() -> SpecOpt:
    """The RuntimeDefault profile for the bounding set the spec has *now* (apply after capability options)."""

    def opt(spec: Spec) -> None:
        bounding = _capabilities(spec).get("bounding", [])
        _linux(spec)["seccomp"] = seccomp.default_profile(bounding)

    return opt


def with_masked_paths(paths: Iterable[str]) -> SpecOpt:
    chosen = list(paths)

    def opt(spec: Spec) -> None:
        _linux(spec)["maskedPaths"] = list(chosen)

    return opt


def with_readonly_paths(paths: Iterable[str]) -> SpecOpt:
    chosen = list(paths)

    def opt(spec: Spec) -> None:
        _linux(spec)["readonlyPaths"] = list(chosen)

    return opt


# -- filesystem ---------------------------------------------------------------


def with_rootfs_path(path: str, *, readonly: bool | None = None) -> SpecOpt:
    """``root.path``: absolute, or relative to the bundle (default ``rootfs``)."""

    def opt(spec: Spec) -> None:
        root = spec.setdefault("root", {})
        root["path"] = path
        if readonly is not None:
            root["readonly"] = readonly

    return opt


def with_readonly_rootfs(readonly: bool = True) -> SpecOpt:
    def opt(spec: Spec) -> None:
        spec.setdefault("root", {"path": DEFAULT_ROOTFS})["readonly"] = readonly

    return opt


def with_mounts(mounts: Iterable[Mapping[str, Any]]) -> SpecOpt:
    """Add mounts (OCI ``{destination, type, source, options}``); one with the destination
    of an existing mount replaces it in place, others are appended in order.
    """
    chosen = []
    for mount in mounts:
        entry = copy.deepcopy(dict(mount))
        dest = entry.get("destination")
        if not isinstance(dest, str):
            raise InvalidArgument(f"mount {entry!r}: destination is required")
        _check_abs(dest, "mount destination")
        entry["destination"] = posixpath.normpath(dest)
        chosen.append(entry)

    def opt(spec: Spec) -> None:
        current = spec.setdefault("mounts", [])
        for entry in chosen:
            dest = entry["destination"]
            idx = next(
                (i for i, m in enumerate(current) if posixpath.normpath(m.get("destination", "")) == dest),
                None,
            )
            if idx is None:
                current.append(copy.deepcopy(entry))
            else:
                current[idx] = copy.deepcopy(entry)

    return opt


def with_hostname(hostname: str) -> SpecOpt:
    """Set the UTS hostname (the container must have its own uts namespace, the default)."""
    if not hostname or len(hostname) > 64:
        raise InvalidArgument(f"hostname {hostname!r}: must be 1-64 characters")

    def opt(spec: Spec) -> None:
        spec["hostname"] = hostname

    return opt


def with_annotations(annotations: Mapping[str, str]) -> SpecOpt:
    chosen = dict(annotations)

    def opt(spec: Spec) -> None:
        spec.setdefault("annotations", {}).update(chosen)

    return opt


# -- namespaces and cgroups ---------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in NAMESPACE_KINDS:
        raise InvalidArgument(f"namespace kind {kind!r}: must be one of {sorted(NAMESPACE_KINDS)}")


def with_namespace_path(kind: str, path: str) -> SpecOpt:
    """Join an existing namespace (e.g. a pod's pinned ``/run/.../netns``) instead of a new one."""
    _check_kind(kind)
    _check_abs(path, f"{kind} namespace path")

    def opt(spec: Spec) -> None:
        namespaces = _linux(spec).setdefault("namespaces", [])
        entry = {"type": kind, "path": path}
        for i, ns in enumerate(namespaces):
            if ns.get("type") == kind:
                namespaces[i] = entry
                return
        namespaces.append(entry)

    return opt


def with_new_namespace(kind: str) -> SpecOpt:
    """Give the container a new namespace of ``kind`` (e.g. ``cgroup``, ``user``)."""
    _check_kind(kind)

    def opt(spec: Spec) -> None:
        namespaces = _linux(spec).setdefault("namespaces", [])
        namespaces[:] = [ns for ns in namespaces if ns.get("type") != kind]
        namespaces.append({"type": kind})

    return opt


def with_host_namespace(kind: str) -> SpecOpt:
    """Share the host's namespace of ``kind`` (the spec lists it no more)."""
    _check_kind(kind)

    def opt(spec: Spec) -> None:
        namespaces = _linux(spec).setdefault("namespaces", [])
        namespaces[:] = [ns for ns in namespaces if ns.get("type") != kind]

    return opt


def with_cgroups_path(path: str) -> SpecOpt:
    """``linux.cgroupsPath``: ``/parent/leaf`` (cgroupfs) or ``slice:prefix:name`` (systemd)."""
    if not path:
        raise InvalidArgument("cgroupsPath: must not be empty")

    def opt(spec: Spec) -> None:
        _linux(spec)["cgroupsPath"] = path

    return opt


def with_memory_limit(limit: int) -> SpecOpt:
    """``linux.resources.memory.limit`` in bytes."""
    if limit <= 0:
        raise InvalidArgument(f"memory limit {limit}: must be positive")

    def opt(spec: Spec) -> None:
        _resources(spec).setdefault("memory", {})["limit"] = limit

    return opt


def with_cpu_shares(shares: int) -> SpecOpt:
    """``linux.resources.cpu.shares`` (cgroup v1 weight; 2..262144)."""
    if not 2 <= shares <= 262144:
        raise InvalidArgument(f"cpu shares {shares}: must be within [2, 262144]")

    def opt(spec: Spec) -> None:
        _resources(spec).setdefault("cpu", {})["shares"] = shares

    return opt


def with_cpu_quota(quota: int, period: int = 100_000) -> SpecOpt:
    """CFS quota per period in microseconds (``quota=50_000`` is half a CPU); -1 is unlimited."""
    if quota != -1 and quota < 1000:
        raise InvalidArgument(f"cpu quota {quota}: must be -1 or at least 1000us")
    if not 1000 <= period <= 1_000_000:
        raise InvalidArgument(f"cpu period {period}: must be within [1000, 1000000]us")

    def opt(spec: Spec) -> None:
        cpu = _resources(spec).setdefault("cpu", {})
        cpu["quota"] = quota
        cpu["period"] = period

    return opt
