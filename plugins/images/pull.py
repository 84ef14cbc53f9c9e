"""Pulling an image: resolve, fetch verified blobs in parallel, unpack while they download.

:class:`Puller` does the work between the lease and the image record (both
are the service's, :mod:`plugins.images.service`), in this order::

    resolve the reference (HEAD/GET)        -> the top descriptor (index or manifest)
    index?  choose the platform's manifest  -> NotFound naming the platforms offered
    check the manifest: config and layer media types known, before any download
    config  (content store, else registry)  -> rootfs.diff_ids, one per layer
    store config, manifest, index           -> with their gc.ref labels
    layers: N downloads at once ─┐
            unpacker, in order  ─┴─ LayerFeed per layer (see plugins.images.unpack)
    config label gc.ref.snapshot.<snapshotter> = top chain id

Everything is read from the content store when it is there already, so
pulling an image again fetches nothing but the tag's manifest digest. Every
blob written is verified (size and digest) before it is committed; a
corrupt blob's ingest is removed so a retry starts clean, while an ingest
cut off by a network failure (or a ``kill -9``) is kept under its
deterministic ref (``layer-<digest>``) and resumed with a Range request by
the next attempt. If a resumed download then fails its digest check, the
partial data was bad: it is discarded and the layer downloaded once more
from byte 0.

Errors name the image and the blob: FailedPrecondition for corrupt content
(digest, size, diff id), InvalidArgument for what berth cannot use (media
types, malformed documents, a malformed layer), NotFound (tag, platform),
PermissionDenied (credentials), Unavailable (registry down, after retries).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from daemon.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable
from daemon.metadata.db import MetadataDB
from daemon.metadata.leases import LeaseResource
from daemon.protocols import Applier, ContentStore, ContentWriter, Descriptor, RegistryCredentials
from daemon.reference import Reference
from plugins.images.blobs import (
    MAX_CONFIG_SIZE,
    LocalImage,
    add_labels,
    chain_ids,
    check_config,
    check_layer,
    check_layers_match,
    choose_manifest,
    index_labels,
    manifest_labels,
    parse_config,
    read_blob_if_present,
    snapshot_label,
    store_blob,
)
from plugins.images.progress import ProgressTracker, State
from plugins.images.registry.client import RegistryClient, Repository
from plugins.images.registry.hosts import Endpoint
from plugins.images.registry.manifests import Index, Manifest, is_index, parse
from plugins.images.registry.platforms import Platform
from plugins.images.unpack import TEE_BACKLOG, LayerFeed, Unpacker, abort_quietly

log = structlog.get_logger("berth.images")

T = TypeVar("T")

#: Label containerd puts on pulled blobs: where they came from (used for cross-repository mounts).
LABEL_SOURCE_PREFIX = "containerd.io/distribution.source."
#: Longest wait for another writer of the same blob (a concurrent pull of it).
LOCKED_MAX_WAIT = 600.0
#: Longest wait between two attempts to open an ingest another pull holds.
LOCKED_MAX_DELAY = 1.0


@dataclass(frozen=True)
class PullResult:
    """What a pull fetched: the name it resolved to, the image as stored, and how the unpack went."""

    name: str
    image: LocalImage
    #: chain ids of the layers, bottom first (unpacked when ``unpacked``)
    chain_ids: tuple[str, ...]
    unpacked: bool
    #: layers applied live from their download
    teed: int


async def run_all(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Run ``coros`` concurrently; on the first failure cancel the rest and raise *that* error.

    (A TaskGroup would raise an ExceptionGroup of everything that failed as
    a consequence; the operator needs the cause.)
    """
    first: list[BaseException] = []

    async def guard(aw: Awaitable[T]) -> T:
        try:
            return await aw
        except Exception as exc:
            if not first:
                first.append(exc)
            raise

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(guard(aw)) for aw in coros]
    except BaseExceptionGroup:
        if first:
            raise first[0] from None
        raise
    return [t.result() for t in tasks]


class Puller:
    """Fetches and unpacks images into one metadata database; one per images plugin."""

    def __init__(
        self,
        db: MetadataDB,
        applier: Applier,
        client: RegistryClient,
        *,
        max_concurrent_downloads: int = 3,
        tee_backlog: int = TEE_BACKLOG,
    ) -> None:
        self.db = db
        self.applier = applier
        self.client = client
        self.max_concurrent_downloads = max_concurrent_downloads
        self.tee_backlog = tee_backlog

    async def pull(
        self,
        namespace: str,
        reference: Reference,
        lease: str,
        *,
        platform: Platform | None,
        credentials: RegistryCredentials | None = None,
        snapshotter: str | None = None,
        tracker: ProgressTracker | None = None,
    ) -> PullResult:
        """Fetch ``reference`` into ``namespace`` under ``lease``; unpack into ``snapshotter`` if given."""
        tracker = tracker or ProgressTracker(namespace, str(reference))
        sn = self.db.snapshotter(snapshotter) if snapshotter else None  # NotFound before any download
        cs = self.db.content.namespace(namespace, lease)
        repo = await self.client.repository(reference, credentials=credentials)
        name, top = await repo.resolve()
        source = {LABEL_SOURCE_PREFIX + reference.domain: reference.path}
        log.info("pull.resolved", namespace=namespace, ref=name, digest=top.digest, media_type=top.media_type)

        tracker.blob("index" if is_index(top.media_type) else "manifest", top.digest, top.size)
        top_data = await self._document(repo, cs, top, tracker)
        doc = parse(top_data, top, image=name)
        child: tuple[int, Descriptor] | None = None
        manifest_desc, manifest_data = top, top_data
        if isinstance(doc, Index):
            child = choose_manifest(doc, platform, name)
            manifest_desc = child[1]
            tracker.blob("manifest", manifest_desc.digest, manifest_desc.size)
            manifest_data = await self._document(repo, cs, manifest_desc, tracker)
            doc = parse(manifest_data, manifest_desc, image=name)
            if not isinstance(doc, Manifest):
                raise InvalidArgument(
                    f"{name}: manifest {manifest_desc.digest} is an index, expected a manifest"
                )
        manifest = doc
        check_config(name, manifest.config)
        for layer in manifest.layers:
            check_layer(name, layer)

        tracker.blob("config", manifest.config.digest, manifest.config.size)
        config_data = await self._config(repo, cs, manifest.config, tracker)
        config = parse_config(config_data, manifest.config, name)
        check_layers_match(name, manifest_desc.digest, manifest.layers, config)
        await store_blob(cs, f"config-{manifest.config.digest}", manifest.config, config_data, source)
        tracker.state(manifest.config.digest, State.DOWNLOADED)
        await store_blob(
            cs, f"manifest-{manifest_desc.digest}", manifest_desc, manifest_data,
            {**manifest_labels(manifest), **source},
        )  # fmt: skip
        tracker.state(manifest_desc.digest, State.DOWNLOADED)
        if child is not None:
            await store_blob(cs, f"index-{top.digest}", top, top_data, {**index_labels([child]), **source})
            tracker.state(top.digest, State.DOWNLOADED)

        unique: dict[str, Descriptor] = {}
        for layer in manifest.layers:
            unique.setdefault(layer.digest, layer)
            tracker.blob("layer", layer.digest, layer.size)
        feeds = {d: LayerFeed(desc, backlog=self.tee_backlog) for d, desc in unique.items()}
        slots = asyncio.Semaphore(self.max_concurrent_downloads)
        work: list[Awaitable[Any]] = [
            self._download(repo, cs, desc, feeds[d], slots, tracker, source) for d, desc in unique.items()
        ]
        unpacker: Unpacker | None = None
        if sn is not None:
            sn_view = sn.namespace(namespace, lease)

            async def hold(chain_id: str) -> None:
                await self.db.leases.add_resource(
                    namespace, lease, LeaseResource(chain_id, f"snapshots/{sn.name}")
                )

            unpacker = Unpacker(
                image=name, snapshotter=sn_view, applier=self.applier, content=cs, hold=hold, tracker=tracker
            )
            work.append(unpacker.unpack(manifest.layers, config.diff_ids, feeds))
        await run_all(work)

        chain = chain_ids(config.diff_ids)
        if sn is not None and chain:
            await add_labels(cs, manifest.config.digest, {snapshot_label(sn.name): chain[-1]})
        image = LocalImage(top, manifest_desc, manifest, config, child)
        return PullResult(name, image, tuple(chain), sn is not None, unpacker.teed if unpacker else 0)

    # -- small documents ------------------------------------------------------------

    async def _document(
        self, repo: Repository, cs: ContentStore, desc: Descriptor, tracker: ProgressTracker
    ) -> bytes:
        """A manifest or index: from the content store if there, else the registry (verified)."""
        data = await read_blob_if_present(cs, desc, f"{repo.image}: manifest {desc.digest}")
        if data is not None:
            tracker.state(desc.digest, State.EXISTS)
            return data
        tracker.state(desc.digest, State.DOWNLOADING)
        return await repo.fetch_manifest(desc)

    async def _config(
        self, repo: Repository, cs: ContentStore, desc: Descriptor, tracker: ProgressTracker
    ) -> bytes:
        data = await read_blob_if_present(cs, desc, f"{repo.image}: config {desc.digest}", MAX_CONFIG_SIZE)
        if data is not None:
            tracker.state(desc.digest, State.EXISTS)
            return data
        tracker.state(desc.digest, State.DOWNLOADING)
        return await repo.fetch_bytes(desc, MAX_CONFIG_SIZE)

    # -- layers --------------------------------------------------------------------------

    async def _download(
        self,
        repo: Repository,
        cs: ContentStore,
        desc: Descriptor,
        feed: LayerFeed,
        slots: asyncio.Semaphore,
        tracker: ProgressTracker,
        labels: dict[str, str],
    ) -> None:
        """One layer into the content store (verified), feeding the unpacker on the way."""
        try:
            async with slots:
                await self._fetch_layer(repo, cs, desc, feed, tracker, labels)
        except BaseException as exc:
            feed.fail(exc)
            tracker.state(desc.digest, State.FAILED)
            raise
        feed.succeed()

    async def _fetch_layer(
        self,
        repo: Repository,
        cs: ContentStore,
        desc: Descriptor,
        feed: LayerFeed,
        tracker: ProgressTracker,
        labels: dict[str, str],
    ) -> None:
        ref = f"layer-{desc.digest}"
        for attempt in (1, 2):
            writer = await open_writer(cs, ref, desc)
            if writer is None:
                tracker.state(desc.digest, State.EXISTS)
                log.debug("pull.layer.exists", image=repo.image, digest=desc.digest)
                return
            resumed = writer.offset
            try:
                if writer.offset < desc.size:
                    tracker.state(desc.digest, State.DOWNLOADING, offset=writer.offset)
                    if resumed:
                        log.info("pull.layer.resume", image=repo.image, digest=desc.digest, offset=resumed)
                    feed.begin(writer.offset)
                    # the writer hashes every byte (in its thread): the stream checks only the size
                    async with await repo.fetch_blob(desc, writer.offset, verify=False) as stream:
                        async for chunk in stream:
                            await writer.write(chunk)
                            await feed.push(chunk)
                            tracker.bytes(desc.digest, writer.offset)
                        check_written(writer, desc, repo.image, stream.endpoint)
                    feed.eof()
                await writer.commit(desc.size, desc.digest, labels)
            except AlreadyExists:
                pass  # committed by another pull meanwhile: the lease holds it now
            except FailedPrecondition as exc:
                # corrupt (digest or size): the ingest holds bad bytes, a retry must start from 0
                await writer.close()
                await abort_quietly(cs, ref)
                if resumed and attempt == 1:
                    log.warning(
                        "pull.layer.resume_corrupt", image=repo.image, digest=desc.digest, error=str(exc)
                    )
                    continue
                raise
            finally:
                await writer.close()
            tracker.state(desc.digest, State.DOWNLOADED)
            log.debug(
                "pull.layer.done", image=repo.image, digest=desc.digest, size=desc.size, resumed=resumed
            )
            return


def check_written(writer: ContentWriter, desc: Descriptor, image: str, endpoint: Endpoint | None) -> None:
    """FailedPrecondition (as the registry client words it) when the bytes written are not ``desc``.

    Checked from the writer's running digest before the layer is fed its end, so a corrupt
    layer never reaches the unpacker's last step; the commit verifies again, on the same hash.
    """
    actual = writer.digest()
    if desc.digest.startswith("sha256:") and actual != desc.digest:
        raise FailedPrecondition(
            f"blob {desc.digest}: digest mismatch: expected {desc.digest}, got {actual} "
            f"({image}, from {endpoint.url if endpoint else '?'})"
        )


async def open_writer(cs: ContentStore, ref: str, desc: Descriptor) -> ContentWriter | None:
    """The ingest of ``desc`` (resumed if one exists), or None if the blob is there already.

    Another pull writing the same blob holds its ingest (Unavailable
    "locked"): wait for it, polling, until it commits (None) or lets go, for
    at most LOCKED_MAX_WAIT seconds; then the Unavailable goes to the caller
    (a retry later succeeds) rather than a pull hanging on a stuck holder.
    """
    delay = 0.02
    deadline = asyncio.get_running_loop().time() + LOCKED_MAX_WAIT
    while True:
        try:
            return await cs.writer(ref, desc.size, desc.digest)
        except AlreadyExists:
            return None
        except Unavailable as exc:
            if "locked" not in exc.message or asyncio.get_running_loop().time() > deadline:
                raise
            log.debug("pull.ingest.locked", ref=ref, digest=desc.digest)
        await asyncio.sleep(delay)
        delay = min(delay * 2, LOCKED_MAX_DELAY)
