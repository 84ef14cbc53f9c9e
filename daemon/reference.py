"""Image references, parsed and normalized the way docker and containerd do.

``busybox`` means ``docker.io/library/busybox:latest``: the first path
component is a registry host only if it looks like one (it has a ``.`` or a
``:``, or is ``localhost``), ``index.docker.io`` is spelled ``docker.io``,
official images get ``library/``, and a reference without tag or digest gets
``latest``. A reference may carry both a tag and a digest
(``name:tag@sha256:...``); the digest is what is pulled, the tag only names
it. Anything else is an :class:`~daemon.errors.InvalidArgument` that quotes
the reference and says which part is wrong.

The grammar is the one of ``distribution/reference`` (the docker and
containerd reference parser), written as regular expressions below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from daemon.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_MAX = 255

#: digest algorithms berth verifies, and the hex length of each
DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_DOMAIN_RE = re.compile(rf"{_DOMAIN}\Z")
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*\Z")
_TAG_RE = re.compile(rf"{_TAG}\Z")
_DIGEST_RE = re.compile(rf"{_DIGEST}\Z")
_HEX64_RE = re.compile(r"[a-f0-9]{64}\Z")


@dataclass(frozen=True)
class Reference:
    """A normalized image reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        """The repository with its registry: ``docker.io/library/busybox``."""
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What ``/v2/<path>/manifests/<object>`` asks for: the digest if there is one, else the tag."""
        return self.digest or self.tag

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, self.tag, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out


def parse_reference(ref: str) -> Reference:
    """``ref`` parsed and normalized (default registry, ``library/``, ``latest``).

    Raises InvalidArgument naming ``ref`` and the part at fault.
    """
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument("image reference: must not be empty")
    if ref != ref.strip() or any(c.isspace() for c in ref):
        raise InvalidArgument(f"image reference {ref!r}: must not contain whitespace")
    if _HEX64_RE.match(ref):
        raise InvalidArgument(
            f"image reference {ref!r}: a 64-character hexadecimal string is an image id, not a reference"
        )
    rest, at, digest = ref.partition("@")
    if at:
        check_digest(digest, f"image reference {ref!r}")
    # the tag is after the last ':' that follows the last '/' (a ':' before it is a port)
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag = ""
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidArgument(
                f"image reference {ref!r}: invalid tag {tag!r} "
                "(letters, digits, '_', '.', '-'; at most 128, not starting with '.' or '-')"
            )
    domain, path = _split_domain(rest)
    if not _DOMAIN_RE.match(domain):
        raise InvalidArgument(f"image reference {ref!r}: invalid registry host {domain!r}")
    if path.lower() != path:
        raise InvalidArgument(f"image reference {ref!r}: repository name {path!r} must be lowercase")
    if not _PATH_RE.match(path):
        raise InvalidArgument(
            f"image reference {ref!r}: invalid repository name {path!r} "
            "(lowercase letters and digits, separated by '/', '.', '_', '__' or '-')"
        )
    if len(domain) + 1 + len(path) > NAME_MAX:
        raise InvalidArgument(f"image reference {ref!r}: repository name longer than {NAME_MAX} characters")
    if not tag and not digest:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    if not slash or (not any(c in first for c in ".:") and first != "localhost" and first.lower() == first):
        domain, path = DEFAULT_DOMAIN, name
    else:
        domain, path = first, remainder
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    return domain, path


def check_digest(digest: str, what: str) -> str:
    """``digest`` if it is ``algorithm:hex`` with a supported algorithm and the right length.

    ``what`` names the object the digest belongs to in the InvalidArgument raised.
    """
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InvalidArgument(f"{what}: invalid digest {digest!r} (expected algorithm:hex)")
    algorithm, _, hexpart = digest.partition(":")
    length = DIGEST_HEX_LENGTH.get(algorithm)
    if length is None:
        known = ", ".join(DIGEST_HEX_LENGTH)
        raise InvalidArgument(f"{what}: unsupported digest algorithm {algorithm!r} in {digest!r} ({known})")
    if len(hexpart) != length or hexpart.lower() != hexpart:
        raise InvalidArgument(
            f"{what}: invalid digest {digest!r}: {algorithm} needs {length} lowercase hex digits"
        )
    return digest
