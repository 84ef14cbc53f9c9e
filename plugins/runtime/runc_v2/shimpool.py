"""The shims of the runc v2 runtime: one per group, started on demand or ahead of the group's first task.

Tasks of a group (a pod: the ``io.containerd.runc.v2.group`` or
``io.kubernetes.cri.sandbox-id`` annotation) share one :class:`~.shims.Shim`,
others get their own. The pool knows which shim serves which group, starts
shims (through berth's zygote, or the configured binary's ``start``
bootstrap), shuts them down once they serve no task, and keeps the shims
prepared for a pod before its first container (their group directory under
``<state>/<PREPARED>``) so that a restart finds and cleans them.

What a dead shim's tasks become is the manager's business: it is told through
``on_gone`` and calls :meth:`ShimPool.forget_gone` for the pool's part.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import shutil
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import betterproto.lib.google.protobuf as pb
import structlog

from daemon.errors import BerthError, Unavailable
from plugins.runtime.runc_v2.bundle import PREPARED, Bundle, walk
from plugins.runtime.runc_v2.settings import Settings
from plugins.runtime.runc_v2.shim.main import Layout
from plugins.runtime.runc_v2.shims import Shim, bootstrap_delete, bootstrap_start, remove_stale_socket
from protos.containerd.task.v2 import DeleteResponse, ShutdownRequest

log = structlog.get_logger("berth.runtime")

GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
SHUTDOWN_TIMEOUT = 10.0


class ShimPool:
    """The live shims by (namespace, group); ``on_gone`` is every shim's supervisor (the manager's)."""

    def __init__(self, settings: Settings, on_gone: Callable[[Shim], Coroutine[Any, Any, None]]) -> None:
        self.settings = settings
        self._on_gone = on_gone
        self._groups: dict[tuple[str, str], Shim] = {}
        self._preparing: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._group_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._zygote: Any = None

    def _group_lock(self, namespace: str, group: str) -> asyncio.Lock:
        return self._group_locks.setdefault((namespace, group), asyncio.Lock())

    def register(self, shim: Shim) -> None:
        if shim.group:
            self._groups[(shim.namespace, shim.group)] = shim

    def _forget(self, shim: Shim) -> None:
        key = (shim.namespace, shim.group)
        if self._groups.get(key) is shim:
            del self._groups[key]

    async def _connect(self, namespace: str, address: str) -> Shim:
        return await Shim.connect(
            namespace=namespace, address=address, binary=self.settings.shim_binary, on_gone=self._on_gone
        )

    async def _start_shim(self, namespace: str, container_id: str, bundle: Bundle, options: pb.Any) -> str:
        s = self.settings
        if not s.runtime_binary:
            zygote = await self._zygote_client()
            if zygote is not None:
                address: str = await zygote.start_shim(
                    namespace=namespace,
                    id=container_id,
                    address=s.address,
                    ttrpc_address=s.ttrpc_address,
                    bundle=str(bundle.path),
                    debug=s.shim_debug,
                )
                return address
        return await bootstrap_start(
            s.shim_binary,
            bundle=bundle.path,
            namespace=namespace,
            id=container_id,
            address=s.address,
            ttrpc_address=s.ttrpc_address,
            publish_binary=s.publish_binary,
            debug=s.shim_debug,
            stdin=bytes(options),
            env={"BERTH_SHIM_STATE": str(s.shim_state)},
        )

    async def _zygote_client(self) -> Any:
        """berth's fork server, started on first use; None until the zygote module exists."""
        if self._zygote is None:
            try:
                module = importlib.import_module("plugins.runtime.runc_v2.shim.zygote")
            except ImportError:
                self._zygote = False
                return None
            self._zygote = await module.ZygoteClient.spawn(
                self.settings.shim_state, debug=self.settings.shim_debug
            )
        return self._zygote or None

    async def shim_for(
        self, namespace: str, group: str, container_id: str, bundle: Bundle, options: pb.Any
    ) -> Shim:
        """The live shim of ``group`` (reused) or a new one started in ``bundle``; counts the task on it."""
        async with self._group_lock(namespace, group):
            shim = self._groups.get((namespace, group))
            if shim is None or shim.gone.is_set():
                address = await self._start_shim(namespace, container_id, bundle, options)
                shim = await self._connect(namespace, address)
                shim.group = group
                self.register(shim)
                log.info("shim.started", namespace=namespace, group=group, pid=shim.pid, address=address)
            shim.tasks.add(container_id)
            await asyncio.to_thread(bundle.write_shim, shim.address, shim.binary)
            return shim

    async def release(self, shim: Shim) -> None:
        """Shut ``shim`` down once it serves no task (it exits itself); the connection is closed."""
        async with self._group_lock(shim.namespace, shim.group):
            if shim.tasks:
                return
            self._forget(shim)
            shim.expect_exit()
            if not shim.gone.is_set():
                try:
                    await shim.call(
                        "Shutdown", ShutdownRequest(id=shim.group), pb.Empty, timeout=SHUTDOWN_TIMEOUT
                    )
                except Unavailable:
                    pass  # it exited while answering
                except BerthError as exc:
                    log.warning("shim.shutdown_failed", pid=shim.pid, error=str(exc))
                if not await shim.wait_gone(SHUTDOWN_TIMEOUT):
                    log.warning("shim.still_running", pid=shim.pid, address=shim.address)
            await shim.close()
            if shim.prepared:
                await self._group_dir(shim.namespace, shim.group).remove()

    async def forget_gone(self, shim: Shim) -> None:
        """The pool's part of a shim's death: it serves its group no more; a prepared one's traces go."""
        self._forget(shim)
        if shim.prepared:
            async with self._group_lock(shim.namespace, shim.group):
                if not shim.tasks:
                    await self._forget_dead_prepared(shim.namespace, shim.group, shim.address)
                await self._group_dir(shim.namespace, shim.group).remove()

    # -- shims started ahead of their group's first task -----------------------

    def _group_dir(self, namespace: str, group: str) -> Bundle:
        return Bundle(self.settings.state / PREPARED, namespace, group)

    def prepare(self, namespace: str, group: str) -> None:
        """Start ``group``'s shim in the background (see daemon.protocols.TaskManager.prepare_shim).

        Only berth's own shim forked by the zygote is prepared (another shim
        binary may group differently). A failure is logged: the group's first
        create then starts the shim as it always did.
        """
        key = (namespace, group)
        if self.settings.runtime_binary or key in self._preparing or key in self._groups:
            return
        job = asyncio.create_task(self._prepare(namespace, group), name=f"prepare-shim-{group[:16]}")
        self._preparing[key] = job

        def done(finished: asyncio.Task[None]) -> None:
            if self._preparing.get(key) is finished:
                del self._preparing[key]

        job.add_done_callback(done)

    async def _prepare(self, namespace: str, group: str) -> None:
        try:
            async with self._group_lock(namespace, group):
                found = self._groups.get((namespace, group))
                if found is not None and not found.gone.is_set():
                    return
                place = self._group_dir(namespace, group)
                await asyncio.to_thread(place.create_group)
                try:
                    address = await self._start_shim(namespace, group, place, pb.Any())
                    shim = await self._connect(namespace, address)
                except Exception:
                    # (cancelled, it stays: the shim may start still, and recovery finds it through it)
                    await place.remove()
                    raise
                shim.group, shim.prepared = group, True
                self.register(shim)
                log.info("shim.prepared", namespace=namespace, group=group, pid=shim.pid, address=address)
        except (BerthError, OSError) as exc:
            log.warning("shim.prepare_failed", namespace=namespace, group=group, error=str(exc))

    async def release_idle(self, namespace: str, group: str) -> None:
        """Shut ``group``'s shim down if it serves no task (a prepare still running is waited for)."""
        preparing = self._preparing.get((namespace, group))
        if preparing is not None:
            await asyncio.wait([preparing])
        shim = self._groups.get((namespace, group))
        if shim is not None and not shim.tasks:
            await self.release(shim)

    async def recover_prepared(self) -> int:
        """After a restart: group directories whose shim serves no adopted task are cleaned; how many.

        Such a shim (prepared, its pod never started a container before berthd
        went down) is shut down, a dead one's socket and state removed, and the
        directory goes. One whose group has adopted tasks is kept as prepared.
        """
        places = await asyncio.to_thread(lambda: list(walk(self.settings.state / PREPARED)))
        cleaned = 0
        for place in places:
            address = await asyncio.to_thread(place.read_address)
            serving = self._groups.get((place.namespace, place.id))
            if serving is not None and address and serving.address == address:
                serving.prepared = True
                continue
            if address:
                try:
                    found = await self._connect(place.namespace, address)
                except BerthError:
                    await self._forget_dead_prepared(place.namespace, place.id, address)
                else:
                    found.group = place.id
                    await self.release(found)
            await place.remove()
            cleaned += 1
            log.info("recovery.prepared_shim_cleaned", namespace=place.namespace, group=place.id)
        return cleaned

    async def _forget_dead_prepared(self, namespace: str, group: str, address: str) -> None:
        """A prepared shim that died: its socket and state directory (nothing else of it exists)."""
        await asyncio.to_thread(remove_stale_socket, address)
        layout = Layout(str(self.settings.shim_state), namespace, group, self.settings.address)
        await asyncio.to_thread(shutil.rmtree, layout.dir, True)

    async def bootstrap_delete(self, binary: str, bundle: Bundle) -> DeleteResponse | None:
        """``<binary> delete`` in ``bundle``: runc container and rootfs mount gone; None if it failed."""
        s = self.settings
        try:
            return await bootstrap_delete(
                binary,
                bundle=bundle.path,
                namespace=bundle.namespace,
                id=bundle.id,
                address=s.address,
                ttrpc_address=s.ttrpc_address,
                publish_binary=s.publish_binary,
                env={"BERTH_SHIM_STATE": str(s.shim_state)},
            )
        except BerthError as exc:
            log.warning("shim.delete_failed", bundle=str(bundle.path), error=str(exc))
            return None

    async def close(self, serving: Iterable[Shim]) -> None:
        """Drop connections to the group shims and ``serving`` (they keep running), stop the zygote."""
        # a shim being prepared now is found by the next start's recovery through its group directory
        preparing = list(self._preparing.values())
        for job in preparing:
            job.cancel()
        await asyncio.gather(*preparing, return_exceptions=True)
        shims = {id(s): s for s in serving} | {id(s): s for s in self._groups.values()}
        for shim in shims.values():
            shim.expect_exit()
            await shim.close()
        if self._zygote:
            with contextlib.suppress(Exception):
                await self._zygote.close()
