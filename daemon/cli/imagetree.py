"""What an image record points at, read through the Content service as ``ctr`` reads it.

The CLI works from the wire only, so ``images ls`` and ``images inspect``
walk an image's documents themselves: the target (an index or a manifest),
the manifest of the chosen platform, its config, and from the config's
``rootfs.diff_ids`` the chain ids its layers are unpacked under (the keys of
the committed snapshots). A blob missing from the content store (an index
pulled for one platform only, content removed by hand) leaves that part
empty instead of failing the listing.
"""

from __future__ import annotations

import hashlib
import json
import platform as host
from dataclasses import dataclass, field
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemon.cli.client import Client
from daemon.cli.commands import CliError
from protos.containerd.services.images.v1 import Image as PbImage

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})

_ARCH = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, spec: str) -> Platform:
        """``os/arch[/variant]`` (``amd64`` alone means ``linux/amd64``); ValueError naming the spec."""
        parts = spec.strip().split("/")
        if len(parts) == 1 and parts[0]:
            parts = ["linux", parts[0]]
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform {spec!r}: expected os/arch[/variant], e.g. linux/amd64")
        arch, variant = normalize_arch(parts[1].lower(), parts[2].lower() if len(parts) == 3 else "")
        return cls(parts[0].lower(), arch, variant)

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Platform:
        arch, variant = normalize_arch(str(value.get("architecture", "")), str(value.get("variant", "")))
        return cls(str(value.get("os", "")), arch, variant)

    def matches(self, other: Platform) -> bool:
        """``other`` (an index entry) runs here: same os and arch, and variant when this one names it."""
        return (self.os, self.architecture) == (other.os, other.architecture) and (
            not self.variant or self.variant == other.variant
        )

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    arch = _ARCH.get(arch, arch)
    if arch == "arm64" and variant in ("", "8"):
        variant = "v8"
    return arch, variant


def host_platform() -> Platform:
    return Platform("linux", *normalize_arch(host.machine().lower(), ""))


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain ids: ``chain(L0) = diff(L0)``, ``chain(Ln) = sha256(chain(Ln-1) + " " + diff(Ln))``."""
    out: list[str] = []
    for diff_id in diff_ids:
        if out:
            diff_id = "sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest()
        out.append(diff_id)
    return out


@dataclass
class ImageTree:
    """One image's documents as far as the content store has them (see the module docstring)."""

    record: PbImage
    platform: Platform
    index: dict[str, Any] | None = None
    manifest_digest: str = ""
    manifest: dict[str, Any] | None = None
    config_digest: str = ""
    config: dict[str, Any] | None = None
    platforms: list[str] = field(default_factory=list)
    #: Descriptor sizes of the image for :attr:`platform` (target, manifest, config, layers).
    size: int = 0

    @property
    def diff_ids(self) -> list[str]:
        rootfs = (self.config or {}).get("rootfs") or {}
        return [str(d) for d in rootfs.get("diff_ids") or []]

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list((self.manifest or {}).get("layers") or [])

    @property
    def chain_ids(self) -> list[str]:
        return chain_ids(self.diff_ids)


async def _document(c: Client, digest: str) -> dict[str, Any] | None:
    try:
        data = await c.read_document(digest)
    except GRPCError as exc:
        if exc.status is Status.NOT_FOUND:
            return None
        raise
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        value = json.loads(data)
    except ValueError:
        return None  # not JSON: not an image document
    return value if isinstance(value, dict) else None


def _platform_of(config: dict[str, Any]) -> str:
    return str(Platform.from_json(config))


async def read_tree(c: Client, record: PbImage, platform: Platform) -> ImageTree:
    """Read ``record``'s index (if any), the manifest for ``platform``, and its config."""
    tree = ImageTree(record, platform, size=record.target.size)
    target = record.target
    manifest_digest = target.digest
    if target.media_type in INDEX_TYPES:
        tree.index = await _document(c, target.digest)
        if tree.index is None:
            return tree
        entries = [m for m in tree.index.get("manifests") or [] if isinstance(m, dict)]
        tree.platforms = sorted(
            {str(Platform.from_json(m["platform"])) for m in entries if isinstance(m.get("platform"), dict)}
        )
        chosen = next(
            (
                m
                for m in entries
                if isinstance(m.get("platform"), dict) and platform.matches(Platform.from_json(m["platform"]))
            ),
            None,
        )
        if chosen is None:
            return tree
        manifest_digest = str(chosen.get("digest", ""))
        tree.size += int(chosen.get("size", 0))
    tree.manifest_digest = manifest_digest
    tree.manifest = await _document(c, manifest_digest)
    if tree.manifest is None:
        return tree
    config = tree.manifest.get("config") or {}
    tree.config_digest = str(config.get("digest", ""))
    tree.size += int(config.get("size", 0)) + sum(int(layer.get("size", 0)) for layer in tree.layers)
    if tree.config_digest:
        tree.config = await _document(c, tree.config_digest)
    if tree.config is not None and tree.index is None:
        tree.platforms = [_platform_of(tree.config)]
    return tree


async def image_defaults(c: Client, platform: str = "", snapshotter: str = "") -> tuple[Platform, str]:
    """``(platform, snapshotter)``: each as requested, else the images plugin's (its exports), else
    this host's platform and ``overlayfs``. One Introspection call at most, none when both are given."""
    exported: dict[str, str] = {}
    if not (platform and snapshotter):
        exported = await c.plugin_exports("berth.images.v1")
    wanted = platform or exported.get("platform", "")
    try:
        chosen = Platform.parse(wanted) if wanted else host_platform()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return chosen, snapshotter or exported.get("snapshotter", "") or "overlayfs"


async def default_platform(c: Client, requested: str = "") -> Platform:
    """``requested``, else the images plugin's platform (its exports), else this host's."""
    try:
        if requested:
            return Platform.parse(requested)
        exported = (await c.plugin_exports("berth.images.v1")).get("platform", "")
        return Platform.parse(exported) if exported else host_platform()
    except ValueError as exc:
        raise CliError(str(exc)) from None


async def default_snapshotter(c: Client, requested: str = "") -> str:
    """``requested``, else the images plugin's snapshotter, else ``overlayfs``."""
    if requested:
        return requested
    return (await c.plugin_exports("berth.images.v1")).get("snapshotter", "") or "overlayfs"
