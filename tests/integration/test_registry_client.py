"""The registry client against Debian's docker-registry and against the fake registry's faults.

docker-registry (distribution 2.8) checks the protocol: anonymous, htpasswd
basic auth and bearer tokens, OCI and Docker schema 2 manifests and indexes,
Range requests. The fake registry injects what a real one does only on a bad
day: corrupt blobs, connections dropped mid-blob, 5xx, auth challenges.
Every server and process is stopped by the fixtures, even on failure; all
of them listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from daemon.protocols import Descriptor
from plugins.images.registry.client import BlobStream, RegistryClient, Repository, RetryPolicy
from plugins.images.registry.config import HostConfig
from plugins.images.registry.hosts import Credentials, RegistryHosts
from plugins.images.registry.manifests import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from tests.support import oci
from tests.support.aioserver import ThreadedApp
from tests.support.fakeregistry import FakeRegistry
from tests.support.push import push_image, push_image_sync
from tests.support.registry import PASSWORD, USER, Registry, free_port
from tests.support.tokenauth import TokenServer

pytest_plugins = ["tests.support.fixtures"]

#: tiny delays: a retry test takes milliseconds
FAST = RetryPolicy(
    attempts=3, initial_delay=0.01, max_delay=0.05, max_elapsed=10.0, connect_timeout=2.0, read_timeout=5.0
)
MakeClient = Callable[..., RegistryClient]


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """Clients on the test's loop, all closed at teardown."""
    clients: list[RegistryClient] = []

    def make(
        hosts: dict[str, HostConfig] | None = None, config_path: str = "", retry: RetryPolicy = FAST
    ) -> RegistryClient:
        client = RegistryClient(RegistryHosts(hosts, config_path), retry)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.close()


@pytest.fixture(scope="module")
def anon_registry() -> Iterator[Registry]:
    """One anonymous docker-registry for the module, holding the OCI, Docker and single-manifest images."""
    reg = Registry()
    try:
        reg.start()
        push_image_sync(reg.url, "team/busybox", "oci", oci.busybox_image("gzip", index=True))
        push_image_sync(reg.url, "team/busybox", "docker", oci.busybox_image("gzip", index=True, docker=True))
        push_image_sync(reg.url, "mixed", "1", oci.busybox_image(("gzip", "zstd", "none")))
        yield reg
    finally:
        reg.stop()


async def read(stream: BlobStream) -> bytes:
    async with stream:
        return b"".join([chunk async for chunk in stream])


async def pull_layers(repo: Repository, layers: tuple[Descriptor, ...]) -> list[bytes]:
    """All layers at once, as the orchestrator downloads them."""
    streams = await asyncio.gather(*(repo.fetch_blob(layer) for layer in layers))
    data = await asyncio.gather(*(read(s) for s in streams))
    assert all(s.verified for s in streams)
    return list(data)


def desc_of(blob: oci.Blob | oci.LayerBlob) -> Descriptor:
    return Descriptor(blob.media_type, blob.digest, blob.size)


# -- docker-registry: anonymous ---------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "index_type", "manifest_type"),
    [("oci", OCI_INDEX, OCI_MANIFEST), ("docker", DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)],
)
async def test_index_resolve_select_platform_and_fetch(
    anon_registry: Registry, make_client: MakeClient, tag: str, index_type: str, manifest_type: str
) -> None:
    image = oci.busybox_image("gzip", index=True, docker=tag == "docker")
    client = make_client()
    repo = await client.repository(f"{anon_registry.address}/team/busybox:{tag}")
    assert [ep.url for ep in repo.endpoints] == [f"http://{anon_registry.address}/v2"]  # loopback: plain HTTP
    name, top = await repo.resolve()
    assert name == f"{anon_registry.address}/team/busybox:{tag}"
    assert top == Descriptor(index_type, image.digest, image.top.size)
    assert await repo.fetch_manifest(top) == image.top.data

    for want, platform in [
        (None, "linux/amd64"),
        ("linux/amd64", "linux/amd64"),
        ("linux/arm64", "linux/arm64/v8"),
    ]:
        expected = image.manifest_for(platform)
        desc, manifest = await repo.manifest_for(top, want)
        assert desc.digest == expected.digest and desc.media_type == manifest_type
        assert manifest.media_type == manifest_type
        assert await repo.fetch_bytes(manifest.config) == expected.config.data
        assert [layer.digest for layer in manifest.layers] == [layer.digest for layer in expected.layers]

    _, manifest = await repo.manifest_for(top)
    assert await pull_layers(repo, manifest.layers) == [layer.data for layer in image.manifests[0].layers]

    with pytest.raises(NotFound) as err:
        await repo.manifest_for(top, "linux/s390x")
    assert str(err.value) == (
        f"{name}: no manifest for platform linux/s390x (the index offers: linux/amd64, linux/arm64)"
    )


async def test_resolve_by_digest_and_single_manifest(
    anon_registry: Registry, make_client: MakeClient
) -> None:
    image = oci.busybox_image(("gzip", "zstd", "none"))
    client = make_client()
    _, top = await client.resolve(f"{anon_registry.address}/mixed:1")
    assert top == Descriptor(OCI_MANIFEST, image.digest, image.top.size)
    pinned = f"{anon_registry.address}/mixed@{image.digest}"
    assert await client.resolve(pinned) == (pinned, top)
    repo = await client.repository(pinned)
    desc, manifest = await repo.manifest_for(top)  # a lone manifest: its config says linux/amd64
    assert desc == top
    assert await pull_layers(repo, manifest.layers) == [layer.data for layer in image.manifests[0].layers]
    with pytest.raises(
        NotFound,
        match=r"mixed@sha256:\w+: no manifest for platform linux/arm64 \(the index offers: linux/amd64\)",
    ):
        await repo.manifest_for(top, "linux/arm64")


async def test_unknown_tag_and_repository(anon_registry: Registry, make_client: MakeClient) -> None:
    client = make_client()
    with pytest.raises(NotFound) as err:
        await client.resolve(f"{anon_registry.address}/team/busybox:nope")
    assert str(err.value).startswith(f"{anon_registry.address}/team/busybox:nope: manifest nope not found (")
    assert str(err.value).endswith(f"(http://{anon_registry.address}/v2: HTTP 404)")
    with pytest.raises(NotFound, match="absent:latest: manifest latest not found"):
        await client.resolve(f"{anon_registry.address}/absent")


async def test_blob_from_an_offset(anon_registry: Registry, make_client: MakeClient) -> None:
    """Resuming an ingest after a crash: Range from the offset, digest checked with the prefix's hash."""
    layer = oci.busybox_image("gzip", index=True).manifests[0].layers[0]
    repo = await make_client().repository(f"{anon_registry.address}/team/busybox:oci")
    cut = layer.size // 3
    stream = await repo.fetch_blob(desc_of(layer), cut, hasher=hashlib.sha256(layer.data[:cut]))
    assert await read(stream) == layer.data[cut:] and stream.verified
    # without the prefix's hash only the size can be checked: the content store's commit checks the digest
    stream = await repo.fetch_blob(desc_of(layer), cut)
    assert await read(stream) == layer.data[cut:] and not stream.verified
    stream = await repo.fetch_blob(desc_of(layer), layer.size, hasher=hashlib.sha256(layer.data))
    assert await read(stream) == b"" and stream.verified
    with pytest.raises(InvalidArgument, match=f"offset {layer.size + 1} outside 0..{layer.size}"):
        await repo.fetch_blob(desc_of(layer), layer.size + 1)


# -- docker-registry: basic and token auth ---------------------------------------------


async def test_basic_auth(basic_registry: Registry, busybox: oci.Image, make_client: MakeClient) -> None:
    await push_image(basic_registry.url, "private/busybox", "1", busybox, USER, PASSWORD)
    ref = f"{basic_registry.address}/private/busybox:1"

    with pytest.raises(PermissionDenied) as err:
        await make_client().resolve(ref)
    assert str(err.value) == (
        f"{ref}: registry {basic_registry.address}, repository private/busybox: authentication required "
        f'(Basic realm="berth-test") and no credentials are configured for {basic_registry.address}'
    )

    wrong = make_client({basic_registry.address: HostConfig(username=USER, password="wrong")})
    refused = (
        f"registry {basic_registry.address} refused access to repository private/busybox as '{USER}' even"
    )
    with pytest.raises(PermissionDenied, match=refused):
        await wrong.resolve(ref)

    client = make_client({basic_registry.address: HostConfig(username=USER, password=PASSWORD)})
    repo = await client.repository(ref)
    _, top = await repo.resolve()
    assert top.digest == busybox.digest
    _, manifest = await repo.manifest_for(top)
    assert await pull_layers(repo, manifest.layers) == [layer.data for layer in busybox.manifests[0].layers]

    # credentials of the request (CRI's PullImage auth) instead of config
    _, top = await make_client().resolve(ref, credentials=Credentials(USER, PASSWORD))
    assert top.digest == busybox.digest


async def test_token_auth(
    token_registry: Registry, token_server: TokenServer, busybox_index: oci.Image, make_client: MakeClient
) -> None:
    await push_image(token_registry.url, "tok/busybox", "1", busybox_index, USER, PASSWORD)
    ref = f"{token_registry.address}/tok/busybox:1"

    # anonymous pull is allowed by this token server: an anonymous token
    before = len(token_server.requests)
    _, top = await make_client().resolve(ref)
    assert top.digest == busybox_index.digest
    assert token_server.requests[before:] == [
        {
            "method": "GET",
            "service": token_server.service,
            "scopes": ["repository:tok/busybox:pull"],
            "user": None,
        }
    ]

    # with credentials: one token for the whole pull, parallel downloads included
    client = make_client({token_registry.address: HostConfig(username=USER, password=PASSWORD)})
    before = len(token_server.requests)
    repo = await client.repository(ref)
    _, top = await repo.resolve()
    _, manifest = await repo.manifest_for(top, "linux/arm64")
    layers = await pull_layers(repo, manifest.layers)
    assert layers == [layer.data for layer in busybox_index.manifest_for("linux/arm64").layers]
    assert [r["user"] for r in token_server.requests[before:]] == [USER]

    wrong = make_client({token_registry.address: HostConfig(username=USER, password="nope")})
    with pytest.raises(PermissionDenied) as err:
        await wrong.resolve(ref)
    assert str(err.value) == (
        f"{ref}: registry {token_registry.address}, repository tok/busybox: token server "
        f"{token_server.realm} rejected the credentials of '{USER}' (HTTP 401)"
    )


# -- fake registry: faults ----------------------------------------------------------------


@pytest.fixture
def served(fake_registry: FakeRegistry, busybox: oci.Image) -> FakeRegistry:
    fake_registry.add_image("busybox", "1", busybox)
    return fake_registry


async def test_corrupt_blob_is_refused_naming_the_digest(
    served: FakeRegistry, busybox: oci.Image, make_client: MakeClient
) -> None:
    layer = busybox.manifests[0].layers[1]
    served.corrupt(layer.digest)
    repo = await make_client().repository(f"{served.address}/busybox:1")
    stream = await repo.fetch_blob(desc_of(layer))
    received = bytearray()
    with pytest.raises(FailedPrecondition) as err:
        async with stream:
            async for chunk in stream:
                received += chunk
    message = str(err.value)
    assert message.startswith(f"blob {layer.digest}: digest mismatch: expected {layer.digest}, got sha256:")
    assert f"({served.address}/busybox:1, from http://{served.address}/v2)" in message
    bad = layer.data[:-1] + bytes([layer.data[-1] ^ 0xFF])
    assert bytes(received) == bad and message.split("got ")[1].startswith(oci.sha256_digest(bad))
    assert not stream.verified
    # a small blob read whole fails the same way
    config = busybox.manifests[0].config
    served.corrupt(config.digest)
    with pytest.raises(FailedPrecondition, match=f"blob {config.digest}: digest mismatch"):
        await repo.fetch_bytes(desc_of(config))


async def test_dropped_connection_resumes_with_range(
    served: FakeRegistry, busybox: oci.Image, make_client: MakeClient
) -> None:
    layer = busybox.manifests[0].layers[0]  # busybox itself: about a megabyte
    served.drop_after(layer.digest, 100_000, times=2)
    repo = await make_client().repository(f"{served.address}/busybox:1")
    stream = await repo.fetch_blob(desc_of(layer))
    assert await read(stream) == layer.data
    assert stream.verified and stream.resumes == 2
    seen = [(r.range, r.status) for r in served.records if r.path.endswith(layer.digest)]
    assert seen == [(None, 200), ("bytes=100000-", 206), ("bytes=200000-", 206)]


async def test_a_blob_that_keeps_breaking_without_progress_gives_up(
    served: FakeRegistry, busybox: oci.Image, make_client: MakeClient
) -> None:
    layer = busybox.manifests[0].layers[0]
    served.drop_after(layer.digest, 50_000, times=1)
    repo = await make_client().repository(f"{served.address}/busybox:1")
    stream = await repo.fetch_blob(desc_of(layer))
    served.drop_after(layer.digest, 0, times=100)  # from now on every request breaks at once
    with pytest.raises(Unavailable) as err:
        await read(stream)
    assert str(err.value).startswith(
        f"blob {layer.digest}: download from {served.address} broke off 4 times "
        f"at byte 50000 of {layer.size}: "
    )
    assert served.count(layer.digest) == 4  # the first request and 3 resumes (FAST.attempts)


async def test_5xx_twice_then_ok(served: FakeRegistry, busybox: oci.Image, make_client: MakeClient) -> None:
    served.fail("/manifests/", 2)
    layer = busybox.manifests[0].layers[2]
    served.fail(layer.digest, 2, status=502)
    client = make_client()
    _, top = await client.resolve(f"{served.address}/busybox:1")
    assert top.digest == busybox.digest
    assert [r.status for r in served.records if r.method == "HEAD"] == [503, 503, 200]
    assert await read(await client.fetch_blob(f"{served.address}/busybox:1", desc_of(layer))) == layer.data
    assert [r.status for r in served.records if r.path.endswith(layer.digest)] == [502, 502, 200]


async def test_5xx_for_good_is_unavailable_naming_the_host(
    served: FakeRegistry, make_client: MakeClient
) -> None:
    served.fail("/manifests/", 1000)
    with pytest.raises(Unavailable) as err:
        await make_client().resolve(f"{served.address}/busybox:1")
    assert str(err.value).startswith(
        f"{served.address}/busybox:1: registry {served.address} unavailable after 3 attempts: "
        f"http://{served.address}/v2: HTTP 503"
    )
    assert served.count("/manifests/") == 3
    # the total time bound stops retries before the attempts run out
    patient = RetryPolicy(attempts=1000, initial_delay=0.01, max_delay=0.01, max_elapsed=0.3)
    with pytest.raises(Unavailable, match="unavailable after"):
        await make_client(retry=patient).resolve(f"{served.address}/busybox:1")
    assert 3 + 2 <= served.count("/manifests/") <= 3 + 40


async def test_401_without_credentials(
    served: FakeRegistry, busybox: oci.Image, make_client: MakeClient
) -> None:
    ref = f"{served.address}/busybox:1"
    served.require_basic("puller", "pw")
    with pytest.raises(PermissionDenied) as err:
        await make_client().resolve(ref)
    assert str(err.value).startswith(
        f"{ref}: registry {served.address}, repository busybox: "
        'authentication required (Basic realm="fake-registry") and no credentials'
    )

    served.require_bearer("puller", "pw")
    with pytest.raises(PermissionDenied) as err:
        await make_client().resolve(ref)
    assert str(err.value) == (
        f"{ref}: registry {served.address}, repository busybox: authentication required: token server "
        f"{served.url}/token refused anonymous access (HTTP 401) and no credentials are configured for "
        f"{served.address}"
    )
    client = make_client({served.address: HostConfig(username="puller", password="pw")})
    _, top = await client.resolve(ref)
    assert top.digest == busybox.digest
    assert served.token_requests[-1]["scope"] == "repository:busybox:pull"
    assert served.records[-1].authorization is not None and served.records[-1].authorization.startswith(
        "Bearer "
    )


async def test_registry_down_is_unavailable_naming_the_host(make_client: MakeClient) -> None:
    port = free_port()  # nothing listens there
    ref = f"127.0.0.1:{port}/busybox:1"
    with pytest.raises(Unavailable) as err:
        await make_client().resolve(ref)
    message = str(err.value)
    assert message.startswith(
        f"{ref}: registry 127.0.0.1:{port} unavailable after 3 attempts: http://127.0.0.1:{port}/v2: "
    )
    assert "Connect call failed" in message or "Cannot connect" in message


@pytest.mark.parametrize(
    ("media_type", "complaint"),
    [
        (
            "application/vnd.example.thing.v1+json",
            "unsupported manifest media type 'application/vnd.example.thing.v1+json'",
        ),
        (
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            "unsupported manifest media type 'application/vnd.docker.distribution.manifest.v1+prettyjws': "
            "Docker schema 1 is deprecated",
        ),
    ],
)
async def test_unknown_media_type(
    fake_registry: FakeRegistry, make_client: MakeClient, media_type: str, complaint: str
) -> None:
    top = oci.Blob(media_type, b'{"schemaVersion": 1}')
    fake_registry.add_image("odd", "1", oci.Image(top, ()))
    with pytest.raises(InvalidArgument) as err:
        await make_client().resolve(f"{fake_registry.address}/odd:1")
    assert str(err.value).startswith(f"{fake_registry.address}/odd:1: manifest {top.digest}: {complaint}")


# -- endpoints: mirrors, hosts.toml, TLS ------------------------------------------------------


@pytest.fixture
def mirror() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    try:
        yield fake.start()
    finally:
        fake.stop()


async def test_mirror_first_then_the_server(
    served: FakeRegistry, mirror: FakeRegistry, busybox: oci.Image, make_client: MakeClient
) -> None:
    ref = f"{served.address}/busybox:1"
    client = make_client({served.address: HostConfig(mirrors=[mirror.url], capabilities=["pull"])})
    repo = await client.repository(ref)
    assert [ep.url for ep in repo.endpoints] == [f"{mirror.url}/v2", f"{served.url}/v2"]
    _, top = await repo.resolve()
    assert mirror.count("/manifests/1") == 0  # a pull-only mirror is not asked for tags
    layer = busybox.manifests[0].layers[2]
    assert await read(await repo.fetch_blob(desc_of(layer))) == layer.data  # mirror 404, then the server
    assert mirror.count(layer.digest) == 1 and served.count(layer.digest) == 1

    mirror.add_image("busybox", None, busybox)
    layer = busybox.manifests[0].layers[1]
    assert await read(await repo.fetch_blob(desc_of(layer))) == layer.data
    assert mirror.count(layer.digest) == 1 and served.count(layer.digest) == 0

    # a mirror that is down costs no delay: the server answers in the same attempt
    down = make_client({served.address: HostConfig(mirrors=[f"http://127.0.0.1:{free_port()}"])})
    _, again = await down.resolve(ref)
    assert again == top


async def test_hosts_toml_directory(
    served: FakeRegistry, mirror: FakeRegistry, busybox: oci.Image, tmp_path: Path, make_client: MakeClient
) -> None:
    """An image named after a registry that only exists in hosts.toml (it is never contacted)."""
    directory = tmp_path / "registry.invalid"
    directory.mkdir()
    (directory / "hosts.toml").write_text(
        f'server = "{served.url}"\n\n[host."{mirror.url}"]\n  capabilities = ["pull"]\n'
    )
    client = make_client(config_path=str(tmp_path))
    repo = await client.repository("registry.invalid/busybox:1")
    assert [ep.url for ep in repo.endpoints] == [f"{mirror.url}/v2", f"{served.url}/v2"]
    # both are other hosts than the image's registry: requests name it, as containerd's do
    assert (
        str(repo.url(repo.endpoints[1], "manifests", "1"))
        == f"{served.url}/v2/busybox/manifests/1?ns=registry.invalid"
    )
    name, top = await repo.resolve()
    assert (name, top.digest) == ("registry.invalid/busybox:1", busybox.digest)
    _, manifest = await repo.manifest_for(top)
    assert await pull_layers(repo, manifest.layers) == [layer.data for layer in busybox.manifests[0].layers]
    assert mirror.count("/blobs/") == 4  # config and layers asked there first (404)
    (directory / "hosts.toml").write_text('capabilites = ["pull"]\n')
    with pytest.raises(InvalidArgument, match=r"capabilites: unknown key, did you mean capabilities\?"):
        await client.repository("registry.invalid/busybox:1")


class TLSApp(ThreadedApp):
    """The fake registry's server, behind TLS."""

    def __init__(self, app: web.Application, context: ssl.SSLContext) -> None:
        super().__init__(app)
        self.context = context

    async def _setup(self, runner: web.AppRunner) -> None:
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.context)
        await site.start()
        self.port = int(runner.addresses[0][1])


@pytest.fixture
def tls_registry(tmp_path: Path, busybox: oci.Image) -> Iterator[tuple[FakeRegistry, Path]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    fake = FakeRegistry()
    fake.server = TLSApp(fake.server.app, context)
    fake.add_image("busybox", "1", busybox)
    try:
        yield fake.start(), cert
    finally:
        fake.stop()


async def test_tls_with_a_ca_file(
    tls_registry: tuple[FakeRegistry, Path], busybox: oci.Image, make_client: MakeClient
) -> None:
    fake, ca = tls_registry
    ref = f"{fake.address}/busybox:1"
    server = f"https://{fake.address}"
    client = make_client({fake.address: HostConfig(server=server, ca_file=str(ca))})
    repo = await client.repository(ref)
    assert [ep.url for ep in repo.endpoints] == [f"{server}/v2"]
    _, top = await repo.resolve()
    layer = busybox.manifests[0].layers[2]
    assert top.digest == busybox.digest and await read(await repo.fetch_blob(desc_of(layer))) == layer.data

    with pytest.raises(Unavailable) as err:
        await make_client({fake.address: HostConfig(server=server)}).resolve(ref)
    assert f"TLS with {fake.address} failed" in str(err.value) and "certificate verify failed" in str(
        err.value
    )
    assert fake.count("/manifests/", "HEAD") == 1  # a TLS failure is not retried

    _, top = await make_client({fake.address: HostConfig(server=server, skip_verify=True)}).resolve(ref)
    assert top.digest == busybox.digest
