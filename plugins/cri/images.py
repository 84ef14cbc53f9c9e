"""CRI images with containerd's semantics, over the images plugin's records.

kubelet names images by reference (``busybox``, ``registry:5000/app:v1``,
``app@sha256:...``) and by *image id*, the digest of the image's config blob
(what ``docker images`` calls IMAGE ID). containerd's CRI keeps that mapping
as ordinary image records in the ``k8s.io`` namespace, and berth keeps them
the same way, so ``ctr -n k8s.io images ls`` and ``berth -n k8s.io images ls``
show what kubelet sees. A pull of ``busybox:1.36`` leaves three records, all
pointing at the pulled target (index or manifest) and labelled
``io.cri-containerd.image=managed``:

* ``docker.io/library/busybox:1.36`` (the repo tag, absent for a pull by digest),
* ``docker.io/library/busybox@sha256:<target digest>`` (the repo digest),
* ``sha256:<config digest>`` (named by the id).

A CRI image is every record of ``k8s.io`` whose target resolves (for the
configured platform) to one config digest, grouped: its tags and digests are
the record names, its size the bytes of index, manifest, config and layers.
Nothing is cached that could go stale: what a target resolves to is derived
from immutable content (cached by target digest), everything else is read
from the records on every call.

:class:`CriImages` is the whole behaviour; :mod:`plugins.cri.imageservice`
only translates it to and from ``runtime.v1`` messages.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import structlog

from daemon.errors import BerthError, InvalidArgument, NotFound
from daemon.metadata.db import MetadataDB
from daemon.metadata.images import Image
from daemon.protocols import ImageManager, Kind, RegistryCredentials, Usage
from daemon.reference import Reference, parse_reference

log = structlog.get_logger("berth.cri.images")

#: containerd's CRI keeps everything of kubelet's in this namespace of the native API.
K8S_NAMESPACE = "k8s.io"
LABEL_MANAGED = "io.cri-containerd.image"
MANAGED = "managed"
#: Images the garbage collection of kubelet must leave (the sandbox image).
LABEL_PINNED = "io.cri-containerd.pinned"
PINNED = "pinned"

#: Seconds the measured usage of an active (container) snapshot is reused by ImageFsInfo.
ACTIVE_USAGE_TTL = 10.0

# -- references --------------------------------------------------------------------------------

_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_IMAGE_ID_RE = re.compile(r"sha256:[a-f0-9]{64}\Z")
_HEX_RE = re.compile(r"[a-f0-9]+\Z")


def is_image_id(value: str) -> bool:
    """``sha256:<64 lowercase hex>``: an image id (or any content digest), not a reference."""
    return bool(_IMAGE_ID_RE.match(value))


def normalize(ref: str) -> Reference:
    """``ref`` as containerd's CRI normalizes it (``docker.ParseDockerRef``).

    The grammar and defaults are the core's (:func:`daemon.reference.parse_reference`);
    the CRI's one difference: a reference with a tag and a digest keeps only
    the digest (it is what is pulled, and records are named by it).
    """
    parsed = parse_reference(ref)
    if parsed.tag and parsed.digest:
        return Reference(parsed.domain, parsed.path, digest=parsed.digest)
    return parsed


# -- credentials --------------------------------------------------------------------------------


#: per-pull credentials (a PullImage's AuthConfig), in the core's shape the images plugin takes
PullCredentials = RegistryCredentials


def _server_host(server_address: str) -> str:
    if "://" in server_address:
        return urlsplit(server_address).netloc
    return server_address.split("/", 1)[0]


def _same_registry(a: str, b: str) -> bool:
    return a == b or (a in _DOCKER_HUB_ALIASES and b in _DOCKER_HUB_ALIASES)


def credentials(
    domain: str,
    *,
    username: str = "",
    password: str = "",
    auth: str = "",
    server_address: str = "",
    identity_token: str = "",
    registry_token: str = "",
) -> PullCredentials | None:
    """The credentials a CRI ``AuthConfig`` gives for a pull from ``domain``; None for none.

    As containerd's ``ParseAuth``: an ``AuthConfig`` for another ``server_address``
    is ignored; ``username``/``password`` win over ``identity_token``, which wins
    over ``auth`` (base64 of ``user:password``); ``registry_token`` is sent as a
    bearer token as it is. InvalidArgument names ``auth.auth`` if it cannot be decoded.
    """
    if server_address and not _same_registry(_server_host(server_address), domain):
        log.debug("pull.auth_ignored", registry=domain, server_address=server_address)
        return None
    if username:
        creds = PullCredentials(username, password, registry_token=registry_token)
    elif identity_token:
        creds = PullCredentials(identity_token=identity_token, registry_token=registry_token)
    elif auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise InvalidArgument('auth.auth: not base64 of "user:password"') from None
        user, colon, secret = decoded.partition(":")
        if not colon:
            raise InvalidArgument('auth.auth: decodes to no "user:password" pair')
        creds = PullCredentials(user, secret.strip("\x00"), registry_token=registry_token)
    else:
        creds = PullCredentials(registry_token=registry_token)
    return creds or None


# -- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts:
    """What a target descriptor resolves to for the platform: immutable, so cached by its digest."""

    id: str
    size: int
    chain_id: str
    config: Mapping[str, Any]


@dataclass
class CriImage:
    """One CRI image: the records of ``k8s.io`` that resolve to one image id."""

    id: str
    size: int
    chain_id: str
    config: Mapping[str, Any]
    records: list[Image] = field(default_factory=list)
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    pinned: bool = False

    @property
    def user(self) -> tuple[int | None, str]:
        """``(uid, "")`` or ``(None, username)`` from the config's ``User`` (``user[:group]``)."""
        cfg = self.config.get("config")
        raw = cfg.get("User", "") if isinstance(cfg, Mapping) else ""
        user = str(raw or "").split(":", 1)[0]
        if not user:
            return None, ""
        if user.isdigit():
            return int(user), ""
        return None, user

    def verbose_info(self) -> dict[str, str]:
        """ImageStatus's ``info`` with verbose: containerd's ``{"chainID", "imageSpec"}`` JSON."""
        return {"info": json.dumps({"chainID": self.chain_id, "imageSpec": dict(self.config)})}


@dataclass(frozen=True)
class FsUsage:
    """Disk use of the snapshots of ``k8s.io`` (ImageFsInfo's ``FilesystemUsage``)."""

    timestamp_ns: int
    mountpoint: str
    used_bytes: int
    inodes_used: int


def _classify(name: str) -> tuple[str, str]:
    """``(repo_tag, repo_digest)`` a record name is (one of them, or neither for an id or a bad name)."""
    if is_image_id(name):
        return "", ""
    try:
        ref = normalize(name)
    except InvalidArgument:
        return "", ""
    return ("", str(ref)) if ref.digest else (str(ref), "")


class CriImages:
    """CRI's image operations in namespace ``k8s.io``; see the module docstring.

    ``images`` is the images plugin, ``db`` the metadata database (for the
    snapshot usage ImageFsInfo reports), ``snapshotter`` where images are
    unpacked, ``mountpoint`` the snapshotter's root directory (ImageFsInfo's fs id).
    """

    def __init__(
        self,
        images: ImageManager,
        db: MetadataDB,
        *,
        snapshotter: str,
        mountpoint: str,
        namespace: str = K8S_NAMESPACE,
    ) -> None:
        self.images = images
        self.db = db
        self.snapshotter = snapshotter
        self.mountpoint = mountpoint
        self.namespace = namespace
        self._facts: dict[str, ImageFacts] = {}
        self._unresolvable: set[str] = set()
        self._committed_usage: dict[str, Usage] = {}
        self._active_usage: dict[str, tuple[float, Usage]] = {}

    # -- pull ------------------------------------------------------------------------------

    async def pull(self, ref: str, auth: PullCredentials | None = None, *, pinned: bool = False) -> str:
        """Pull ``ref`` and record its tag, digest and id names; the image id.

        InvalidArgument for a bad reference; the images plugin's errors otherwise.
        """
        reference = normalize(ref)
        labels = {LABEL_MANAGED: MANAGED}
        if pinned:
            labels[LABEL_PINNED] = PINNED
        started = time.monotonic()
        record = await self.images.pull(
            self.namespace, str(reference), auth=auth, labels=labels, snapshotter=self.snapshotter
        )
        facts = await self._resolve(record)
        repo_tag = str(reference) if reference.tag else ""
        repo_digest = f"{reference.name}@{record.target.digest}"
        for name in dict.fromkeys((repo_tag, repo_digest, facts.id)):
            if name and name != record.name:
                await self.images.save(self.namespace, name, record.target, labels)
        log.info(
            "cri.pull",
            ref=str(reference),
            image_id=facts.id,
            repo_digest=repo_digest,
            seconds=round(time.monotonic() - started, 3),
        )
        return facts.id

    # -- reading ---------------------------------------------------------------------------

    async def list(self) -> builtins.list[CriImage]:
        """Every CRI image of the namespace, by id; records that do not resolve are left out."""
        records = await self.images.list(self.namespace)
        by_id: dict[str, CriImage] = {}
        targets: set[str] = set()
        for record in records:
            targets.add(record.target.digest)
            facts = await self._facts_or_none(record)
            if facts is None:
                continue
            image = by_id.get(facts.id)
            if image is None:
                image = by_id[facts.id] = CriImage(facts.id, facts.size, facts.chain_id, facts.config)
            image.records.append(record)
            tag, digest = _classify(record.name)
            if tag and tag not in image.repo_tags:
                image.repo_tags.append(tag)
            if digest and digest not in image.repo_digests:
                image.repo_digests.append(digest)
            image.pinned = image.pinned or record.labels.get(LABEL_PINNED) == PINNED
        for gone in set(self._facts) - targets:  # keep the cache as small as the namespace
            del self._facts[gone]
        self._unresolvable &= targets
        for image in by_id.values():
            image.repo_tags.sort()
            image.repo_digests.sort()
        return sorted(by_id.values(), key=lambda i: i.id)

    async def get(self, ref_or_id: str) -> CriImage | None:
        """The image ``ref_or_id`` names, or None (containerd's ``localResolve``).

        Tried in order: an id (``sha256:<hex>``); a reference, normalized,
        naming a record; a unique prefix of an id, with or without
        ``sha256:`` (InvalidArgument if several images share it).
        """
        if not ref_or_id:
            raise InvalidArgument("image: must not be empty")
        wanted = ref_or_id if is_image_id(ref_or_id) else ""
        if not wanted:
            try:
                reference = normalize(ref_or_id)
            except InvalidArgument:
                reference = None
            if reference is not None:
                try:
                    record = await self.images.get(self.namespace, str(reference))
                except NotFound:
                    pass
                else:
                    facts = await self._facts_or_none(record)
                    wanted = facts.id if facts is not None else ""
        images = await self.list()
        if wanted:
            return next((i for i in images if i.id == wanted), None)
        prefix = ref_or_id.removeprefix("sha256:")
        if not _HEX_RE.match(prefix):
            return None
        found = [i for i in images if i.id.removeprefix("sha256:").startswith(prefix)]
        if len(found) > 1:
            raise InvalidArgument(f"image {ref_or_id!r}: short id is ambiguous ({len(found)} images match)")
        return found[0] if found else None

    # -- removing --------------------------------------------------------------------------

    async def remove(self, ref_or_id: str) -> CriImage | None:
        """Remove every record of the image ``ref_or_id`` names; the image, or None if there was none.

        Idempotent, as kubelet needs: an unknown image, or records removed by
        somebody else meanwhile, are not errors. A record re-pointed at another
        target meanwhile (a newer pull of the tag) is left alone. The last
        removal collects garbage synchronously, so the disk space is back when
        this returns.
        """
        image = await self.get(ref_or_id)
        if image is None:
            return None
        for i, record in enumerate(image.records):
            last = i == len(image.records) - 1
            try:
                await self.images.remove(
                    self.namespace, record.name, target_digest=record.target.digest, sync=last
                )
            except NotFound:
                if last:
                    self.db.request_gc()
        log.info("cri.remove_image", image_id=image.id, names=[r.name for r in image.records])
        return image

    # -- disk usage --------------------------------------------------------------------------

    async def fs_usage(self) -> FsUsage:
        """Bytes and inodes of the namespace's snapshots in the snapshotter (containerd's sum).

        Committed snapshots never change: their usage is read once. Active
        ones (container root filesystems) are measured at most every
        :data:`ACTIVE_USAGE_TTL` seconds.
        """
        sn = self.db.snapshotter(self.snapshotter)
        now = time.monotonic()
        size = inodes = 0
        seen: set[str] = set()
        async for info in sn.walk(self.namespace):
            seen.add(info.name)
            usage = self._committed_usage.get(info.name)
            if usage is None and info.kind is not Kind.COMMITTED:
                cached = self._active_usage.get(info.name)
                usage = cached[1] if cached and now - cached[0] < ACTIVE_USAGE_TTL else None
            if usage is None:
                try:
                    usage = await sn.usage(self.namespace, info.name)
                except NotFound:  # removed since the walk
                    continue
                if info.kind is Kind.COMMITTED:
                    self._committed_usage[info.name] = usage
                else:
                    self._active_usage[info.name] = (now, usage)
            size += usage.size
            inodes += usage.inodes
        for key in set(self._committed_usage) - seen:
            del self._committed_usage[key]
        for key in set(self._active_usage) - seen:
            del self._active_usage[key]
        return FsUsage(time.time_ns(), self.mountpoint, size, inodes)

    # -- helpers ------------------------------------------------------------------------------

    async def _resolve(self, record: Image) -> ImageFacts:
        facts = self._facts.get(record.target.digest)
        if facts is None:
            local = await self.images.inspect(self.namespace, record)
            chain = list(local.chain_ids)
            facts = ImageFacts(
                id=str(local.config.descriptor.digest),
                size=int(local.size),
                chain_id=str(chain[-1]) if chain else "",
                config=dict(local.config.raw),
            )
            self._facts[record.target.digest] = facts
        return facts

    async def _facts_or_none(self, record: Image) -> ImageFacts | None:
        try:
            return await self._resolve(record)
        except BerthError as exc:
            # e.g. an image of another platform imported with ctr: not a CRI image here.
            if record.target.digest not in self._unresolvable:
                self._unresolvable.add(record.target.digest)
                log.warning("cri.image_unresolvable", name=record.name, error=exc.message)
            return None
