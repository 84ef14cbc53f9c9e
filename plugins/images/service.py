"""The images service: the Python API the CRI, the native Images service and the CLI call.

:class:`ImageService` owns the registry client and wires the pieces of the
plugin together: pulls (:mod:`.pull`, streaming unpack in :mod:`.unpack`),
image records with their events, unpacking content already present,
import and export of archives (:mod:`.archive`). Every call takes the
namespace first, as the metadata stores do.

Leases: every operation that writes content or snapshots (pull, import,
unpack) runs under a lease of its own (``containerd.io/gc.expire`` =
now + ``pull_lease_expiry``), so a garbage collection running meanwhile
keeps what it wrote, and deletes that lease once the image record (or the
config label naming the unpacked chain) references everything. A berthd
killed in the middle leaves the lease behind: the next attempt reuses every
blob and snapshot it holds, until it expires and GC takes them.

Events (containerd's, on the daemon's bus): ``/images/create``,
``/images/update``, ``/images/delete`` with
``containerd.services.images.v1.ImageCreate``/``ImageUpdate``/``ImageDelete``,
published by every method here that changes a record; and pull progress on
``/images/pull/progress`` (:mod:`.progress`).

Identical concurrent pulls (same namespace, reference, platform,
snapshotter, credentials and labels, e.g. kubelet starting two pods of one
image) share one pull; it is cancelled only when every caller has gone.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import structlog

from daemon.errors import AlreadyExists, BerthError, NotFound
from daemon.metadata.db import MetadataDB
from daemon.metadata.gc import LABEL_GC_EXPIRE
from daemon.metadata.images import Image
from daemon.metadata.leases import LeaseResource
from daemon.protocols import Applier, ByteStream, Descriptor, Kind, RegistryCredentials
from daemon.reference import parse_reference
from plugins.images.archive import ArchiveSink, export_archive, import_archive
from plugins.images.blobs import LocalImage, add_labels, has_blob, local_image, snapshot_label
from plugins.images.config import ImagesConfig
from plugins.images.progress import ProgressCallback, ProgressTracker, Publisher
from plugins.images.pull import Puller, run_all
from plugins.images.registry.client import RegistryClient
from plugins.images.registry.platforms import Platform, default_platform, parse_platform
from plugins.images.unpack import LayerFeed, Unpacker
from protos.containerd.services.images.v1 import ImageCreate, ImageDelete, ImageUpdate

log = structlog.get_logger("berth.images")

TOPIC_CREATE = "/images/create"
TOPIC_UPDATE = "/images/update"
TOPIC_DELETE = "/images/delete"

#: Leases of this service's operations start with these (``pull-<hex>``, ...).
LEASE_PREFIXES = ("pull-", "unpack-", "import-")


@dataclass
class _PullJob:
    task: asyncio.Task[Image]
    tracker: ProgressTracker
    waiters: int = 0
    callbacks: list[ProgressCallback] = field(default_factory=list)


class ImageService:
    """Pull, unpack, import, export and keep image records; see the module docstring.

    ``client`` defaults to a :class:`RegistryClient` built from ``config``
    (one aiohttp session, closed by :meth:`close`).
    """

    def __init__(
        self,
        db: MetadataDB,
        applier: Applier,
        *,
        config: ImagesConfig | None = None,
        bus: Publisher | None = None,
        client: RegistryClient | None = None,
    ) -> None:
        self.db = db
        self.applier = applier
        self.config = config or ImagesConfig()
        self.bus = bus
        self.client = client or RegistryClient.from_config(self.config)
        self._own_client = client is None
        self.puller = Puller(
            db,
            applier,
            self.client,
            max_concurrent_downloads=self.config.max_concurrent_downloads,
            tee_backlog=self.config.tee_backlog,
        )
        self._pulls: dict[tuple[object, ...], _PullJob] = {}

    async def close(self) -> None:
        """Cancel pulls in flight, close the registry client (if this service made it)."""
        jobs = list(self._pulls.values())
        for job in jobs:
            job.task.cancel()
        for job in jobs:
            with contextlib.suppress(BaseException):  # each pull's caller got its error
                await job.task
        if self._own_client:
            await self.client.close()

    async def cleanup_interrupted(self) -> int:
        """Remove the half-applied snapshots of pulls, imports and unpacks a crash interrupted.

        Call it at start, before any pull (the plugin's init does). Such a
        snapshot (``extract-<random>-<chainid>``, ACTIVE) can never be used
        again: keys are unique per attempt. Everything else the dead
        operation's lease holds is kept until the lease expires, so the next
        attempt reuses the verified blobs, the committed layers and resumes
        the partial downloads. Returns how many snapshots were removed.
        """
        removed = 0
        for ns in await self.db.namespaces.list():
            for lease in await self.db.leases.list(ns.name):
                if not lease.id.startswith(LEASE_PREFIXES):
                    continue
                for res in await self.db.leases.list_resources(ns.name, lease.id):
                    sn_name = res.type.removeprefix("snapshots/")
                    if sn_name == res.type or not res.id.startswith("extract-"):
                        continue
                    sn = self.db.snapshotters.get(sn_name)
                    if sn is None:
                        continue
                    try:
                        info = await sn.stat(ns.name, res.id)
                        if info.kind is Kind.ACTIVE:
                            await sn.remove(ns.name, res.id)
                            removed += 1
                    except NotFound:
                        continue
                    except BerthError as exc:
                        log.warning("images.cleanup_failed", namespace=ns.name, key=res.id, error=str(exc))
        if removed:
            log.info("images.cleanup", snapshots=removed)
        return removed

    # -- platform and snapshotter defaults ----------------------------------------------

    def platform(self, platform: str | Platform | None = None) -> Platform:
        """The platform a request means: its own, else the configured one, else the host's."""
        if isinstance(platform, Platform):
            return platform
        spec = platform or self.config.platform
        return parse_platform(spec) if spec else default_platform()

    def snapshotter_name(self, snapshotter: str | None = None) -> str:
        return snapshotter or self.config.snapshotter

    # -- records ------------------------------------------------------------------------

    async def get(self, namespace: str, name: str) -> Image:
        return await self.db.images.get(namespace, name)

    async def list(self, namespace: str, filters: Sequence[str] = ()) -> builtins.list[Image]:
        return await self.db.images.list(namespace, filters)

    async def create(self, namespace: str, image: Image) -> Image:
        """Record ``image``; AlreadyExists if the name is taken. Publishes ``/images/create``."""
        created = await self.db.images.create(namespace, image)
        self._publish(TOPIC_CREATE, ImageCreate(name=created.name, labels=dict(created.labels)), namespace)
        return created

    async def update(self, namespace: str, image: Image, fieldpaths: Sequence[str] = ()) -> Image:
        """Change a record (see :meth:`ImageStore.update`). Publishes ``/images/update``."""
        updated = await self.db.images.update(namespace, image, fieldpaths)
        self._publish(TOPIC_UPDATE, ImageUpdate(name=updated.name, labels=dict(updated.labels)), namespace)
        return updated

    async def remove(self, namespace: str, name: str, *, target_digest: str = "", sync: bool = False) -> None:
        """Delete the record (its blobs and snapshots go with the next GC, at once if ``sync``).

        Publishes ``/images/delete``. NotFound if there is no such image (or
        it no longer points at ``target_digest``).
        """
        await self.db.images.delete(namespace, name, target_digest=target_digest)
        self._publish(TOPIC_DELETE, ImageDelete(name=name), namespace)
        if sync:
            await self.db.gc.run_now()

    async def save(
        self, namespace: str, name: str, target: Descriptor, labels: Mapping[str, str] | None = None
    ) -> Image:
        """Point ``name`` at ``target``: create the record, or update its target (and these labels).

        containerd's ``createNewImage``: a record removed meanwhile is
        created again. Publishes ``/images/create`` or ``/images/update``.
        """
        labels = dict(labels or {})
        while True:
            try:
                return await self.create(namespace, Image(name, target, labels))
            except AlreadyExists:
                pass
            paths = ["target", *(f"labels.{key}" for key in labels)]
            try:
                return await self.update(namespace, Image(name, target, labels), paths)
            except NotFound:
                continue

    # -- pull ----------------------------------------------------------------------------

    async def pull(
        self,
        namespace: str,
        ref: str,
        *,
        platform: str | Platform | None = None,
        auth: RegistryCredentials | None = None,
        progress: ProgressCallback | None = None,
        labels: Mapping[str, str] | None = None,
        snapshotter: str | None = None,
        unpack: bool = True,
    ) -> Image:
        """Pull ``ref`` into ``namespace`` and record it; the image record.

        ``platform`` chooses from an index (default: config, then host);
        ``auth`` replaces the configured credentials of the registry host;
        ``progress`` is called after every change (see :mod:`.progress`);
        ``labels`` are set on the record; the layers are unpacked into
        ``snapshotter`` (default: config) unless ``unpack`` is False.
        """
        reference = parse_reference(ref)
        plat = self.platform(platform)
        sn_name = self.snapshotter_name(snapshotter) if unpack else ""
        if sn_name:
            self.db.snapshotter(sn_name)  # NotFound now rather than after the download
        label_map = dict(labels or {})
        key = (
            namespace,
            str(reference),
            str(plat),
            sn_name,
            auth.key if auth else "",
            tuple(sorted(label_map.items())),
        )
        job = self._pulls.get(key)
        if job is None or job.task.done():
            tracker = ProgressTracker(namespace, str(reference), bus=self.bus)
            task = asyncio.get_running_loop().create_task(
                self._pull(namespace, str(reference), plat, auth, label_map, sn_name, tracker),
                name=f"berth-pull-{reference}",
            )
            job = self._pulls[key] = _PullJob(task, tracker)
            task.add_done_callback(functools.partial(self._forget, key, job))
        else:
            log.info("pull.join", namespace=namespace, ref=str(reference))
        job.tracker.add_callback(progress)
        job.waiters += 1
        try:
            return await asyncio.shield(job.task)
        except asyncio.CancelledError:
            if not job.task.done() and job.waiters == 1:
                job.task.cancel()  # the last caller went away
            raise
        finally:
            job.waiters -= 1
            if progress is not None and progress in job.tracker.callbacks:
                job.tracker.callbacks.remove(progress)

    def _forget(self, key: tuple[object, ...], job: _PullJob, _task: object = None) -> None:
        if self._pulls.get(key) is job:
            del self._pulls[key]

    async def _pull(
        self,
        namespace: str,
        ref: str,
        platform: Platform,
        auth: RegistryCredentials | None,
        labels: dict[str, str],
        snapshotter: str,
        tracker: ProgressTracker,
    ) -> Image:
        reference = parse_reference(ref)
        started = asyncio.get_running_loop().time()
        log.info("pull.start", namespace=namespace, ref=ref, platform=str(platform), snapshotter=snapshotter)
        try:
            async with self.lease(namespace, "pull") as lease:
                result = await self.puller.pull(
                    namespace,
                    reference,
                    lease,
                    platform=platform,
                    credentials=auth,
                    snapshotter=snapshotter or None,
                    tracker=tracker,
                )
                image = await self.save(namespace, result.name, result.image.target, labels)
        except BaseException as exc:
            log.warning(
                "pull.failed", namespace=namespace, ref=ref, error=str(exc), error_type=type(exc).__name__
            )
            self.db.request_gc()  # what the failed pull left, once its lease is gone
            if isinstance(exc, BerthError) and ref not in exc.message and str(reference) not in exc.message:
                # e.g. "metadata database: database or disk is full": say which pull failed.
                exc.message = f"pull {ref}: {exc.message}"
                exc.args = (exc.message,)
            raise
        finally:
            tracker.finish()
        log.info(
            "pull.done",
            namespace=namespace,
            ref=image.name,
            digest=image.target.digest,
            bytes=tracker.progress.offset,
            layers=len(result.image.manifest.layers),
            teed=result.teed,
            seconds=round(asyncio.get_running_loop().time() - started, 3),
        )
        return image

    # -- unpack --------------------------------------------------------------------------

    async def inspect(
        self, namespace: str, image: Image | str, *, platform: str | Platform | None = None
    ) -> LocalImage:
        """The image's manifest and config for ``platform``, from the content store."""
        record = image if isinstance(image, Image) else await self.get(namespace, image)
        cs = self.db.content.namespace(namespace)
        return await local_image(cs, record.target, self.platform(platform), record.name)

    async def is_unpacked(
        self,
        namespace: str,
        image: Image | str,
        snapshotter: str | None = None,
        *,
        platform: str | Platform | None = None,
    ) -> bool:
        """True if the image's top chain id is a committed snapshot of ``snapshotter``."""
        local = await self.inspect(namespace, image, platform=platform)
        chain = local.chain_ids
        if not chain:
            return True
        sn = self.db.snapshotter(self.snapshotter_name(snapshotter))
        try:
            await sn.stat(namespace, chain[-1])
        except NotFound:
            return False
        return True

    async def unpack(
        self,
        namespace: str,
        image: Image | str,
        snapshotter: str | None = None,
        *,
        platform: str | Platform | None = None,
    ) -> builtins.list[str]:
        """Unpack an image whose blobs are in the content store; its chain ids, bottom first.

        Layers already unpacked (their chain id committed) are reused. The
        config gets the ``containerd.io/gc.ref.snapshot.<snapshotter>``
        label, so the snapshots live as long as the image.
        """
        record = image if isinstance(image, Image) else await self.get(namespace, image)
        sn = self.db.snapshotter(self.snapshotter_name(snapshotter))
        async with self.lease(namespace, "unpack") as lease:
            cs = self.db.content.namespace(namespace, lease)
            local = await local_image(cs, record.target, self.platform(platform), record.name)
            feeds: dict[str, LayerFeed] = {}
            for layer in local.manifest.layers:
                if layer.digest in feeds:
                    continue
                if not await has_blob(cs, layer.digest):
                    raise NotFound(
                        f"{record.name}: layer {layer.digest} is not in the content store "
                        "(pull the image again)"
                    )
                await self.db.leases.add_resource(namespace, lease, LeaseResource(layer.digest, "content"))
                feed = feeds[layer.digest] = LayerFeed(layer)
                feed.succeed()

            async def hold(chain_id: str) -> None:
                await self.db.leases.add_resource(
                    namespace, lease, LeaseResource(chain_id, f"snapshots/{sn.name}")
                )

            unpacker = Unpacker(
                image=record.name,
                snapshotter=sn.namespace(namespace, lease),
                applier=self.applier,
                content=cs,
                hold=hold,
            )
            chain = (await run_all([unpacker.unpack(local.manifest.layers, local.config.diff_ids, feeds)]))[0]
            if chain:
                await add_labels(cs, local.config.descriptor.digest, {snapshot_label(sn.name): chain[-1]})
        log.info(
            "unpack.done", namespace=namespace, image=record.name, snapshotter=sn.name, layers=len(chain)
        )
        return chain

    # -- import and export ------------------------------------------------------------------

    async def import_archive(
        self,
        namespace: str,
        source: str | Path | IO[bytes] | ByteStream,
        *,
        name: str | None = None,
        platform: str | Platform | None = None,
        snapshotter: str | None = None,
        unpack: bool = True,
        labels: Mapping[str, str] | None = None,
    ) -> builtins.list[Image]:
        """Import an OCI image layout archive or a ``docker save`` archive; the images recorded.

        ``source`` is a path, a binary file object or an async byte stream,
        read once, front to back (see :mod:`.archive` for formats and
        naming; ``name`` names an image the archive leaves unnamed). Each
        image is unpacked for ``platform`` into ``snapshotter`` unless
        ``unpack`` is False.
        """
        images: builtins.list[Image] = []
        async with self.lease(namespace, "import") as lease:
            cs = self.db.content.namespace(namespace, lease)
            found = await import_archive(cs, source, name=name)
            for entry in found:
                images.append(await self.save(namespace, entry.name, entry.target, labels))
            if unpack:
                for image in images:
                    await self.unpack(namespace, image, snapshotter, platform=platform)
        log.info("import.done", namespace=namespace, images=[i.name for i in images])
        return images

    async def export(
        self,
        namespace: str,
        names: Sequence[str],
        out: str | Path | IO[bytes] | ArchiveSink,
        *,
        platform: str | Platform | None = None,
        all_platforms: bool = False,
    ) -> None:
        """Write ``names`` as one OCI image layout tar to ``out`` (a path, a binary file, an async sink).

        For an index, the manifests of ``platform`` (default: config, then
        host) are written, or every one the content store has with
        ``all_platforms``. ``index.json`` names each image as containerd
        does (``io.containerd.image.name`` and ``org.opencontainers.image.ref.name``).
        """
        records = [await self.get(namespace, n) for n in names]
        cs = self.db.content.namespace(namespace)
        await export_archive(cs, records, out, platform=None if all_platforms else self.platform(platform))
        log.info("export.done", namespace=namespace, images=list(names))

    # -- helpers ------------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, namespace: str, purpose: str) -> AsyncIterator[str]:
        """A lease for one operation (expiring after ``pull_lease_expiry``), deleted afterwards."""
        lease_id = f"{purpose}-{secrets.token_hex(8)}"
        expires = datetime.now(UTC) + timedelta(seconds=self.config.pull_lease_expiry)
        await self.db.leases.create(
            namespace, lease_id, {LABEL_GC_EXPIRE: expires.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )
        try:
            yield lease_id
        finally:
            try:
                await self.db.leases.delete(namespace, lease_id)
            except BerthError as exc:  # it expires anyway
                log.warning("lease.delete_failed", namespace=namespace, lease=lease_id, error=str(exc))

    def _publish(self, topic: str, event: object, namespace: str) -> None:
        if self.bus is not None:
            self.bus.publish(topic, event, namespace)
