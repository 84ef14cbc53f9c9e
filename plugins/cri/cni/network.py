"""A pod's network through CNI: ADD, DEL and CHECK of the conf dir's network.

:class:`CniNetwork` is what the CRI plugin holds. It reads the network from
``conf_dir`` on every call (a config dropped in later makes the network
ready, as containerd's directory watch does), runs the list's plugins in
order for ADD and in reverse for DEL, and keeps each ADD result in the cache
(:mod:`.cache`) so DEL and CHECK after a restart run with the config and
``prevResult`` that ADD had.

The loopback network (``lo`` up in the pod) is attached first, as go-cni's
``WithLoNetwork`` does, unless ``loopback=False``.

Contract for callers:

* ``add`` either attaches the pod completely or raises after undoing what it
  did (a DEL of the list, IPs released, veth gone): no half-made network.
* ``delete`` is idempotent: DEL of a container never added, twice, or after
  its netns is gone succeeds (a netns that is no longer pinned is passed to
  the plugins as an empty ``CNI_NETNS``, as the spec asks).
* Calls for one container are serialized; different containers run concurrently.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.errors import BerthError, FailedPrecondition, InvalidArgument, NotFound
from plugins.cri import netns
from plugins.cri.cni import cache
from plugins.cri.cni.config import NetworkConfigList, load_default, version_tuple
from plugins.cri.cni.invoke import DEFAULT_BIN_DIRS, DEFAULT_TIMEOUT, Invocation, exec_plugin, find_plugin
from plugins.cri.cni.result import CniResult, parse_result

log = structlog.get_logger("berth.cri.cni")

_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")

LOOPBACK = NetworkConfigList(
    name="cni-loopback",
    cni_version="1.0.0",
    plugins=({"type": "loopback"},),
    source=Path("<builtin loopback>"),
)


@dataclass(frozen=True)
class PodRef:
    """The pod a sandbox belongs to; it becomes the ``K8S_POD_*`` part of ``CNI_ARGS``."""

    namespace: str
    name: str
    uid: str = ""

    def cni_args(self, sandbox_id: str) -> tuple[tuple[str, str], ...]:
        return (
            ("K8S_POD_NAMESPACE", self.namespace),
            ("K8S_POD_NAME", self.name),
            ("K8S_POD_INFRA_CONTAINER_ID", sandbox_id),
            ("K8S_POD_UID", self.uid),
        )


@dataclass(frozen=True)
class NetworkStatus:
    """Whether pods can be networked; ``message`` says why not (CRI's NetworkReady condition)."""

    ready: bool
    message: str = ""
    network: str = ""


def _check_ids(container_id: str, ifname: str) -> None:
    if not _ID.match(container_id):
        raise InvalidArgument(f"container id {container_id!r}: must be letters, digits, '_', '.' or '-'")
    if (
        not ifname
        or len(ifname) > 15
        or "/" in ifname
        or ifname in (".", "..")
        or any(c.isspace() for c in ifname)
    ):
        raise InvalidArgument(f"ifname {ifname!r}: must be 1-15 characters, no '/' or spaces")


class CniNetwork:
    """The conf dir's network for pods; see the module docstring for the contract."""

    def __init__(
        self,
        conf_dir: str | os.PathLike[str],
        cache_dir: str | os.PathLike[str],
        *,
        bin_dirs: Sequence[str | os.PathLike[str]] = DEFAULT_BIN_DIRS,
        timeout: float = DEFAULT_TIMEOUT,
        loopback: bool = True,
    ) -> None:
        self.conf_dir = Path(conf_dir)
        self.cache_dir = Path(cache_dir)
        self.bin_dirs = tuple(bin_dirs)
        self.timeout = timeout
        self.loopback = loopback
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    # -- configuration -------------------------------------------------------------

    async def config(self) -> NetworkConfigList:
        """The network ADD would use now; FailedPrecondition "no network config found in <dir>"."""
        return await asyncio.to_thread(load_default, self.conf_dir)

    async def status(self) -> NetworkStatus:
        """Ready when the conf dir has a valid network; otherwise the reason."""
        try:
            network = await self.config()
        except FailedPrecondition as exc:
            return NetworkStatus(False, exc.message)
        return NetworkStatus(True, "", network.name)

    # -- operations ----------------------------------------------------------------

    async def add(
        self,
        container_id: str,
        netns_path: str | os.PathLike[str],
        *,
        pod: PodRef | None = None,
        ifname: str = "eth0",
        capability_args: Mapping[str, Any] | None = None,
    ) -> CniResult:
        """Attach the sandbox ``container_id`` whose netns is pinned at ``netns_path``.

        ``capability_args`` become ``runtimeConfig`` of the plugins that
        declare the capability (``{"portMappings": [{"hostPort": 8080,
        "containerPort": 80, "protocol": "tcp", "hostIP": ""}]}``).
        """
        _check_ids(container_id, ifname)
        network = await self.config()
        args = (("IgnoreUnknown", "1"), *(pod.cni_args(container_id) if pod else ()))
        call = Invocation(container_id, os.fspath(netns_path), ifname, args)
        call.cni_args()  # InvalidArgument for a bad pod name before anything runs
        caps = dict(capability_args or {})
        async with self._lock(container_id):
            try:
                if self.loopback:
                    lo = Invocation(container_id, call.netns, "lo", args)
                    await self._run_list(LOOPBACK, "ADD", lo, None)
                raw = await self._run_list(network, "ADD", call, caps)
                result = parse_result(raw, network.plugins[-1]["type"])
                entry = cache.CacheEntry(container_id, ifname, network, raw, args, caps or None)
                await asyncio.to_thread(cache.save, self.cache_dir, entry)
            except BaseException as exc:
                log.warning("cni.add.failed", container=container_id, network=network.name, error=str(exc))
                await self._undo(network, call, caps)
                raise
        log.info("cni.add", container=container_id, network=network.name, ip=result.pod_ip)
        return result

    async def delete(
        self,
        container_id: str,
        netns_path: str | os.PathLike[str] | None,
        *,
        pod: PodRef | None = None,
        ifname: str = "eth0",
    ) -> None:
        """Detach ``container_id``: DEL of the list it was added with, in reverse; idempotent.

        Without a cached ADD (never added, or already deleted) the current
        network is used, and without any network there is nothing to do.
        """
        _check_ids(container_id, ifname)
        async with self._lock(container_id):
            entry = await asyncio.to_thread(cache.load, self.cache_dir, container_id, ifname)
            if entry is not None:
                network, args, caps, prev = entry.network, entry.cni_args, entry.capability_args, entry.result
            else:
                try:
                    network = await self.config()
                except FailedPrecondition:
                    log.info("cni.del.nothing", container=container_id, reason="no cache and no config")
                    return
                args = (("IgnoreUnknown", "1"), *(pod.cni_args(container_id) if pod else ()))
                caps, prev = None, None
            path = os.fspath(netns_path) if netns_path and netns.is_pinned(netns_path, "net") else ""
            call = Invocation(container_id, path, ifname, args)
            await self._run_list(network, "DEL", call, caps, prev)
            if self.loopback:
                await self._run_list(LOOPBACK, "DEL", Invocation(container_id, path, "lo", args), None)
            await asyncio.to_thread(cache.remove, self.cache_dir, network.name, container_id, ifname)
        log.info("cni.del", container=container_id, network=network.name, netns=path or None)

    async def check(
        self, container_id: str, netns_path: str | os.PathLike[str], *, ifname: str = "eth0"
    ) -> None:
        """CHECK the attachment against its cached ADD result.

        NotFound if ``container_id`` was never added; a no-op for networks
        with ``disableCheck`` or a spec version before 0.4.0 (no CHECK there).
        """
        _check_ids(container_id, ifname)
        async with self._lock(container_id):
            entry = await asyncio.to_thread(cache.load, self.cache_dir, container_id, ifname)
            if entry is None:
                raise NotFound(f"CNI attachment of container {container_id!r} ({ifname}): not found")
            network = entry.network
            if network.disable_check or version_tuple(network.cni_version) < (0, 4, 0):
                return
            call = Invocation(container_id, os.fspath(netns_path), ifname, entry.cni_args)
            await self._run_list(network, "CHECK", call, entry.capability_args, entry.result)

    # -- internals -----------------------------------------------------------------

    def _lock(self, container_id: str) -> _KeyedLock:
        return _KeyedLock(self._locks, container_id)

    async def _run_list(
        self,
        network: NetworkConfigList,
        command: str,
        call: Invocation,
        caps: Mapping[str, Any] | None,
        prev: dict[str, Any] | None = None,
        *,
        best_effort: bool = False,
    ) -> Any:
        """Run the list: ADD chains each result into the next; DEL (reversed) and CHECK pass ``prev``.

        ADD first makes sure every binary exists, so a missing one touches nothing.
        ``best_effort`` (the undo of a failed ADD) goes on past a failing plugin
        and raises the first error at the end.
        """
        if command == "ADD":
            for plugin in network.plugins:
                find_plugin(str(plugin["type"]), self.bin_dirs)
        plugins = reversed(network.plugins) if command == "DEL" else iter(network.plugins)
        # Before 0.4.0 DEL got no prevResult (libcni does the same).
        if command == "DEL" and version_tuple(network.cni_version) < (0, 4, 0):
            prev = None
        first_error: BerthError | None = None
        for plugin in plugins:
            try:
                out = await exec_plugin(
                    plugin,
                    command,
                    call,
                    name=network.name,
                    cni_version=network.cni_version,
                    bin_dirs=self.bin_dirs,
                    prev_result=prev,
                    capability_args=caps,
                    timeout=self.timeout,
                )
            except BerthError as exc:
                if not best_effort:
                    raise
                log.warning("cni.plugin.failed", plugin=plugin["type"], command=command, error=exc.message)
                first_error = first_error or exc
                continue
            if command == "ADD":
                if not isinstance(out, dict):
                    raise FailedPrecondition(f"CNI plugin {plugin['type']} ADD: returned no result")
                prev = out
        if first_error is not None:
            raise first_error
        return prev

    async def _undo(self, network: NetworkConfigList, call: Invocation, caps: Mapping[str, Any]) -> None:
        """Best-effort DEL after a failed ADD, shielded so a cancelled ADD still releases its IP."""

        async def undo() -> None:
            for net, inv, c in (
                (network, call, caps),
                (LOOPBACK, Invocation(call.container_id, call.netns, "lo", call.args), None),
            ):
                if net is LOOPBACK and not self.loopback:
                    continue
                try:
                    await self._run_list(net, "DEL", inv, c, best_effort=True)
                except (BerthError, OSError) as exc:
                    log.warning("cni.add.undo_failed", container=call.container_id, error=str(exc))
            await asyncio.to_thread(
                cache.remove, self.cache_dir, network.name, call.container_id, call.ifname
            )

        await asyncio.shield(undo())


class _KeyedLock:
    """One asyncio.Lock per key, dropped from the map when its last user leaves."""

    def __init__(self, locks: dict[str, tuple[asyncio.Lock, int]], key: str) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._key, (asyncio.Lock(), 0))
        self._locks[self._key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._locks[self._key][0].release()
        self._leave()

    def _leave(self) -> None:
        lock, users = self._locks[self._key]
        if users == 1:
            del self._locks[self._key]
        else:
            self._locks[self._key] = (lock, users - 1)
