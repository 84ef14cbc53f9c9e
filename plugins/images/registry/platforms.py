"""Platforms (``linux/amd64``, ``linux/arm64/v8``) and choosing one manifest of an index.

Specifiers are parsed and normalized as containerd does (``x86_64`` is
``amd64``, ``aarch64`` is ``arm64`` whose ``v8`` variant is implied,
``armhf`` is ``arm/v7`` ...), so ``linux/arm64`` and ``linux/arm64/v8``
name the same platform. The default is the host's platform.

Selection follows containerd's ``platforms.Only``: the wanted platform
first, then what it can also run (``amd64`` runs ``386``; ``arm64`` runs
``arm/v8`` down to ``arm/v5``; ``arm/v7`` runs ``v6`` and ``v5``), earlier
entries of the index winning ties. An index entry without a platform is a
last resort, as in containerd (the caller may check the image config).
"""

from __future__ import annotations

import platform as _host
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.errors import InvalidArgument, NotFound
from daemon.protocols import Descriptor

#: operating systems a one-word specifier may name (anything else is an architecture)
KNOWN_OS = frozenset(
    {"aix", "android", "darwin", "dragonfly", "freebsd", "illumos", "ios", "js", "linux", "netbsd"}
    | {"openbsd", "plan9", "solaris", "wasip1", "windows"}
)
_COMPONENT = re.compile(r"[A-Za-z0-9_.-]+\Z")


@dataclass(frozen=True)
class Platform:
    """An OCI platform, normalized (compare instances with ``==``)."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Platform:
        """From an index entry's ``platform`` object (``os``, ``architecture``, ``variant``)."""
        os_ = str(value.get("os", "")).lower()
        arch, variant = normalize_arch(
            str(value.get("architecture", "")), str(value.get("variant", "") or "")
        )
        return cls(os_, arch, variant)


def normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd's architecture normalization (``platforms.normalizeArch``)."""
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        if variant in ("8", "v8", "v8.0"):
            variant = ""
        elif variant in ("9", "9.0", "v9.0"):
            variant = "v9"
        return "arm64", variant
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
        return "arm", variant
    return arch, variant


def default_platform() -> Platform:
    """The host's platform (``linux/amd64`` on an x86-64 Linux)."""
    arch, variant = normalize_arch(_host.machine() or "amd64", "")
    return Platform(_host.system().lower() or "linux", arch, variant)


def parse_platform(spec: str) -> Platform:
    """``os[/arch[/variant]]`` or a bare ``arch``, normalized; InvalidArgument naming ``spec``."""
    parts = spec.split("/") if spec else []
    if not 1 <= len(parts) <= 3 or not all(_COMPONENT.match(p) for p in parts):
        raise InvalidArgument(
            f"platform {spec!r}: expected os/architecture[/variant], e.g. linux/amd64 or linux/arm64/v8"
        )
    host = default_platform()
    if len(parts) == 1:
        word = parts[0].lower()
        if word in KNOWN_OS:
            return Platform(word, host.architecture, host.variant if word == host.os else "")
        arch, variant = normalize_arch(word, "")
        return Platform(host.os, arch, variant)
    arch, variant = normalize_arch(parts[1], parts[2] if len(parts) == 3 else "")
    return Platform(parts[0].lower(), arch, variant)


def compatible(want: Platform) -> list[Platform]:
    """``want`` and what it can also run, most preferred first (containerd's ``platforms.Only``)."""
    out = [want]
    if want.architecture == "amd64":
        level = _variant_level(want.variant)
        out += [Platform(want.os, "amd64", "" if v == 1 else f"v{v}") for v in range(level - 1, 0, -1)]
        out.append(Platform(want.os, "386"))
    elif want.architecture == "arm64":
        out += _arm32(want.os, 8)
    elif want.architecture == "arm":
        out += _arm32(want.os, _variant_level(want.variant))[1:]
    return out


def _variant_level(variant: str) -> int:
    m = re.fullmatch(r"v(\d+)", variant)
    return int(m.group(1)) if m else 1


def _arm32(os_: str, top: int) -> list[Platform]:
    return [Platform(os_, "arm", f"v{v}") for v in range(top, 4, -1)]


def select_manifest(
    entries: Sequence[tuple[Descriptor, Platform | None]],
    want: Platform | str | None = None,
    *,
    image: str = "",
) -> Descriptor:
    """The entry of an index to pull for ``want`` (default: the host's platform).

    ``entries`` are the index's manifests with their platforms, in index
    order. No match: NotFound naming ``image``, the platform and the
    platforms the index offers.
    """
    target = default_platform() if want is None else parse_platform(want) if isinstance(want, str) else want
    prefs = compatible(target)
    best: tuple[int, int] | None = None
    chosen: Descriptor | None = None
    for position, (desc, plat) in enumerate(entries):
        rank = len(prefs) if plat is None else prefs.index(plat) if plat in prefs else -1
        if rank < 0:
            continue
        if best is None or (rank, position) < best:
            best, chosen = (rank, position), desc
    if chosen is None:
        offered = sorted({str(p) for _, p in entries if p is not None})
        what = f"{image}: " if image else ""
        raise NotFound(
            f"{what}no manifest for platform {target} "
            f"(the index offers: {', '.join(offered) if offered else 'none'})"
        )
    return chosen
