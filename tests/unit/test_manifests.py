"""Manifest and index parsing: OCI and Docker schema 2 accepted, anything else named and refused."""

from __future__ import annotations

import json

import pytest

from daemon.errors import InvalidArgument
from daemon.protocols import Descriptor
from plugins.images.registry import manifests as m
from plugins.images.registry.platforms import Platform
from tests.support import oci


def descriptor(blob: oci.Blob, media_type: str | None = None) -> Descriptor:
    return Descriptor(media_type if media_type is not None else blob.media_type, blob.digest, blob.size)


@pytest.mark.parametrize("docker", [False, True])
def test_index_and_manifest_of_the_test_image(docker: bool) -> None:
    image = oci.busybox_image("gzip", index=True, docker=docker)
    index = m.parse(image.top.data, descriptor(image.top))
    assert isinstance(index, m.Index)
    assert index.media_type == (m.DOCKER_MANIFEST_LIST if docker else m.OCI_INDEX)
    assert [(e.descriptor.digest, e.platform) for e in index.manifests] == [
        (image.manifests[0].digest, Platform("linux", "amd64")),
        (image.manifests[1].digest, Platform("linux", "arm64")),
    ]
    amd64 = image.manifest_for("linux/amd64")
    manifest = m.parse(amd64.manifest.data, descriptor(amd64.manifest))
    assert isinstance(manifest, m.Manifest)
    assert manifest.config == Descriptor(amd64.config.media_type, amd64.config.digest, amd64.config.size)
    assert [(d.media_type, d.digest, d.size) for d in manifest.layers] == [
        (layer.media_type, layer.digest, layer.size) for layer in amd64.layers
    ]


def test_generic_media_type_is_decided_by_the_document() -> None:
    image = oci.busybox_image("gzip")
    doc = m.parse(image.top.data, descriptor(image.top, "application/json"))
    assert isinstance(doc, m.Manifest) and doc.media_type == m.OCI_MANIFEST
    bare = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert m.sniff_media_type(bare) == m.OCI_INDEX
    assert m.sniff_media_type(b"not json") == ""


def test_unknown_and_schema1_media_types_are_named() -> None:
    with pytest.raises(InvalidArgument) as err:
        m.check_media_type("application/vnd.example.thing+json", "img: manifest sha256:x")
    assert str(err.value).startswith(
        "img: manifest sha256:x: unsupported manifest media type 'application/vnd.example.thing+json'"
    )
    with pytest.raises(InvalidArgument, match="Docker schema 1 is deprecated"):
        m.check_media_type(m.DOCKER_SCHEMA1, "img")


def test_document_that_contradicts_its_descriptor() -> None:
    image = oci.busybox_image("gzip", index=True)
    with pytest.raises(InvalidArgument, match=r"declares media type .*index.* but was served as .*manifest"):
        m.parse(image.top.data, descriptor(image.top, m.OCI_MANIFEST), image="r/app:1")


@pytest.mark.parametrize(
    ("doc", "complaint"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "expected a JSON object"),
        (json.dumps({"mediaType": m.OCI_INDEX}).encode(), "index has no manifests array"),
        (
            json.dumps({"mediaType": m.OCI_MANIFEST, "config": {}}).encode(),
            "config: digest: expected a string",
        ),
        (
            json.dumps(
                {
                    "mediaType": m.OCI_MANIFEST,
                    "config": {"mediaType": "x", "digest": "sha256:" + "a" * 64, "size": -1},
                    "layers": [],
                }
            ).encode(),
            "config: size: expected an integer >= 0, got -1",
        ),
        (
            json.dumps(
                {
                    "mediaType": m.OCI_MANIFEST,
                    "config": {"mediaType": "x", "digest": "sha256:" + "a" * 64, "size": 1},
                    "layers": [{"mediaType": "x", "digest": "sha256:zz", "size": 1}],
                }
            ).encode(),
            "layers[0]: invalid digest 'sha256:zz'",
        ),
    ],
)
def test_malformed_documents_are_named(doc: bytes, complaint: str) -> None:
    media_type = (
        json.loads(doc).get("mediaType", m.OCI_MANIFEST)
        if doc.startswith(b"{") and len(doc) > 1
        else m.OCI_MANIFEST
    )
    desc = Descriptor(media_type, "sha256:" + "c" * 64, len(doc))
    with pytest.raises(InvalidArgument) as err:
        m.parse(doc, desc, image="r/app:1")
    assert str(err.value).startswith(f"r/app:1: manifest {desc.digest}: ")
    assert complaint in str(err.value)
