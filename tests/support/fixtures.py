"""pytest fixtures for images and registries.

Load them as a plugin, from the root conftest or a test module::

    pytest_plugins = ["tests.support.fixtures"]

or import the names into a conftest (``# noqa: F401``).

Every process or server started here is stopped in the fixture's teardown,
by PID for processes, even when the test failed; temporary directories are
removed. Images are built once per session: builds are deterministic, so
sharing them changes nothing but the time.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.support.fakeregistry import FakeRegistry
from tests.support.oci import Image, busybox_image
from tests.support.registry import PASSWORD, USER, Registry
from tests.support.tokenauth import SigningKey, TokenServer


@pytest.fixture(scope="session")
def busybox() -> Image:
    """linux/amd64 busybox image, three gzip layers, OCI media types."""
    return busybox_image("gzip")


@pytest.fixture(scope="session")
def busybox_mixed() -> Image:
    """The busybox image with gzip, zstd and uncompressed layers."""
    return busybox_image(("gzip", "zstd", "none"))


@pytest.fixture(scope="session")
def busybox_index() -> Image:
    """An OCI index: linux/amd64 and linux/arm64/v8 (same layers, distinct configs)."""
    return busybox_image("gzip", index=True)


@pytest.fixture(scope="session")
def busybox_docker() -> Image:
    """Docker schema 2 manifest list over two platforms, rootfs.diff.tar.gzip layers."""
    return busybox_image("gzip", index=True, docker=True)


@pytest.fixture
def make_registry() -> Iterator[Callable[..., Registry]]:
    """Factory of started docker-registry processes (basic ``users`` or a ``token`` server).

    All are stopped by PID at teardown.
    """
    started: list[Registry] = []

    def make(users: Mapping[str, str] | None = None, token: TokenServer | None = None) -> Registry:
        reg = Registry(users=users, token=token)
        started.append(reg)
        return reg.start()

    try:
        yield make
    finally:
        for reg in started:
            reg.stop()


@pytest.fixture
def registry(make_registry: Callable[..., Registry]) -> Registry:
    """An anonymous docker-registry on 127.0.0.1."""
    return make_registry()


@pytest.fixture
def basic_registry(make_registry: Callable[..., Registry]) -> Registry:
    """docker-registry with htpasswd basic auth for ``USER``/``PASSWORD``."""
    return make_registry(users={USER: PASSWORD})


@pytest.fixture
def token_server() -> Iterator[TokenServer]:
    """A token server (RS256 JWTs) knowing ``USER``/``PASSWORD``; anonymous clients may pull."""
    keydir = Path(tempfile.mkdtemp(prefix="berth-tok-", dir="/tmp"))
    server = TokenServer(SigningKey.generate(keydir), {USER: PASSWORD}, anonymous_pull=True)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(keydir, ignore_errors=True)


@pytest.fixture
def token_registry(make_registry: Callable[..., Registry], token_server: TokenServer) -> Registry:
    """docker-registry with ``auth: token`` trusting ``token_server``."""
    return make_registry(token=token_server)


@pytest.fixture
def fake_registry() -> Iterator[FakeRegistry]:
    """An empty :class:`FakeRegistry` (add images with ``add_image``), stopped at teardown."""
    fake = FakeRegistry()
    try:
        yield fake.start()
    finally:
        fake.stop()
