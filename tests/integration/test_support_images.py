"""The test-image builder, the registry fixtures, the pusher and the fake registry.

Other tests trust these helpers to tell them what berth should have stored,
so they are checked here against independent readers: Python's tarfile and
hashlib, Debian's docker-registry and skopeo, and busybox itself run in a
chroot of the unpacked image.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Literal

import aiohttp
import pytest
import zstandard

from tests.support import oci
from tests.support import registry as registry_module
from tests.support.fakeregistry import FakeRegistry
from tests.support.push import (
    RegistryClient,
    RegistryError,
    push_image,
    push_image_sync,
    skopeo_copy,
    skopeo_inspect,
)
from tests.support.registry import PASSWORD, USER, Registry
from tests.support.tokenauth import TokenServer

# -- builder -------------------------------------------------------------------


def decompress(layer: oci.LayerBlob) -> bytes:
    if layer.compression == "gzip":
        return gzip.decompress(layer.data)
    if layer.compression == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(layer.data)
    return layer.data


def apply_layers(root: Path, layers: tuple[oci.LayerBlob, ...]) -> None:
    """A plain reference applier: extract in order, honouring OCI whiteouts."""
    for layer in layers:
        with tarfile.open(fileobj=io.BytesIO(decompress(layer))) as tf:
            for m in tf.getmembers():
                p = PurePosixPath(m.name)
                if p.name == ".wh..wh..opq":
                    for child in (root / p.parent).iterdir():
                        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
                    continue
                if p.name.startswith(".wh."):
                    gone = root / p.parent / p.name.removeprefix(".wh.")
                    shutil.rmtree(gone) if gone.is_dir() and not gone.is_symlink() else gone.unlink()
                    continue
                target = root / m.name
                if target.is_symlink() or (target.exists() and not (m.isdir() and target.is_dir())):
                    target.unlink()
                tf.extract(m, root, filter="tar")


def test_layer_is_sorted_root_owned_and_fixed_in_time() -> None:
    layer = (
        oci.Layer()
        .hardlink("b/link", "b/file")
        .file("/b/file", "x", mode=0o600)
        .symlink("a/sh", "/bin/busybox")
        .whiteout("c/gone")
        .opaque("d")
    )
    assert layer.entries() == ["a", "a/sh", "b", "b/file", "c", "c/.wh.gone", "d", "d/.wh..wh..opq", "b/link"]
    members = oci.read_tar_members(layer.tar())
    assert list(members) == layer.entries()
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members.values()} == {
        (0, 0, "", "", oci.FIXED_MTIME)
    }
    assert members["b/file"].mode == 0o600 and members["a/sh"].linkname == "/bin/busybox"
    assert members["b/link"].islnk() and members["b/link"].linkname == "b/file"
    with pytest.raises(ValueError, match="path"):
        oci.Layer().file("../escape", "x")


def test_builds_are_deterministic_and_digests_are_right() -> None:
    first = oci.busybox_image(("gzip", "zstd", "none"), index=True)
    second = oci.busybox_image(("gzip", "zstd", "none"), index=True)
    assert {d: b.data for d, b in first.blobs().items()} == {d: b.data for d, b in second.blobs().items()}
    assert first.digest == second.digest
    for digest, blob in first.blobs().items():
        assert digest == "sha256:" + hashlib.sha256(blob.data).hexdigest()

    amd64, arm64 = first.manifest_for("linux/amd64"), first.manifest_for("linux/arm64")
    assert [layer.media_type for layer in amd64.layers] == [
        oci.OCI_LAYER_GZIP,
        oci.OCI_LAYER_ZSTD,
        oci.OCI_LAYER,
    ]
    for layer in amd64.layers:
        assert decompress(layer) == layer.tar
        assert layer.diff_id == "sha256:" + hashlib.sha256(layer.tar).hexdigest()
    d = amd64.diff_ids
    expected_chain = [d[0]]
    for diff_id in d[1:]:
        expected_chain.append(
            "sha256:" + hashlib.sha256(f"{expected_chain[-1]} {diff_id}".encode()).hexdigest()
        )
    assert amd64.chain_ids == expected_chain and len(set(expected_chain)) == 3

    cfg = amd64.config_json
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": d}
    assert (cfg["os"], cfg["architecture"], cfg["config"]["Cmd"]) == ("linux", "amd64", ["/bin/sh"])
    assert cfg["config"]["Env"] == [f"PATH={oci.DEFAULT_PATH}"]
    assert arm64.config_json["architecture"] == "arm64" and arm64.platform.variant == "v8"
    assert arm64.digest != amd64.digest and arm64.diff_ids == d

    manifest = json.loads(amd64.manifest.data)
    assert manifest["config"] == {
        "mediaType": oci.OCI_CONFIG,
        "digest": amd64.config.digest,
        "size": amd64.config.size,
    }
    assert [layer["digest"] for layer in manifest["layers"]] == [layer.digest for layer in amd64.layers]
    index = json.loads(first.top.data)
    assert first.is_index and index["mediaType"] == oci.OCI_INDEX
    assert [(m["digest"], m["platform"]) for m in index["manifests"]] == [
        (amd64.digest, {"os": "linux", "architecture": "amd64"}),
        (arm64.digest, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
    ]


def test_docker_variant_uses_schema2_media_types(busybox_docker: oci.Image) -> None:
    assert busybox_docker.media_type == oci.DOCKER_MANIFEST_LIST
    m = busybox_docker.manifest_for("linux/amd64")
    assert m.media_type == oci.DOCKER_MANIFEST and m.config.media_type == oci.DOCKER_CONFIG
    assert {layer.media_type for layer in m.layers} == {oci.DOCKER_LAYER_GZIP}
    # Same layer bytes as the OCI image: only the descriptors differ.
    assert m.diff_ids == oci.busybox_image("gzip").manifests[0].diff_ids
    with pytest.raises(ValueError, match="zstd"):
        oci.busybox_image("zstd", docker=True)


def test_big_image_has_five_layers_of_mixed_data() -> None:
    img = oci.busybox_image("gzip", bulk_bytes=4 << 20)
    m = img.manifests[0]
    assert len(m.layers) == 5 and len(set(m.chain_ids)) == 5
    bulk = sum(layer.uncompressed_size for layer in m.layers[1:])
    assert bulk > 4 << 20
    # Half random: gzip cannot shrink the bulk below ~half.
    assert sum(layer.size for layer in m.layers[1:]) > bulk // 3


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_unpacked_busybox_runs_and_whiteouts_apply(busybox_mixed: oci.Image, tmp_path: Path) -> None:
    m = busybox_mixed.manifests[0]
    base = oci.read_tar_members(m.layers[0].data)
    assert base["bin/busybox"].mode == 0o755 and base["bin/ls"].linkname == "/bin/busybox"
    root = tmp_path / "rootfs"
    root.mkdir()
    apply_layers(root, m.layers)
    for path in oci.BUSYBOX_PRESENT:
        assert os.path.lexists(root / path), path
    for path in oci.BUSYBOX_ABSENT:
        assert not os.path.lexists(root / path), path
    assert (root / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert (root / "data/hello-link.txt").stat().st_ino == (root / "data/hello.txt").stat().st_ino
    out = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "cat /data/hello.txt; ls /opt/cache; id -u app"],
        capture_output=True,
        text=True,
        timeout=10,
        env={"PATH": oci.DEFAULT_PATH},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == oci.HELLO_TEXT.decode() + "fresh.txt\n1000\n"


# -- archives ------------------------------------------------------------------


def test_oci_layout_and_archive_read_by_skopeo(busybox_index: oci.Image, tmp_path: Path) -> None:
    layout = oci.write_oci_layout(busybox_index, tmp_path / "layout", image_name="example.test/busybox:1")
    index = json.loads((layout / "index.json").read_bytes())
    assert index["manifests"][0]["digest"] == busybox_index.digest
    assert index["manifests"][0]["annotations"] == {
        oci.ANNOTATION_REF_NAME: "latest",
        oci.ANNOTATION_CONTAINERD_NAME: "example.test/busybox:1",
    }
    assert json.loads((layout / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    raw = skopeo_inspect(f"oci:{layout}:latest", raw=True)
    assert raw == json.loads(busybox_index.top.data)
    info = skopeo_inspect(f"oci:{layout}:latest")
    assert info["Layers"] == [layer.digest for layer in busybox_index.manifests[0].layers]
    # A full copy reads and verifies every blob of both platforms.
    skopeo_copy(f"oci:{layout}:latest", f"oci:{tmp_path / 'copy'}:x")

    second = oci.busybox_image("zstd")
    oci.write_oci_layout(second, layout, ref_name="zstd")
    refs = [
        m["annotations"][oci.ANNOTATION_REF_NAME]
        for m in json.loads((layout / "index.json").read_bytes())["manifests"]
    ]
    assert refs == ["latest", "zstd"]
    assert skopeo_inspect(f"oci:{layout}:zstd")["Digest"] == second.digest

    archive = oci.oci_archive(busybox_index, tmp_path / "image.tar")
    assert archive.read_bytes() == oci.oci_archive(busybox_index, tmp_path / "again.tar").read_bytes()
    assert skopeo_inspect(f"oci-archive:{archive}:latest")["Digest"] == busybox_index.digest


@pytest.mark.parametrize("style", ["classic", "oci"])
def test_docker_save_archive_read_by_skopeo(
    busybox: oci.Image, tmp_path: Path, style: Literal["classic", "oci"]
) -> None:
    path = oci.docker_save_archive(busybox, tmp_path / "save.tar", "busybox:1", style=style)
    with tarfile.open(path) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        repositories = json.load(tf.extractfile("repositories"))  # type: ignore[arg-type]
    m = busybox.manifests[0]
    assert manifest[0]["RepoTags"] == ["busybox:1"] and len(manifest[0]["Layers"]) == 3
    assert list(repositories) == ["busybox"] and list(repositories["busybox"]) == ["1"]
    # skopeo names docker-archive layers by their uncompressed digest, whichever style.
    assert skopeo_inspect(f"docker-archive:{path}")["Layers"] == m.diff_ids


# -- docker-registry -----------------------------------------------------------------


def test_registry_retries_a_taken_port_and_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real_free_port = registry_module.free_port
        monkeypatch.setattr(registry_module, "free_port", lambda: ports.pop() if ports else real_free_port())
        with Registry() as reg:
            assert reg.port != taken.getsockname()[1]
            assert "address already in use" in reg.log()
            pid, base = reg.pid, reg.base
            no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with no_proxy.open(f"{reg.url}/v2/", timeout=5) as r:
                assert r.status == 200
            image = oci.busybox_image("none")
            assert push_image_sync(reg.url, "sync", "1", image) == image.digest
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not base.exists()


async def test_push_to_anonymous_registry_and_read_back(registry: Registry, busybox_index: oci.Image) -> None:
    digest = await push_image(registry.url, "test/busybox", "1", busybox_index)
    assert digest == busybox_index.digest
    async with RegistryClient(registry.url) as client:
        assert await client.tags("test/busybox") == ["1"]
        top = await client.get_manifest("test/busybox", "1")
        assert top.body == busybox_index.top.data
        assert top.headers["Content-Type"] == oci.OCI_INDEX
        assert top.headers["Docker-Content-Digest"] == busybox_index.digest
        for m in busybox_index.manifests:
            got = await client.get_manifest("test/busybox", m.digest)
            assert got.body == m.manifest.data
            for d in m.blobs():
                assert oci.sha256_digest(await client.get_blob("test/busybox", d)) == d
        # Pushing again uploads nothing.
        assert not await client.push_blob("test/busybox", busybox_index.manifests[0].config.digest, b"")
    raw = skopeo_inspect(f"docker://{registry.address}/test/busybox:1", raw=True)
    assert raw == json.loads(busybox_index.top.data)
    info = skopeo_inspect(f"docker://{registry.address}/test/busybox:1")
    assert info["Architecture"] == "amd64" and info["Digest"] == busybox_index.digest


async def test_skopeo_pushes_an_oci_layout(
    registry: Registry, busybox_mixed: oci.Image, tmp_path: Path
) -> None:
    layout = oci.write_oci_layout(busybox_mixed, tmp_path / "layout")
    skopeo_copy(f"oci:{layout}:latest", f"docker://{registry.address}/mixed:v1")
    async with RegistryClient(registry.url) as client:
        got = await client.get_manifest("mixed", "v1")
    assert got.headers["Docker-Content-Digest"] == busybox_mixed.digest
    assert [layer["mediaType"] for layer in got.json()["layers"]] == [
        oci.OCI_LAYER_GZIP,
        oci.OCI_LAYER_ZSTD,
        oci.OCI_LAYER,
    ]


async def test_basic_auth_registry(basic_registry: Registry, busybox_docker: oci.Image) -> None:
    async with RegistryClient(basic_registry.url) as anonymous:
        reply = await anonymous.request("GET", "/v2/")
        assert reply.status == 401
        assert reply.headers["WWW-Authenticate"].startswith("Basic ")
    with pytest.raises(RegistryError) as wrong:
        await push_image(basic_registry.url, "busybox", "1", busybox_docker, USER, "wrong")
    assert wrong.value.status == 401
    digest = await push_image(basic_registry.url, "busybox", "1", busybox_docker, USER, PASSWORD)
    assert digest == busybox_docker.digest
    raw = skopeo_inspect(f"docker://{basic_registry.address}/busybox:1", True, USER, PASSWORD)
    assert raw["mediaType"] == oci.DOCKER_MANIFEST_LIST


async def test_token_auth_registry(
    token_registry: Registry, token_server: TokenServer, busybox: oci.Image
) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{token_registry.url}/v2/busybox/manifests/1") as r:
        scheme, _, params = r.headers["WWW-Authenticate"].partition(" ")
        assert r.status == 401 and scheme == "Bearer"
        assert f'realm="{token_server.realm}"' in params and f'service="{token_server.service}"' in params
        assert 'scope="repository:busybox:pull"' in params
    async with RegistryClient(token_registry.url) as anonymous:
        # Anonymous tokens carry pull only: the registry refuses the upload.
        with pytest.raises(RegistryError) as refused:
            await anonymous.push_image("busybox", "1", busybox)
        assert refused.value.status == 401

    async with RegistryClient(token_registry.url, USER, PASSWORD) as client:
        assert await client.push_image("busybox", "1", busybox) == busybox.digest
        assert client.token_fetches == 1
    token_request = token_server.requests[-1]
    assert token_request["user"] == USER and token_request["scopes"] == ["repository:busybox:pull,push"]

    async with RegistryClient(token_registry.url) as puller:
        got = await puller.get_manifest("busybox", "1")
        assert got.body == busybox.top.data
    assert skopeo_inspect(f"docker://{token_registry.address}/busybox:1")["Digest"] == busybox.digest

    # The token is a JWT the registry could verify offline: x5c header, claims from our config.
    token = token_server.issue("someone", ["repository:busybox:pull,push"], anonymous=True)
    header, claims = (json.loads(base64.urlsafe_b64decode(p + "==")) for p in token.split(".")[:2])
    assert header["alg"] == "RS256" and len(header["x5c"]) == 1
    assert claims["aud"] == token_server.service and claims["iss"] == token_server.issuer
    assert claims["access"] == [{"type": "repository", "name": "busybox", "actions": ["pull"]}]


# -- fake registry -------------------------------------------------------------------


async def test_fake_registry_serves_ranges_and_faults(
    fake_registry: FakeRegistry, busybox: oci.Image
) -> None:
    fake_registry.add_image("library/busybox", "1", busybox)
    layer = busybox.manifests[0].layers[0]
    blob_path = f"/v2/library/busybox/blobs/{layer.digest}"
    url = fake_registry.url
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/v2/library/busybox/manifests/1") as r:
            assert r.status == 200 and await r.read() == busybox.top.data
            assert r.headers["Content-Type"] == oci.OCI_MANIFEST
            assert r.headers["Docker-Content-Digest"] == busybox.digest
        async with s.get(f"{url}/v2/library/busybox/manifests/2") as r:
            assert r.status == 404
        async with s.get(f"{url}/v2/other/blobs/{layer.digest}") as r:
            assert r.status == 404

        async with s.get(url + blob_path, headers={"Range": "bytes=100-"}) as r:
            assert (
                r.status == 206 and r.headers["Content-Range"] == f"bytes 100-{layer.size - 1}/{layer.size}"
            )
            assert await r.read() == layer.data[100:]
        async with s.get(url + blob_path, headers={"Range": f"bytes={layer.size}-"}) as r:
            assert r.status == 416

        # Dropped after 1000 bytes, once; the client resumes with Range.
        fake_registry.drop_after(layer.digest, 1000)
        got = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(url + blob_path) as r:
                async for chunk in r.content.iter_any():
                    got += chunk
        assert got == layer.data[:1000]
        async with s.get(url + blob_path, headers={"Range": f"bytes={len(got)}-"}) as r:
            assert r.status == 206
            got += await r.read()
        assert oci.sha256_digest(got) == layer.digest

        fake_registry.corrupt(layer.digest)
        async with s.get(url + blob_path) as r:
            bad = await r.read()
        assert len(bad) == layer.size and oci.sha256_digest(bad) != layer.digest

        fake_registry.fail(layer.digest, times=2, status=503)
        statuses = []
        for _ in range(3):
            async with s.head(url + blob_path) as r:
                statuses.append(r.status)
        assert statuses == [503, 503, 200]

    assert fake_registry.count(blob_path, "GET") == 5
    assert fake_registry.count(blob_path, "HEAD") == 3
    assert fake_registry.hits[f"GET {blob_path}"] == 5
    assert [r.range for r in fake_registry.records if r.path == blob_path][:2] == [
        "bytes=100-",
        f"bytes={layer.size}-",
    ]


async def test_fake_registry_auth_challenges(fake_registry: FakeRegistry, busybox: oci.Image) -> None:
    fake_registry.add_image("busybox", "1", busybox)
    fake_registry.require_basic("u", "p")
    async with RegistryClient(fake_registry.url) as anonymous:
        reply = await anonymous.request("GET", "/v2/busybox/manifests/1")
        assert reply.status == 401 and reply.headers["WWW-Authenticate"].startswith("Basic ")
    async with RegistryClient(fake_registry.url, "u", "p") as client:
        assert (await client.get_manifest("busybox", "1")).body == busybox.top.data

    fake_registry.require_bearer("u", "p")
    async with RegistryClient(fake_registry.url, "u", "wrong") as wrong:
        with pytest.raises(RegistryError, match="token"):
            await wrong.get_manifest("busybox", "1")
    fake_registry.fail("/token", times=1, status=500)
    async with RegistryClient(fake_registry.url, "u", "p") as flaky:
        with pytest.raises(RegistryError) as failed:
            await flaky.get_manifest("busybox", "1")
        assert failed.value.status == 500
    async with RegistryClient(fake_registry.url, "u", "p") as client:
        reply = await client.request("GET", f"/v2/busybox/blobs/{busybox.manifests[0].config.digest}")
        assert reply.status == 200 and reply.body == busybox.manifests[0].config.data
        assert client.token_fetches == 1
    assert fake_registry.token_requests[-1]["scope"] == "repository:busybox:pull"
    assert fake_registry.token_requests[-1]["service"] == "fake-registry"
    challenged = [r for r in fake_registry.records if r.status == 401 and r.path.startswith("/v2/")]
    assert len(challenged) == 5
