"""plugins.cri.images: references, AuthConfig credentials, and CriImages over an in-memory images plugin.

The fake images plugin keeps records in a dict and resolves targets from a
table, so grouping by id, resolution order, idempotent removal and the
ImageFsInfo usage cache are checked without a registry; the real pull is
covered end to end by tests/integration/test_cri_images.py.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

from daemon.errors import InvalidArgument, NotFound
from daemon.metadata.db import MetadataDB
from daemon.metadata.images import Image
from daemon.protocols import Descriptor, ImageManager, Kind, SnapshotInfo, Usage
from plugins.cri import images as cri_images
from plugins.cri.images import (
    LABEL_MANAGED,
    LABEL_PINNED,
    CriImage,
    CriImages,
    PullCredentials,
    credentials,
    normalize,
)
from plugins.images.registry.hosts import Credentials
from plugins.images.service import ImageService

NS = "k8s.io"
INDEX = "application/vnd.oci.image.index.v1+json"


def digest(c: str) -> str:
    return "sha256:" + c * 64


# -- references --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "normalized"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/team/app:v1", "docker.io/team/app:v1"),
        ("localhost/app", "localhost/app:latest"),
        ("127.0.0.1:5000/team/app", "127.0.0.1:5000/team/app:latest"),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
        (f"busybox@{digest('a')}", f"docker.io/library/busybox@{digest('a')}"),
        # a tag and a digest: the digest is what is pulled, the tag is dropped (ParseDockerRef)
        (f"quay.io/x/y:v2@{digest('b')}", f"quay.io/x/y@{digest('b')}"),
    ],
)
def test_normalize(ref: str, normalized: str) -> None:
    assert str(normalize(ref)) == normalized


@pytest.mark.parametrize(
    ("ref", "says"),
    [
        ("", "must not be empty"),
        ("bad ref", "whitespace"),
        ("a" * 64, "image id"),
        ("team/Upper", "lowercase"),
        ("busybox:-x", "invalid tag"),
        ("busybox@sha256:abc", "invalid digest"),
        ("-bad-/x", "repository name"),
        ("host:99999999999999999999x/app", "registry host"),
    ],
)
def test_normalize_rejects(ref: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says):
        normalize(ref)


def test_images_plugin_is_an_image_manager() -> None:
    """mypy checks this assignment: the images plugin's API still matches the protocol the CRI codes to."""

    def as_manager(service: ImageService) -> ImageManager:
        return service

    assert callable(as_manager)


# -- credentials ---------------------------------------------------------------------------------


def test_pull_credentials_are_shaped_as_the_images_plugins() -> None:
    """The images plugin reads these attributes; a field added there must be added here."""
    ours = {f.name for f in dataclasses.fields(PullCredentials)}
    assert ours == {f.name for f in dataclasses.fields(Credentials)}
    a = PullCredentials("u", "p", "i", "r")
    assert a.key == Credentials("u", "p", "i", "r").key
    assert "p" not in repr(a) and bool(a) and not PullCredentials()


def test_credentials_from_auth_config() -> None:
    assert credentials("r.io") is None
    assert credentials("r.io", username="u", password="p") == PullCredentials("u", "p")
    # username wins over identity_token, which wins over auth
    encoded = base64.b64encode(b"eve:pw:with:colons\x00").decode()
    assert credentials("r.io", username="u", identity_token="t", auth=encoded) == PullCredentials("u")
    assert credentials("r.io", identity_token="t", auth=encoded) == PullCredentials(identity_token="t")
    assert credentials("r.io", auth=encoded) == PullCredentials("eve", "pw:with:colons")
    assert credentials("r.io", registry_token="tok") == PullCredentials(registry_token="tok")
    with pytest.raises(InvalidArgument, match=r"auth\.auth"):
        credentials("r.io", auth="%%%")
    with pytest.raises(InvalidArgument, match=r"auth\.auth"):
        credentials("r.io", auth=base64.b64encode(b"no-colon").decode())


@pytest.mark.parametrize(
    ("domain", "server", "used"),
    [
        ("r.io:5000", "r.io:5000", True),
        ("r.io:5000", "https://r.io:5000/v2/", True),
        ("r.io:5000", "r.io", False),
        ("docker.io", "https://index.docker.io/v1/", True),
        ("docker.io", "registry-1.docker.io", True),
        ("quay.io", "https://index.docker.io/v1/", False),
    ],
)
def test_credentials_for_another_server_are_ignored(domain: str, server: str, used: bool) -> None:
    got = credentials(domain, username="u", password="p", server_address=server)
    assert (got is not None) is used


@pytest.mark.parametrize(
    ("user", "expected"),
    [("", (None, "")), ("1000", (1000, "")), ("1000:50", (1000, "")), ("nobody:nogroup", (None, "nobody"))],
)
def test_image_user(user: str, expected: tuple[int | None, str]) -> None:
    image = CriImage("sha256:x", 1, "", {"config": {"User": user}})
    assert image.user == expected


# -- CriImages over a fake images plugin -----------------------------------------------------------


class FakeImages:
    """Records in a dict; ``targets`` maps a target digest to what ``inspect`` returns (absent: NotFound)."""

    def __init__(self) -> None:
        self.records: dict[str, Image] = {}
        self.targets: dict[str, Any] = {}
        self.inspected: list[str] = []
        self.removed: list[tuple[str, bool]] = []
        self.pulls: list[tuple[str, Any, dict[str, str], str | None]] = []
        #: what a pull of a reference resolves to: reference -> target digest
        self.registry: dict[str, str] = {}

    def add_target(self, target: str, config_digest: str, size: int = 100, user: str = "") -> Descriptor:
        self.targets[target] = SimpleNamespace(
            config=SimpleNamespace(
                descriptor=Descriptor("application/vnd.oci.image.config.v1+json", config_digest, 10),
                raw={"config": {"User": user}, "rootfs": {"diff_ids": []}},
            ),
            chain_ids=[digest("c"), digest("d")],
            size=size,
        )
        return Descriptor(INDEX, target, 5)

    async def get(self, namespace: str, name: str) -> Image:
        assert namespace == NS
        try:
            return self.records[name]
        except KeyError:
            raise NotFound(f"image {name!r}: not found") from None

    async def list(self, namespace: str, filters: Sequence[str] = ()) -> list[Image]:
        return sorted(self.records.values(), key=lambda i: i.name)

    async def save(
        self, namespace: str, name: str, target: Descriptor, labels: Mapping[str, str] | None = None
    ) -> Image:
        old = self.records.get(name)
        merged = {**(old.labels if old else {}), **(labels or {})}
        self.records[name] = Image(name, target, merged)
        return self.records[name]

    async def remove(self, namespace: str, name: str, *, target_digest: str = "", sync: bool = False) -> None:
        record = self.records.get(name)
        if record is None or (target_digest and record.target.digest != target_digest):
            raise NotFound(f"image {name!r}: not found")
        del self.records[name]
        self.removed.append((name, sync))

    async def pull(
        self,
        namespace: str,
        ref: str,
        *,
        platform: str | None = None,
        auth: Any = None,
        labels: Mapping[str, str] | None = None,
        snapshotter: str | None = None,
        unpack: bool = True,
    ) -> Image:
        self.pulls.append((ref, auth, dict(labels or {}), snapshotter))
        target = self.registry[ref]
        return await self.save(namespace, ref, Descriptor(INDEX, target, 5), labels)

    async def inspect(self, namespace: str, image: Image | str, *, platform: str | None = None) -> Any:
        record = image if isinstance(image, Image) else await self.get(namespace, image)
        self.inspected.append(record.target.digest)
        found = self.targets.get(record.target.digest)
        if found is None:
            raise NotFound(f"{record.name}: manifest {record.target.digest} is not in the content store")
        return found


class FakeSnapshotter:
    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[Kind, Usage]] = {}
        self.measured: list[str] = []
        self.vanish: set[str] = set()

    async def walk(self, namespace: str, filters_: Sequence[str] = ()) -> AsyncIterator[SnapshotInfo]:
        for key, (kind, _) in sorted(self.snapshots.items()):
            yield SnapshotInfo(kind, key)

    async def usage(self, namespace: str, key: str) -> Usage:
        if key in self.vanish:
            raise NotFound(f"snapshot {key!r}: not found")
        self.measured.append(key)
        return self.snapshots[key][1]


@pytest.fixture
def fake() -> FakeImages:
    return FakeImages()


@pytest.fixture
def sn() -> FakeSnapshotter:
    return FakeSnapshotter()


@pytest.fixture
def store(fake: FakeImages, sn: FakeSnapshotter) -> CriImages:
    db = SimpleNamespace(snapshotter=lambda name: sn, request_gc=lambda: None)
    return CriImages(fake, cast(MetadataDB, db), snapshotter="overlayfs", mountpoint="/var/lib/berth/sn")


async def test_pull_records_tag_digest_and_id(fake: FakeImages, store: CriImages) -> None:
    fake.add_target(digest("1"), digest("f"))
    fake.registry["docker.io/library/busybox:1.36"] = digest("1")
    creds = PullCredentials("u", "p")
    image_id = await store.pull("busybox:1.36", creds)
    assert image_id == digest("f")
    assert fake.pulls == [("docker.io/library/busybox:1.36", creds, {LABEL_MANAGED: "managed"}, "overlayfs")]
    assert set(fake.records) == {
        "docker.io/library/busybox:1.36",
        f"docker.io/library/busybox@{digest('1')}",
        digest("f"),
    }
    assert all(r.labels == {LABEL_MANAGED: "managed"} for r in fake.records.values())
    assert {r.target.digest for r in fake.records.values()} == {digest("1")}

    # by digest: no tag record; pinned marks every record it writes
    fake.registry[f"docker.io/library/busybox@{digest('1')}"] = digest("1")
    await store.pull(f"busybox@{digest('1')}", pinned=True)
    assert len(fake.records) == 3
    [image] = await store.list()
    assert image.pinned
    with pytest.raises(InvalidArgument):
        await store.pull("Not A Ref")


async def test_list_groups_records_by_id(fake: FakeImages, store: CriImages) -> None:
    one = fake.add_target(digest("1"), digest("f"), size=123, user="1000")
    two = fake.add_target(digest("2"), digest("e"))
    fake.records = {
        "docker.io/library/a:1": Image("docker.io/library/a:1", one),
        "docker.io/library/a:latest": Image("docker.io/library/a:latest", one),
        f"docker.io/library/a@{digest('1')}": Image(f"docker.io/library/a@{digest('1')}", one),
        digest("f"): Image(digest("f"), one),
        "docker.io/library/b:1": Image("docker.io/library/b:1", two, {LABEL_PINNED: "pinned"}),
        # content gone (or another platform's image): not a CRI image, and no error
        "docker.io/library/broken:1": Image("docker.io/library/broken:1", Descriptor(INDEX, digest("9"), 1)),
    }
    images = await store.list()
    assert [(i.id, i.repo_tags, i.repo_digests, i.size, i.pinned) for i in images] == [
        (digest("e"), ["docker.io/library/b:1"], [], 100, True),
        (
            digest("f"),
            ["docker.io/library/a:1", "docker.io/library/a:latest"],
            [f"docker.io/library/a@{digest('1')}"],
            123,
            False,
        ),
    ]
    assert images[1].user == (1000, "")
    assert images[1].chain_id == digest("d")
    # immutable content is inspected once per target, however often kubelet lists
    await store.list()
    assert fake.inspected.count(digest("1")) == 1


async def test_get_resolves_like_containerd(fake: FakeImages, store: CriImages) -> None:
    one = fake.add_target(digest("1"), "sha256:ab" + "0" * 62)
    two = fake.add_target(digest("2"), "sha256:ac" + "0" * 62)
    await fake.save(NS, "docker.io/library/a:1", one)
    await fake.save(NS, "docker.io/library/c:1", two)
    for name in (
        "a:1",
        "docker.io/library/a:1",
        "sha256:ab" + "0" * 62,
        "ab0",
        "sha256:ab0",
        "ab" + "0" * 62,
    ):
        found = await store.get(name)
        assert found is not None and found.id == "sha256:ab" + "0" * 62, name
    assert await store.get("a:2") is None
    assert await store.get("sha256:" + "f" * 64) is None
    assert await store.get("NOT/a ref") is None
    with pytest.raises(InvalidArgument, match="ambiguous"):
        await store.get("a")  # docker.io/library/a:latest is no record; as an id prefix, two match
    with pytest.raises(InvalidArgument):
        await store.get("")


async def test_remove_takes_every_record_and_is_idempotent(fake: FakeImages, store: CriImages) -> None:
    one = fake.add_target(digest("1"), digest("f"))
    other = fake.add_target(digest("3"), digest("e"))
    for name in ("docker.io/library/a:1", f"docker.io/library/a@{digest('1')}", digest("f")):
        await fake.save(NS, name, one)
    await fake.save(NS, "docker.io/library/keep:1", other)
    removed = await store.remove("a:1")
    assert removed is not None and removed.id == digest("f")
    assert set(fake.records) == {"docker.io/library/keep:1"}
    # the last removal collects garbage synchronously, the others do not
    assert [sync for _, sync in fake.removed] == [False, False, True]
    assert await store.remove("a:1") is None
    assert await store.remove(digest("f")) is None


async def test_remove_leaves_a_record_repointed_meanwhile(fake: FakeImages, store: CriImages) -> None:
    one = fake.add_target(digest("1"), digest("f"))
    newer = fake.add_target(digest("2"), digest("e"))
    await fake.save(NS, "docker.io/library/a:1", one)
    await fake.save(NS, digest("f"), one)
    real_remove = fake.remove

    async def racing_remove(
        namespace: str, name: str, *, target_digest: str = "", sync: bool = False
    ) -> None:
        if name == "docker.io/library/a:1":  # a pull of a newer a:1 lands first
            await fake.save(NS, name, newer)
        await real_remove(namespace, name, target_digest=target_digest, sync=sync)

    fake.remove = racing_remove  # type: ignore[method-assign]
    await store.remove(digest("f"))
    assert fake.records["docker.io/library/a:1"].target.digest == digest("2")
    assert digest("f") not in fake.records


async def test_fs_usage_sums_snapshots_and_caches_committed(
    store: CriImages, sn: FakeSnapshotter, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = await store.fs_usage()
    assert (empty.used_bytes, empty.inodes_used, empty.mountpoint) == (0, 0, "/var/lib/berth/sn")
    sn.snapshots = {
        "layer-1": (Kind.COMMITTED, Usage(inodes=10, size=1000)),
        "layer-2": (Kind.COMMITTED, Usage(inodes=5, size=500)),
        "ctr-rootfs": (Kind.ACTIVE, Usage(inodes=1, size=7)),
        "gone": (Kind.ACTIVE, Usage(inodes=99, size=99)),
    }
    sn.vanish = {"gone"}  # removed between walk and usage
    first = await store.fs_usage()
    assert (first.used_bytes, first.inodes_used) == (1507, 16)
    assert first.timestamp_ns > 0
    await store.fs_usage()
    assert sorted(sn.measured) == ["ctr-rootfs", "layer-1", "layer-2"]  # active reused within the TTL
    monkeypatch.setattr(cri_images, "ACTIVE_USAGE_TTL", 0.0)
    await store.fs_usage()
    assert sn.measured.count("ctr-rootfs") == 2 and sn.measured.count("layer-1") == 1
    del sn.snapshots["layer-2"]
    assert (await store.fs_usage()).used_bytes == 1007
