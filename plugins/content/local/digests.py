"""Digest strings and hashing, the way go-digest spells and checks them.

Accepted algorithms are those of :func:`daemon.metadata.validate.validate_digest`
(sha256, sha384, sha512); sha256 is the canonical one, used whenever the
caller did not announce an expected digest of another algorithm.
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

from daemon.metadata.validate import validate_digest

CANONICAL = "sha256"

#: hex characters of a digest, by algorithm (those validate_digest accepts)
HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}

#: read size when hashing a file (large enough that hashlib releases the GIL)
CHUNK = 1 << 20


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def parse(field: str, value: str) -> tuple[str, str]:
    """``(algorithm, hex)`` of a digest; InvalidArgument naming ``field`` when malformed."""
    validate_digest(field, value)
    algorithm, _, encoded = value.partition(":")
    return algorithm, encoded


def algorithm_of(digest: str) -> str:
    """The algorithm of an already validated digest, or the canonical one for ""."""
    return digest.partition(":")[0] if digest else CANONICAL


def new_hasher(algorithm: str) -> Hasher:
    return hashlib.new(algorithm)


def hash_fd(fd: int, algorithm: str, size: int) -> tuple[Hasher, int]:
    """Hash the first ``size`` bytes of ``fd`` (positioned reads; blocks).

    Returns the hasher (to continue from) and the bytes actually hashed,
    fewer than ``size`` only if the file is shorter.
    """
    hasher = new_hasher(algorithm)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[: min(CHUNK, size - done)]], done)
        if n == 0:
            break
        hasher.update(view[:n])
        done += n
    return hasher, done
