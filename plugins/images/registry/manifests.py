"""Manifests and indexes (OCI and Docker schema 2): media types and parsing.

A registry answers a tag with a manifest (one platform's config and layers)
or an index (Docker: manifest list) pointing at one manifest per platform.
:func:`parse` checks the document against its descriptor's media type and
returns a :class:`Manifest` or an :class:`Index`; anything it cannot use
(Docker schema 1, artifacts of other types, malformed JSON) is an
InvalidArgument naming the image, the digest and the media type.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from daemon.errors import InvalidArgument
from daemon.protocols import Descriptor
from daemon.reference import check_digest
from plugins.images.registry.platforms import Platform

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
KNOWN_TYPES = INDEX_TYPES | MANIFEST_TYPES
#: the Accept header of manifest requests, most preferred first
ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST, "*/*;q=0.8"])
#: media types that say nothing about the document: the body's ``mediaType`` decides
GENERIC_TYPES = frozenset({"", "application/json", "text/plain", "application/octet-stream"})
#: larger manifests are refused before download, as containerd does
MAX_MANIFEST_SIZE = 4 << 20


class IndexEntry(NamedTuple):
    descriptor: Descriptor
    platform: Platform | None


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[IndexEntry, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFEST_TYPES


def check_media_type(media_type: str, what: str) -> str:
    """``media_type`` if it is a manifest or index type berth pulls; else InvalidArgument naming it."""
    if media_type in KNOWN_TYPES:
        return media_type
    if media_type == DOCKER_SCHEMA1:
        raise InvalidArgument(
            f"{what}: unsupported manifest media type {media_type!r}: Docker schema 1 is deprecated and "
            "not supported, push the image again with a current client"
        )
    raise InvalidArgument(
        f"{what}: unsupported manifest media type {media_type!r} "
        f"(expected one of {', '.join(sorted(KNOWN_TYPES))})"
    )


def sniff_media_type(data: bytes) -> str:
    """The media type a manifest document declares, or infers from its shape; "" if neither."""
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc and "layers" in doc:
        return OCI_MANIFEST
    return ""


def parse(data: bytes, desc: Descriptor, *, image: str = "") -> Index | Manifest:
    """The manifest or index ``data`` (already verified against ``desc.digest``).

    The document's own ``mediaType``, when present, must agree with the
    descriptor's, so a registry cannot pass an index off as a manifest.
    """
    what = f"{image}: manifest {desc.digest}" if image else f"manifest {desc.digest}"
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"{what}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what}: expected a JSON object")
    declared = doc.get("mediaType", "")
    media_type = desc.media_type
    if media_type in GENERIC_TYPES:
        media_type = declared if isinstance(declared, str) and declared else sniff_media_type(data)
    elif declared and declared != media_type:
        raise InvalidArgument(
            f"{what}: document declares media type {declared!r} but was served as {media_type!r}"
        )
    check_media_type(media_type, what)
    annotations = _annotations(doc.get("annotations"), what)
    if is_index(media_type):
        raw = doc.get("manifests")
        if not isinstance(raw, list):
            raise InvalidArgument(f"{what}: index has no manifests array")
        entries = []
        for i, item in enumerate(raw):
            child = descriptor_from_json(item, f"{what}: manifests[{i}]")
            plat = item.get("platform")
            if plat is not None and not isinstance(plat, dict):
                raise InvalidArgument(f"{what}: manifests[{i}].platform: expected an object")
            entries.append(IndexEntry(child, Platform.from_json(plat) if plat else None))
        return Index(media_type, tuple(entries), annotations)
    config = descriptor_from_json(doc.get("config"), f"{what}: config")
    layers_raw = doc.get("layers")
    if not isinstance(layers_raw, list):
        raise InvalidArgument(f"{what}: manifest has no layers array")
    layers = tuple(descriptor_from_json(item, f"{what}: layers[{i}]") for i, item in enumerate(layers_raw))
    return Manifest(media_type, config, layers, annotations)


def descriptor_from_json(value: Any, what: str) -> Descriptor:
    """An OCI descriptor object (``mediaType``, ``digest``, ``size``, ``annotations``)."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: expected a descriptor object")
    media_type = value.get("mediaType", "")
    digest = value.get("digest")
    size = value.get("size")
    if not isinstance(media_type, str):
        raise InvalidArgument(f"{what}: mediaType: expected a string")
    if not isinstance(digest, str):
        raise InvalidArgument(f"{what}: digest: expected a string, got {digest!r}")
    check_digest(digest, what)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what}: size: expected an integer >= 0, got {size!r}")
    return Descriptor(media_type, digest, size, _annotations(value.get("annotations"), what))


def _annotations(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidArgument(f"{what}: annotations: expected an object of strings")
    return dict(value)
