"""Image references: parsed and normalized like docker and containerd, bad ones named."""

from __future__ import annotations

import pytest

from daemon.errors import InvalidArgument
from daemon.reference import Reference, check_digest, parse_reference

D256 = "sha256:" + "a" * 64
D512 = "sha512:" + "b" * 128


@pytest.mark.parametrize(
    ("ref", "normalized"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1"),
        ("user/repo", "docker.io/user/repo:latest"),
        ("user/repo/sub:v_1.0-rc", "docker.io/user/repo/sub:v_1.0-rc"),
        ("localhost/foo", "localhost/foo:latest"),
        ("localhost:5000/foo/bar:tag", "localhost:5000/foo/bar:tag"),
        ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest"),
        ("[::1]:5000/foo:bar", "[::1]:5000/foo:bar"),
        ("ghcr.io/org/img", "ghcr.io/org/img:latest"),
        ("Registry.Example.com/a.b/c_d__e/f-g---h", "Registry.Example.com/a.b/c_d__e/f-g---h:latest"),
        (f"127.0.0.1:5000/busybox@{D256}", f"127.0.0.1:5000/busybox@{D256}"),
        (f"ghcr.io/org/img:v1@{D256}", f"ghcr.io/org/img:v1@{D256}"),
        (f"busybox@{D512}", f"docker.io/library/busybox@{D512}"),
    ],
)
def test_normalizes_like_docker(ref: str, normalized: str) -> None:
    parsed = parse_reference(ref)
    assert str(parsed) == normalized
    assert parse_reference(normalized) == parsed  # normalizing is idempotent


def test_parts_and_object() -> None:
    r = parse_reference("localhost:5000/team/app:v2")
    assert (r.domain, r.path, r.tag, r.digest) == ("localhost:5000", "team/app", "v2", "")
    assert r.name == "localhost:5000/team/app" and r.object == "v2"
    pinned = parse_reference(f"ghcr.io/org/img:v1@{D256}")
    assert pinned.tag == "v1" and pinned.object == D256  # the digest is what is pulled
    by_digest = parse_reference(f"busybox@{D256}")
    assert by_digest.tag == "" and by_digest.object == D256
    assert parse_reference("busybox").with_digest(D256) == Reference(
        "docker.io", "library/busybox", "latest", D256
    )


@pytest.mark.parametrize(
    ("ref", "complaint"),
    [
        ("", "must not be empty"),
        ("busybox:", "invalid tag ''"),
        ("busybox:-x", "invalid tag '-x'"),
        ("busybox:" + "t" * 129, "invalid tag"),
        ("BusyBox", "repository name 'library/BusyBox' must be lowercase"),
        ("docker.io/Library/busybox", "must be lowercase"),
        ("busy box", "whitespace"),
        (" busybox", "whitespace"),
        ("a" * 64, "image id, not a reference"),
        ("busybox@sha256:abc", "invalid digest 'sha256:abc'"),
        ("busybox@sha256:" + "A" * 64, "lowercase hex"),
        ("busybox@sha256:" + "a" * 63 + "g", "invalid digest"),
        ("busybox@md5:" + "a" * 32, "unsupported digest algorithm 'md5'"),
        ("busybox@sha512:" + "a" * 64, "sha512 needs 128"),
        ("foo//bar", "invalid repository name 'foo//bar'"),
        ("-foo", "invalid repository name"),
        ("foo/bar-", "invalid repository name"),
        ("example.com:port/foo", "invalid registry host 'example.com:port'"),
        ("exa_mple.com/foo", "invalid registry host"),
        ("example.com/" + "a" * 250, "longer than 255"),
    ],
)
def test_bad_references_are_named(ref: str, complaint: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_reference(ref)
    assert complaint in str(err.value)
    if ref:
        assert f"image reference {ref!r}: " in str(err.value)


def test_check_digest() -> None:
    assert check_digest(D256, "x") == D256
    assert check_digest("sha384:" + "c" * 96, "x").startswith("sha384:")
    with pytest.raises(InvalidArgument, match=r"^layer 3: invalid digest 'nope'"):
        check_digest("nope", "layer 3")
