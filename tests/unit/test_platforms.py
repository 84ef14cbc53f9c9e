"""Platform specifiers and choosing the manifest of an index (containerd's rules)."""

from __future__ import annotations

import pytest

from daemon.errors import InvalidArgument, NotFound
from daemon.protocols import Descriptor
from plugins.images.registry.manifests import OCI_MANIFEST
from plugins.images.registry.platforms import (
    Platform,
    compatible,
    default_platform,
    parse_platform,
    select_manifest,
)


def desc(n: int) -> Descriptor:
    return Descriptor(OCI_MANIFEST, "sha256:" + f"{n:x}" * 64, 100 + n)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("linux/amd64", Platform("linux", "amd64")),
        ("linux/x86_64", Platform("linux", "amd64")),
        ("linux/amd64/v1", Platform("linux", "amd64")),
        ("linux/amd64/v3", Platform("linux", "amd64", "v3")),
        ("linux/arm64", Platform("linux", "arm64")),
        ("linux/arm64/v8", Platform("linux", "arm64")),
        ("linux/aarch64", Platform("linux", "arm64")),
        ("linux/arm", Platform("linux", "arm", "v7")),
        ("linux/armhf", Platform("linux", "arm", "v7")),
        ("linux/armel", Platform("linux", "arm", "v6")),
        ("linux/arm/6", Platform("linux", "arm", "v6")),
        ("linux/i386", Platform("linux", "386")),
        ("Linux/AMD64", Platform("linux", "amd64")),
        ("windows/amd64", Platform("windows", "amd64")),
        ("amd64", Platform("linux", "amd64")),
        ("arm64", Platform("linux", "arm64")),
    ],
)
def test_parse_normalizes(spec: str, expected: Platform) -> None:
    assert parse_platform(spec) == expected


def test_default_is_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # the test machines are x86-64 Linux, the default
    assert default_platform() == Platform("linux", "amd64")
    assert parse_platform("linux") == Platform("linux", "amd64")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert default_platform() == Platform("linux", "arm64")
    assert str(parse_platform("linux")) == "linux/arm64"


@pytest.mark.parametrize("spec", ["", "linux/", "/amd64", "a/b/c/d", "linux amd64", "linux/amd64/"])
def test_bad_specifiers_are_named(spec: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"platform {spec!r}: expected os/architecture"):
        parse_platform(spec)


def test_str_round_trips() -> None:
    for spec in ("linux/amd64", "linux/arm64", "linux/arm/v7", "windows/amd64"):
        assert str(parse_platform(spec)) == spec


def test_from_json_normalizes() -> None:
    assert Platform.from_json({"os": "linux", "architecture": "arm64", "variant": "v8"}) == Platform(
        "linux", "arm64"
    )
    assert Platform.from_json({"os": "linux", "architecture": "arm"}) == Platform("linux", "arm", "v7")


def test_compatible_platforms_in_preference_order() -> None:
    assert [str(p) for p in compatible(parse_platform("linux/amd64"))] == ["linux/amd64", "linux/386"]
    assert [str(p) for p in compatible(parse_platform("linux/arm64"))] == [
        "linux/arm64",
        "linux/arm/v8",
        "linux/arm/v7",
        "linux/arm/v6",
        "linux/arm/v5",
    ]
    assert [str(p) for p in compatible(parse_platform("linux/arm/v7"))] == [
        "linux/arm/v7",
        "linux/arm/v6",
        "linux/arm/v5",
    ]
    assert [str(p) for p in compatible(parse_platform("linux/amd64/v3"))] == [
        "linux/amd64/v3",
        "linux/amd64/v2",
        "linux/amd64",
        "linux/386",
    ]


INDEX = [
    (desc(1), Platform("linux", "amd64")),
    (desc(2), Platform("linux", "arm64")),
    (desc(3), Platform("linux", "arm", "v7")),
    (desc(4), Platform("unknown", "unknown")),  # an attestation manifest, as buildx writes
]


def test_select_default_and_explicit() -> None:
    assert select_manifest(INDEX) == desc(1)
    assert select_manifest(INDEX, "linux/amd64") == desc(1)
    assert select_manifest(INDEX, "linux/arm64") == desc(2)
    assert select_manifest(INDEX, "linux/arm64/v8") == desc(2)
    assert select_manifest(INDEX, Platform("linux", "arm", "v7")) == desc(3)


def test_exact_match_beats_a_compatible_one_listed_earlier() -> None:
    entries = [(desc(5), Platform("linux", "arm", "v7")), (desc(6), Platform("linux", "arm64"))]
    assert select_manifest(entries, "linux/arm64") == desc(6)
    assert select_manifest(entries[:1], "linux/arm64") == desc(5)  # arm64 runs arm/v7
    assert select_manifest([(desc(7), Platform("linux", "386"))], "linux/amd64") == desc(7)


def test_ties_go_to_the_first_entry_and_no_platform_is_a_last_resort() -> None:
    assert select_manifest(
        [(desc(1), Platform("linux", "amd64")), (desc(2), Platform("linux", "amd64"))]
    ) == desc(1)
    assert select_manifest([(desc(3), None), (desc(4), Platform("linux", "amd64"))]) == desc(4)
    assert select_manifest([(desc(3), None)], "linux/s390x") == desc(3)


def test_no_match_names_image_platform_and_offer() -> None:
    with pytest.raises(NotFound) as err:
        select_manifest(INDEX, "linux/s390x", image="docker.io/library/busybox:latest")
    assert str(err.value) == (
        "docker.io/library/busybox:latest: no manifest for platform linux/s390x "
        "(the index offers: linux/amd64, linux/arm/v7, linux/arm64, unknown/unknown)"
    )
    with pytest.raises(NotFound, match=r"offers: none"):
        select_manifest([], "linux/amd64")
    with pytest.raises(NotFound, match="platform linux/arm/v6"):
        select_manifest(INDEX, "linux/arm/v6")  # arm/v6 cannot run arm/v7
