"""A CRI ContainerConfig in its pod, as the OCI runtime spec runc gets (containerd 1.7's ``containerSpec``).

:func:`container_spec` is pure apart from reading files: the image's
``/etc/passwd`` and ``/etc/group`` in ``rootfs`` (the container's snapshot,
mounted by the caller), the sandbox's ``hosts``/``resolv.conf``/``hostname``
files and host devices. Run it in a thread.

What kubelet expects, field by field:

* argv: ``command`` replaces the image's Entrypoint, ``args`` its Cmd
  (``command`` + ``args`` when a command is given, else Entrypoint +
  (``args`` or Cmd)); neither: InvalidArgument "no command specified".
* env: PATH and the image's env, ``HOSTNAME`` (the pod's), then ``envs``;
  cwd: ``working_dir``, else the image's WorkingDir, else ``/``.
* user: ``run_as_user`` (gid from the image's passwd unless ``run_as_group``),
  ``run_as_username``, else the image's ``User``; supplementary groups: the
  image's ``/etc/group`` memberships (policy Merge) and ``supplemental_groups``.
* the pod: joins its pinned net/ipc/uts namespace files (or the host's for
  NODE), its PID namespace (POD: the infra process's, NODE: the host's,
  TARGET: another container's), gets its ``/etc/hosts``, ``/etc/resolv.conf``,
  ``/etc/hostname`` and ``/dev/shm``, its sysctls, a cgroup under its parent.
* mounts: bind mounts as given; an image mount (``image`` set) binds the
  image's read-only view that :mod:`.imagevolume` mounted (its ``host_path``).
* security: privileged (only in a privileged pod), capabilities, read-only
  rootfs, seccomp, no_new_privs, masked/read-only paths; AppArmor and SELinux
  are not supported by this node and ignored (a log line says so).
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import betterproto
import structlog

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from daemon.metadata.validate import validate_labels
from daemon.oci import seccomp, users
from daemon.oci import spec as oci
from plugins.cri.container.imagevolume import check_image_mount
from plugins.cri.sandbox.validate import check_resources
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.specgen")

K8S_NAMESPACE = "k8s.io"
SYSTEMD_PREFIX = "cri-berth"
DEFAULT_CGROUP_PARENT = "/k8s.io"

# containerd's annotations (pkg/cri/annotations), read by the runtime (grouping) and by NRI/tools
ANN_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANN_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ANN_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
ANN_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
ANN_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
ANN_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANN_IMAGE_NAME = "io.kubernetes.cri.image-name"
CONTAINER_TYPE = "container"

PROPAGATION = {
    cri.MountPropagation.PROPAGATION_PRIVATE: "rprivate",
    cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    cri.MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared",
}
#: Longest log path, labels map, env and argv kubelet can reasonably send (bytes): beyond is an abuse.
MAX_FIELD_BYTES = 1 << 20


@dataclass(frozen=True)
class PodInfo:
    """What a container needs of its sandbox (built from the store's entry by the manager)."""

    id: str
    config: cri.PodSandboxConfig
    netns_path: str = ""
    ipc_path: str = ""
    uts_path: str = ""
    root_dir: str = ""  # the sandbox's files: hosts, resolv.conf, hostname, shm
    cgroup_parent: str = ""
    infra_pid: int = 0  # the process holding the pod's PID namespace (shared PID pods)


@dataclass(frozen=True)
class Features:
    """What the installed runc can do (``runc features``), decided once by the manager."""

    rro: bool = False  # recursive read-only mounts (runc >= 1.2 on kernel >= 5.12)
    idmap: bool = False  # id-mapped mounts, which user namespaces of pods need


@dataclass(frozen=True)
class SpecInput:
    """Everything :func:`container_spec` reads besides the files."""

    container_id: str
    config: cri.ContainerConfig
    pod: PodInfo
    image_name: str  # as the request named it (annotation)
    image_config: Mapping[str, Any]  # the image's config blob (OCI/Docker)
    rootfs: str  # the snapshot, mounted, for /etc/passwd and /etc/group
    cgroup_driver: str = "cgroupfs"
    features: Features = field(default_factory=Features)
    target_pid: int = 0  # pid of the target container for NamespaceMode.TARGET
    host_hostname: str = ""


def _set(message: betterproto.Message) -> bool:
    return bool(betterproto.serialized_on_wire(message))


def _security(config: cri.ContainerConfig) -> cri.LinuxContainerSecurityContext:
    return config.linux.security_context


def _pod_security(pod: PodInfo) -> cri.LinuxSandboxSecurityContext:
    return pod.config.linux.security_context


# -- validation ----------------------------------------------------------------------------


def validate_config(config: cri.ContainerConfig, *, image_volumes_mounted: bool = False) -> None:
    """Checks that need no file: InvalidArgument naming the field at fault.

    An image mount (``image`` set) must come with an empty ``host_path`` and
    ``readonly`` (containerd's rule); once :mod:`.imagevolume` has mounted it
    (``image_volumes_mounted``), its ``host_path`` is the mounted image.
    """
    if not config.metadata.name:
        raise InvalidArgument("config.metadata.name: must not be empty")
    if "/" in config.metadata.name:
        raise InvalidArgument(f"config.metadata.name {config.metadata.name!r}: must not contain '/'")
    if not config.image.image:
        raise InvalidArgument("config.image.image: must not be empty")
    validate_labels("config.labels", config.labels)
    validate_labels("config.annotations", config.annotations)
    if len(config.log_path.encode()) > 4096:
        raise InvalidArgument("config.log_path: longer than 4096 bytes")
    for i, kv in enumerate(config.envs):
        if not kv.key:
            raise InvalidArgument(f"config.envs[{i}].key: must not be empty")
    for i, m in enumerate(config.mounts):
        where = f"config.mounts[{i}]"
        if not m.container_path or not m.container_path.startswith("/"):
            raise InvalidArgument(f"{where}.container_path {m.container_path!r}: must be an absolute path")
        if _set(m.image) and m.image.image:
            if not image_volumes_mounted:
                check_image_mount(m, where)
            elif not m.host_path:
                raise FailedPrecondition(f"{where}.image {m.image.image!r}: the image volume is not mounted")
        elif not m.host_path:
            raise InvalidArgument(f"{where}.host_path: must not be empty")
        if m.recursive_read_only and not m.readonly:
            raise InvalidArgument(f"{where}.recursive_read_only: needs readonly to be set too")
        if m.recursive_read_only and m.propagation != cri.MountPropagation.PROPAGATION_PRIVATE:
            raise InvalidArgument(f"{where}.recursive_read_only: needs propagation PROPAGATION_PRIVATE")
        if m.uid_mappings or m.gid_mappings:
            raise Unimplemented(f"{where}: id-mapped mounts are not supported by the installed runc")
    for i, d in enumerate(config.devices):
        if not d.container_path.startswith("/") or not d.host_path.startswith("/"):
            raise InvalidArgument(f"config.devices[{i}]: host_path and container_path must be absolute")
    validate_resources(config.linux.resources, "config.linux.resources")


def validate_resources(r: cri.LinuxContainerResources, where: str) -> None:
    """The pod's checks (:func:`check_resources`: no negative figures but an unlimited -1, a sane
    oom_score_adj), then the ranges runc enforces on a container's CPU period and quota: InvalidArgument."""
    check_resources(r, where)
    if r.cpu_period and not 1000 <= r.cpu_period <= 1_000_000:
        raise InvalidArgument(f"{where}.cpu_period: {r.cpu_period} must be within [1000, 1000000] us")
    if r.cpu_quota > 0 and r.cpu_quota < 1000:
        raise InvalidArgument(f"{where}.cpu_quota: {r.cpu_quota} must be at least 1000 us")
    for i, h in enumerate(r.hugepage_limits):
        if not h.page_size:
            raise InvalidArgument(f"{where}.hugepage_limits[{i}].page_size: must not be empty")


# -- resources -----------------------------------------------------------------------------


def linux_resources(r: cri.LinuxContainerResources) -> dict[str, Any]:
    """The OCI ``linux.resources`` (without devices) of CRI resources; zero fields are left out."""
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if r.cpu_shares:
        cpu["shares"] = r.cpu_shares
    if r.cpu_quota:
        cpu["quota"] = r.cpu_quota
    if r.cpu_period:
        cpu["period"] = r.cpu_period
    if r.cpuset_cpus:
        cpu["cpus"] = r.cpuset_cpus
    if r.cpuset_mems:
        cpu["mems"] = r.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, Any] = {}
    if r.memory_limit_in_bytes:
        memory["limit"] = r.memory_limit_in_bytes
    if r.memory_swap_limit_in_bytes:
        memory["swap"] = r.memory_swap_limit_in_bytes
    if memory:
        out["memory"] = memory
    if r.hugepage_limits:
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in r.hugepage_limits]
    if r.unified:
        out["unified"] = dict(r.unified)
    return out


def with_resources(r: cri.LinuxContainerResources) -> oci.SpecOpt:
    wanted = linux_resources(r)
    adj = r.oom_score_adj

    def opt(spec: oci.Spec) -> None:
        resources = spec.setdefault("linux", {}).setdefault("resources", {})
        for key, value in wanted.items():
            if isinstance(value, dict):
                resources.setdefault(key, {}).update(value)
            else:
                resources[key] = value
        # generate() raises it to berthd's own when lower (no CAP_SYS_RESOURCE needed)
        spec.setdefault("process", {})["oomScoreAdj"] = adj

    return opt


def cgroups_path(pod: PodInfo, container_id: str, driver: str) -> str:
    """cgroupfs: ``<parent>/<id>``; systemd: ``<parent slice>:cri-berth:<id>`` (containerd's shape)."""
    parent = pod.cgroup_parent
    if driver == "systemd":
        slice_ = posixpath.basename(parent.rstrip("/")) if parent else "system.slice"
        return f"{slice_}:{SYSTEMD_PREFIX}:{container_id}"
    base = parent if parent else DEFAULT_CGROUP_PARENT
    if not base.startswith("/"):
        base = "/" + base
    return posixpath.join(base, container_id)


# -- process -------------------------------------------------------------------------------


def process_args(config: cri.ContainerConfig, image_section: Mapping[str, Any]) -> list[str]:
    """kubelet's rule: command overrides Entrypoint, args override Cmd."""
    command = list(config.command)
    args = list(config.args)
    if not command:
        if not args:
            args = list(image_section.get("Cmd") or [])
        command = list(image_section.get("Entrypoint") or [])
    argv = command + args
    if not argv:
        raise InvalidArgument(
            "config.command: no command specified (and the image has neither Entrypoint nor Cmd)"
        )
    return argv


def _image_section(image_config: Mapping[str, Any]) -> Mapping[str, Any]:
    section = image_config.get("config") or {}
    return section if isinstance(section, Mapping) else {}


def with_process(inp: SpecInput) -> oci.SpecOpt:
    config, section = inp.config, _image_section(inp.image_config)
    argv = process_args(config, section)
    cwd = config.working_dir or section.get("WorkingDir") or "/"
    if not str(cwd).startswith("/"):
        raise InvalidArgument(f"config.working_dir {cwd!r}: must be an absolute path")
    hostname = inp.pod.config.hostname
    if not hostname and inp.pod.config.linux.security_context.namespace_options.network == (
        cri.NamespaceMode.NODE
    ):
        hostname = inp.host_hostname
    env = list(section.get("Env") or [])
    if hostname:
        env.append(f"HOSTNAME={hostname}")
    env += [f"{kv.key}={kv.value}" for kv in config.envs]

    def opt(spec: oci.Spec) -> None:
        process = spec.setdefault("process", {})
        process["args"] = argv
        process["cwd"] = str(cwd)
        process["env"] = oci.merge_env(process.get("env", []), env)
        process["terminal"] = bool(config.tty)
        if config.tty:
            process["env"] = oci.merge_env(process["env"], ["TERM=xterm"])
        # containerd's CRI drops the default rlimits: the container inherits the shim's
        process.pop("rlimits", None)

    return opt


def resolve_user(inp: SpecInput) -> users.User:
    """Who the process runs as, with its supplementary groups (module doc); reads the rootfs."""
    sc = _security(inp.config)
    rootfs = inp.rootfs
    has_uid = _set(sc.run_as_user)
    has_gid = _set(sc.run_as_group)
    if has_gid and not has_uid and not sc.run_as_username:
        raise InvalidArgument(
            "config.linux.security_context.run_as_group: set without run_as_user or run_as_username"
        )
    if has_uid:
        if sc.run_as_user.value < 0 or sc.run_as_user.value > users.MAX_ID:
            raise InvalidArgument(
                f"config.linux.security_context.run_as_user: {sc.run_as_user.value} out of range"
            )
        base = users.resolve_user(rootfs, str(sc.run_as_user.value))
    elif sc.run_as_username:
        try:
            base = users.resolve_user(rootfs, sc.run_as_username)
        except NotFound as exc:
            raise InvalidArgument(f"config.linux.security_context.run_as_username: {exc.message}") from None
    else:
        base = users.resolve_user(rootfs, str(_image_section(inp.image_config).get("User") or ""))
    gid = base.gid
    if has_gid:
        if not 0 <= sc.run_as_group.value <= users.MAX_ID:
            raise InvalidArgument(
                f"config.linux.security_context.run_as_group: {sc.run_as_group.value} out of range"
            )
        gid = int(sc.run_as_group.value)
    strict = sc.supplemental_groups_policy == cri.SupplementalGroupsPolicy.Strict
    gids = [gid] if strict else list(users.additional_gids(rootfs, base.name, gid))
    for g in sc.supplemental_groups:
        if not 0 <= g <= users.MAX_ID:
            raise InvalidArgument(f"config.linux.security_context.supplemental_groups: {g} out of range")
        if g not in gids:
            gids.append(int(g))
    return users.User(base.uid, gid, tuple(gids), base.home, base.name)


def with_resolved_user(user: users.User) -> oci.SpecOpt:
    def opt(spec: oci.Spec) -> None:
        entry: dict[str, Any] = {"uid": user.uid, "gid": user.gid}
        if user.additional_gids:
            entry["additionalGids"] = list(user.additional_gids)
        spec.setdefault("process", {})["user"] = entry

    return opt


# -- mounts and devices --------------------------------------------------------------------


def cri_mounts(config: cri.ContainerConfig) -> list[dict[str, Any]]:
    """The config's bind mounts as OCI mounts (``rbind``, propagation, ``ro``/``rro``)."""
    out = []
    for m in config.mounts:
        options = ["rbind", PROPAGATION.get(m.propagation, "rprivate")]
        options.append("rro" if m.recursive_read_only else "ro" if m.readonly else "rw")
        out.append(
            {
                "destination": posixpath.normpath(m.container_path),
                "type": "bind",
                "source": m.host_path,
                "options": options,
            }
        )
    return out


def sandbox_mounts(inp: SpecInput, taken: set[str]) -> list[dict[str, Any]]:
    """The pod's /etc/hostname, /etc/hosts, /etc/resolv.conf and /dev/shm, unless the config mounts them."""
    sc = _security(inp.config)
    ro = "ro" if sc.readonly_rootfs else "rw"
    root = inp.pod.root_dir
    out = []
    for dest, name in (
        ("/etc/hostname", "hostname"),
        ("/etc/hosts", "hosts"),
        ("/etc/resolv.conf", "resolv.conf"),
    ):
        source = os.path.join(root, name) if root else ""
        if dest in taken or not source or not os.path.isfile(source):
            continue
        out.append(
            {"destination": dest, "type": "bind", "source": source, "options": ["rbind", "rprivate", ro]}
        )
    if "/dev/shm" not in taken:
        ipc_host = inp.pod.config.linux.security_context.namespace_options.ipc == cri.NamespaceMode.NODE
        shm = "/dev/shm" if ipc_host else (os.path.join(root, "shm") if root else "")
        if shm and os.path.isdir(shm):
            out.append(
                {
                    "destination": "/dev/shm",
                    "type": "bind",
                    "source": shm,
                    "options": ["rbind", "rprivate", "rw"],
                }
            )
    return out


def with_rootfs_propagation(config: cri.ContainerConfig) -> oci.SpecOpt:
    """rslave/rshared mounts need the container's rootfs propagation to allow them (containerd's rule)."""
    kinds = {m.propagation for m in config.mounts}

    def opt(spec: oci.Spec) -> None:
        if cri.MountPropagation.PROPAGATION_BIDIRECTIONAL in kinds:
            spec.setdefault("linux", {})["rootfsPropagation"] = "rshared"
        elif cri.MountPropagation.PROPAGATION_HOST_TO_CONTAINER in kinds:
            spec.setdefault("linux", {})["rootfsPropagation"] = "rslave"

    return opt


def _device(host_path: str, container_path: str, permissions: str) -> tuple[dict[str, Any], dict[str, Any]]:
    st = os.stat(host_path)
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        raise InvalidArgument(f"device {host_path!r}: not a character or block device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    dev = {
        "path": container_path,
        "type": kind,
        "major": major,
        "minor": minor,
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }
    rule = {"allow": True, "type": kind, "major": major, "minor": minor, "access": permissions or "rwm"}
    return dev, rule


def devices(config: cri.ContainerConfig) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each config device (a directory: every device under it), as (linux.devices entry, cgroup rule)."""
    out = []
    for i, d in enumerate(config.devices):
        perms = d.permissions or "rwm"
        if set(perms) - set("rwm"):
            raise InvalidArgument(f"config.devices[{i}].permissions {perms!r}: only r, w and m are allowed")
        try:
            if os.path.isdir(d.host_path):
                for dirpath, _dirs, files in os.walk(d.host_path):
                    for name in sorted(files):
                        src = os.path.join(dirpath, name)
                        mode = os.lstat(src).st_mode
                        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                            rel = os.path.relpath(src, d.host_path)
                            out.append(_device(src, posixpath.join(d.container_path, rel), perms))
            else:
                out.append(_device(d.host_path, d.container_path, perms))
        except FileNotFoundError:
            raise NotFound(f"config.devices[{i}].host_path {d.host_path!r}: no such device") from None
    return out


def host_devices() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every device node under the host's /dev (privileged containers), as containerd's WithHostDevices."""
    out = []
    for dirpath, dirs, files in os.walk("/dev"):
        dirs[:] = [d for d in dirs if d not in ("pts", "shm", "fd", "mqueue")]
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            try:
                mode = os.lstat(path).st_mode
                if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and path != "/dev/console":
                    out.append(_device(path, path, "rwm"))
            except (OSError, InvalidArgument):
                continue
    return out


def with_devices(
    found: Iterable[tuple[dict[str, Any], dict[str, Any]]], allow_all: bool = False
) -> oci.SpecOpt:
    chosen = list(found)

    def opt(spec: oci.Spec) -> None:
        linux = spec.setdefault("linux", {})
        current = linux.setdefault("devices", [])
        known = {d["path"] for d in current}
        for dev, _rule in chosen:
            if dev["path"] not in known:
                current.append(dev)
                known.add(dev["path"])
        if not current:
            linux.pop("devices")
        rules = linux.setdefault("resources", {}).setdefault("devices", [])
        if allow_all:
            rules.append({"allow": True, "access": "rwm"})
        else:
            rules += [rule for _dev, rule in chosen]

    return opt


# -- namespaces ----------------------------------------------------------------------------


def with_pod_namespaces(inp: SpecInput) -> list[oci.SpecOpt]:
    ns = _security(inp.config).namespace_options
    pod_ns = inp.pod.config.linux.security_context.namespace_options
    opts: list[oci.SpecOpt] = []
    # network and uts follow the pod's network mode (the container's own is kubelet's copy of it)
    if pod_ns.network == cri.NamespaceMode.NODE or ns.network == cri.NamespaceMode.NODE:
        opts += [oci.with_host_namespace("network"), oci.with_host_namespace("uts")]
    else:
        if not inp.pod.netns_path:
            raise FailedPrecondition(f"sandbox {inp.pod.id}: has no network namespace to join")
        opts.append(oci.with_namespace_path("network", inp.pod.netns_path))
        if inp.pod.uts_path:
            opts.append(oci.with_namespace_path("uts", inp.pod.uts_path))
    if pod_ns.ipc == cri.NamespaceMode.NODE or ns.ipc == cri.NamespaceMode.NODE:
        opts.append(oci.with_host_namespace("ipc"))
    elif inp.pod.ipc_path:
        opts.append(oci.with_namespace_path("ipc", inp.pod.ipc_path))
    pid = ns.pid
    if pid == cri.NamespaceMode.NODE:
        opts.append(oci.with_host_namespace("pid"))
    elif pid == cri.NamespaceMode.POD:
        # POD is the enum's zero value: a pod without an infra process shares no PID namespace,
        # so its containers get their own (the pod's choice wins, kubelet copies it anyway)
        if inp.pod.infra_pid:
            opts.append(oci.with_namespace_path("pid", f"/proc/{inp.pod.infra_pid}/ns/pid"))
    elif pid == cri.NamespaceMode.TARGET:
        if not inp.target_pid:
            raise NotFound(
                f"config.linux.security_context.namespace_options.target_id {ns.target_id!r}: "
                "no running container to share the PID namespace of"
            )
        opts.append(oci.with_namespace_path("pid", f"/proc/{inp.target_pid}/ns/pid"))
    userns = ns.userns_options
    if _set(userns) and userns.mode not in (cri.NamespaceMode.NODE,):
        if not inp.features.idmap:
            raise Unimplemented(
                "config.linux.security_context.namespace_options.userns_options: user namespaces need "
                "id-mapped mounts, which the installed runc does not support (runc >= 1.2)"
            )
        opts.append(_with_userns(userns))
    return opts


def _with_userns(userns: cri.UserNamespace) -> oci.SpecOpt:
    def maps(items: Sequence[cri.IdMapping]) -> list[dict[str, int]]:
        return [{"containerID": m.container_id, "hostID": m.host_id, "size": m.length} for m in items]

    uids, gids = maps(userns.uids), maps(userns.gids)
    if not uids or not gids:
        raise InvalidArgument(
            "config.linux.security_context.namespace_options.userns_options: needs uids and gids"
        )

    def opt(spec: oci.Spec) -> None:
        oci.with_new_namespace("user")(spec)
        linux = spec.setdefault("linux", {})
        linux["uidMappings"], linux["gidMappings"] = uids, gids

    return opt


# -- security ------------------------------------------------------------------------------


def seccomp_choice(sc: cri.LinuxContainerSecurityContext) -> tuple[str, str]:
    """``("runtime/default" | "unconfined" | "localhost", path)`` from the profile or the deprecated path."""
    if _set(sc.seccomp):
        kind = sc.seccomp.profile_type
        if kind == cri.SecurityProfileProfileType.RuntimeDefault:
            return "runtime/default", ""
        if kind == cri.SecurityProfileProfileType.Unconfined:
            return "unconfined", ""
        if not sc.seccomp.localhost_ref.startswith("/"):
            raise InvalidArgument(
                f"config.linux.security_context.seccomp.localhost_ref {sc.seccomp.localhost_ref!r}: "
                "must be an absolute path"
            )
        return "localhost", sc.seccomp.localhost_ref
    path = sc.seccomp_profile_path
    if path in ("", "unconfined"):
        return "unconfined", ""
    if path in ("runtime/default", "docker/default"):
        return "runtime/default", ""
    if path.startswith("localhost/"):
        return "localhost", path.removeprefix("localhost")
    raise InvalidArgument(f"config.linux.security_context.seccomp_profile_path {path!r}: unknown profile")


def _load_profile(path: str) -> dict[str, Any]:
    import json

    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(MAX_FIELD_BYTES))
    except FileNotFoundError:
        raise NotFound(f"seccomp profile {path!r}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"seccomp profile {path!r}: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"seccomp profile {path!r}: not a JSON object")
    return doc


def with_security(inp: SpecInput) -> list[oci.SpecOpt]:
    sc = _security(inp.config)
    opts: list[oci.SpecOpt] = []
    if sc.privileged:
        if not _pod_security(inp.pod).privileged:
            raise InvalidArgument(
                "config.linux.security_context.privileged: no privileged container allowed in sandbox "
                f"{inp.pod.id} (its security_context.privileged is false)"
            )
        opts.append(oci.with_privileged())
    else:
        caps = sc.capabilities
        if caps.add_capabilities or caps.drop_capabilities:
            try:
                opts.append(oci.with_capabilities(caps.add_capabilities, caps.drop_capabilities))
            except InvalidArgument as exc:
                raise InvalidArgument(f"config.linux.security_context.capabilities: {exc.message}") from None
        if caps.add_ambient_capabilities:
            opts.append(_with_ambient(caps.add_ambient_capabilities))
        if sc.masked_paths:
            opts.append(oci.with_masked_paths(sc.masked_paths))
        if sc.readonly_paths:
            opts.append(oci.with_readonly_paths(sc.readonly_paths))
        kind, path = seccomp_choice(sc)
        if kind == "runtime/default":
            opts.append(oci.with_default_seccomp())
        elif kind == "localhost":
            opts.append(oci.with_seccomp(_load_profile(path)))
    if sc.readonly_rootfs:
        opts.append(oci.with_readonly_rootfs(True))
    opts.append(oci.with_no_new_privileges(sc.no_new_privs))
    if sc.apparmor_profile or (_set(sc.apparmor) and sc.apparmor.profile_type != 1):
        log.info("cri.apparmor_ignored", container=inp.container_id, reason="AppArmor not supported here")
    if _set(sc.selinux_options):
        log.info("cri.selinux_ignored", container=inp.container_id, reason="SELinux not supported here")
    return opts


def _with_ambient(names: Sequence[str]) -> oci.SpecOpt:
    """Ambient capabilities must also be inheritable and permitted; add them to every set."""
    try:
        caps = [oci._normalise_cap(n) for n in names]
    except InvalidArgument as exc:
        raise InvalidArgument(
            f"config.linux.security_context.capabilities.add_ambient_capabilities: {exc.message}"
        ) from None
    if "ALL" in caps:
        raise InvalidArgument(
            "config.linux.security_context.capabilities.add_ambient_capabilities: ALL is not allowed"
        )

    def opt(spec: oci.Spec) -> None:
        sets = spec.setdefault("process", {}).setdefault("capabilities", {})
        for key in ("bounding", "effective", "permitted", "inheritable", "ambient"):
            current = sets.setdefault(key, [])
            current += [c for c in caps if c not in current]

    return opt


def with_sysctls(sysctls: Mapping[str, str]) -> oci.SpecOpt:
    chosen = dict(sysctls)

    def opt(spec: oci.Spec) -> None:
        if chosen:
            spec.setdefault("linux", {}).setdefault("sysctl", {}).update(chosen)

    return opt


def spec_annotations(inp: SpecInput) -> dict[str, str]:
    md = inp.pod.config.metadata
    return {
        ANN_CONTAINER_TYPE: CONTAINER_TYPE,
        ANN_SANDBOX_ID: inp.pod.id,
        ANN_SANDBOX_NAME: md.name,
        ANN_SANDBOX_NAMESPACE: md.namespace,
        ANN_SANDBOX_UID: md.uid,
        ANN_CONTAINER_NAME: inp.config.metadata.name,
        ANN_IMAGE_NAME: inp.image_name,
    }


# -- the whole spec ------------------------------------------------------------------------


def container_spec(inp: SpecInput) -> oci.Spec:
    """The OCI spec of the container (module doc). Blocking: reads the rootfs and host files.

    Image mounts of ``inp.config`` must be mounted already (:func:`.imagevolume.mount_images`).
    """
    validate_config(inp.config, image_volumes_mounted=True)
    config, sc = inp.config, _security(inp.config)
    for i, m in enumerate(config.mounts):
        if m.recursive_read_only and not inp.features.rro:
            raise Unimplemented(
                f"config.mounts[{i}].recursive_read_only: the installed runc does not support rro mounts"
            )
    user = resolve_user(inp)
    mounts = cri_mounts(config)
    taken = {m["destination"] for m in mounts}
    mounts = sandbox_mounts(inp, taken) + mounts
    found = host_devices() if sc.privileged else []
    found += devices(config)
    opts: list[oci.SpecOpt] = [
        with_process(inp),
        with_resolved_user(user),
        *with_pod_namespaces(inp),
        *with_security(inp),
        oci.with_mounts(mounts),
        with_rootfs_propagation(config),
        with_devices(found, allow_all=sc.privileged),
        with_sysctls(inp.pod.config.linux.sysctls),
        with_resources(config.linux.resources),
        oci.with_cgroups_path(cgroups_path(inp.pod, inp.container_id, inp.cgroup_driver)),
        oci.with_annotations(spec_annotations(inp)),
    ]
    return oci.generate(inp.container_id, *opts, namespace=K8S_NAMESPACE)


def default_seccomp_profile(spec: oci.Spec) -> dict[str, Any]:
    """The RuntimeDefault profile for a spec's bounding set (used by tests and verbose status)."""
    return seccomp.default_profile(spec.get("process", {}).get("capabilities", {}).get("bounding", []))
