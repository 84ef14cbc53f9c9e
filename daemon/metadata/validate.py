"""The input rules of the metadata store, as containerd states them.

Every name that becomes a key in the store (namespaces, lease ids, later
image and container ids) follows containerd's identifier rule, and every
label follows containerd's size limit, so that objects created through
berth are valid for containerd clients and the reverse. The checks run
inside the store's transactions, which makes them impossible to skip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from daemon.errors import FailedPrecondition, InvalidArgument

#: containerd's ``identifiers.maxLength``.
IDENTIFIER_MAX_LENGTH = 76
#: containerd's identifier grammar, as shown to the operator in errors.
IDENTIFIER_PATTERN = "[A-Za-z0-9]+([._-][A-Za-z0-9]+)*"
_IDENTIFIER_RE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")

#: containerd's ``labels.maxSize``: bytes of key plus value, per label.
LABEL_MAX_SIZE = 4096

_DIGEST_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}
_HEX_RE = re.compile(r"[a-f0-9]+")


def quote(value: str, limit: int = 80) -> str:
    """Go's ``%q`` for error messages, shortened so a 4 KiB key stays readable."""
    if len(value) > limit:
        value = value[:limit] + "..."
    return json.dumps(value, ensure_ascii=False)


def validate_identifier(field: str, value: object) -> str:
    """Check ``value`` against containerd's identifier rule; ``field`` names it in errors.

    Raises InvalidArgument such as
    ``namespace "Bad Name": invalid: must match [A-Za-z0-9]+([._-][A-Za-z0-9]+)*``.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: invalid: must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidArgument(f"{field}: invalid: must not be empty")
    if len(value) > IDENTIFIER_MAX_LENGTH:
        limit = IDENTIFIER_MAX_LENGTH
        raise InvalidArgument(
            f"{field} {quote(value)}: invalid: greater than maximum length ({limit} characters)"
        )
    if _IDENTIFIER_RE.fullmatch(value) is None:
        raise InvalidArgument(f"{field} {quote(value)}: invalid: must match {IDENTIFIER_PATTERN}")
    return value


#: Longest lease id accepted (containerd sets none; bolt keys are bounded by page size).
LEASE_ID_MAX_LENGTH = 256


def validate_lease_id(value: object) -> str:
    """Lease ids are NOT identifiers: containerd accepts any non-empty id.

    Its client names leases ``<nanoseconds>-<base64url>`` (``leases.WithRandomID``),
    e.g. ``486088630-8__0``, which the identifier rule would refuse one time in
    ten. berth refuses only what cannot be a sane key: empty, over
    :data:`LEASE_ID_MAX_LENGTH` characters, whitespace or control characters.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"lease: invalid: must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidArgument("lease: invalid: must not be empty")
    if len(value) > LEASE_ID_MAX_LENGTH:
        raise InvalidArgument(
            f"lease {quote(value)}: invalid: greater than maximum length ({LEASE_ID_MAX_LENGTH} characters)"
        )
    if any(c.isspace() or not c.isprintable() for c in value):
        raise InvalidArgument(f"lease {quote(value)}: invalid: whitespace or control characters")
    return value


def require_namespace(namespace: object) -> str:
    """The namespace of a namespace-scoped call: required, then a valid identifier.

    A missing namespace is FailedPrecondition (the caller forgot to scope the
    request), a malformed one InvalidArgument, as in containerd's
    ``namespaces.NamespaceRequired``.
    """
    if namespace == "" or namespace is None:
        raise FailedPrecondition("namespace is required")
    return validate_identifier("namespace", namespace)


def validate_labels(owner: str, labels: Mapping[str, str]) -> dict[str, str]:
    """Check every label of ``owner`` (e.g. ``namespace "foo"``) and return a plain copy.

    The limit is containerd's: key and value together at most
    :data:`LABEL_MAX_SIZE` bytes (UTF-8), per label.
    """
    if not isinstance(labels, Mapping):
        raise InvalidArgument(f"{owner}: labels: must be a mapping, not {type(labels).__name__}")
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"{owner}: label {quote(str(key))}: key and value must be strings")
        size = len(key.encode()) + len(value.encode())
        if size > LABEL_MAX_SIZE:
            raise InvalidArgument(
                f"{owner}: label {quote(key)}: key and value length ({size} bytes) "
                f"greater than maximum size ({LABEL_MAX_SIZE} bytes)"
            )
        out[key] = value
    return out


def validate_digest(field: str, value: object) -> str:
    """Check an OCI digest (``sha256:<64 hex>``, sha384, sha512), as go-digest's Parse does."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: invalid digest: must be a string, not {type(value).__name__}")
    algorithm, sep, encoded = value.partition(":")
    if not sep:
        raise InvalidArgument(f"{field} {quote(value)}: invalid digest: missing algorithm prefix")
    length = _DIGEST_HEX_LENGTH.get(algorithm)
    if length is None:
        raise InvalidArgument(
            f"{field} {quote(value)}: invalid digest: unsupported algorithm {quote(algorithm)}"
        )
    if len(encoded) != length or _HEX_RE.fullmatch(encoded) is None:
        raise InvalidArgument(
            f"{field} {quote(value)}: invalid digest: {algorithm} needs {length} lowercase hex characters"
        )
    return value
