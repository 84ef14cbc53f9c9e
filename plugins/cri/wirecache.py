"""List answers built from pre-encoded entries: betterproto's encoder is the cost of a big List.

Encoding a ``ListContainersResponse`` of 500 containers with betterproto takes
~100 ms of the daemon's CPU (upb does it in one); building the 500 messages
from the store adds more. Yet an entry changes rarely: a container's
``cri.Container`` differs from one List to the next only when its state does.
So each object's encoded entry is kept (:class:`EncodedEntries`) with the
*version* it was encoded at (the tuple of the object's fields that can
change, e.g. its state), re-encoded only when the version read at List time
differs: a state or status change invalidates it without any hook having to
remember to, and a removed object is forgotten by its owner.

A List answer (every one of them has its entries as repeated field 1) is the
entries joined as length-delimited field-1 records (tag ``0x0a``, varint
length, bytes): exactly what betterproto writes for the repeated field, in
the same order. :func:`preencoded` hands those bytes to grpclib: grpclib's
``ProtoCodec.encode`` checks ``isinstance(message, response type)`` and calls
``SerializeToString()``, which is betterproto's ``bytes(message)``; the
instance returned is of a subclass of the response type whose ``__bytes__``
returns the joined payload. Its fields stay empty: it is for the wire only
(a client decodes it as the ordinary response).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar, cast

import betterproto

M = TypeVar("M", bound=betterproto.Message)

#: The tag of a length-delimited field 1 (field number 1 << 3 | wire type 2).
FIELD1_TAG = b"\x0a"


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field1(entry: bytes) -> bytes:
    """One encoded message as an element of a repeated message field 1."""
    return FIELD1_TAG + varint(len(entry)) + entry


def join_field1(entries: Iterable[bytes]) -> bytes:
    """Encoded messages as a repeated field 1: the body of a List response."""
    return b"".join(field1(e) for e in entries)


class EncodedEntries:
    """Encoded wire bytes of one message per object, keyed by object id, kept while its version holds.

    ``get`` returns the cached bytes when the version given equals the one
    they were encoded at; otherwise it calls ``build`` and encodes (and keeps)
    the new message. What is kept is the element form (:func:`field1`), so a
    List is a join and nothing else.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Hashable, bytes]] = {}
        self.encoded = 0  # messages encoded so far (a test's view of cache hits)

    def get(self, key: str, version: Hashable, build: Callable[[], betterproto.Message]) -> bytes:
        """The field-1 element of ``key`` at ``version``, encoding ``build()`` only if not cached."""
        found = self._entries.get(key)
        if found is not None and found[0] == version:
            return found[1]
        data = field1(bytes(build()))
        self._entries[key] = (version, data)
        self.encoded += 1
        return data

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


_SUBCLASSES: dict[type[Any], type[Any]] = {}


def _wire_bytes(self: betterproto.Message) -> bytes:
    data: bytes = self.__dict__["_berth_wire"]
    return data


def preencoded(cls: type[M], elements: Iterable[bytes]) -> M:
    """An instance of ``cls`` (a List response) whose encoding is ``elements`` joined.

    ``elements`` are field-1 elements (from :meth:`EncodedEntries.get`). The
    instance passes grpclib's type check and serializes to exactly what
    ``cls(items=[...])`` would, without a message being built or encoded.
    """
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        # the parent's metadata (its field types are forward references into the parent's module)
        namespace = {
            "__bytes__": _wire_bytes,
            "__module__": cls.__module__,
            "_betterproto_meta": cls._betterproto,
        }
        sub = type(f"Preencoded{cls.__name__}", (cls,), namespace)
        _SUBCLASSES[cls] = sub
    msg = cast(M, sub())
    msg.__dict__["_berth_wire"] = b"".join(elements)
    return msg


__all__ = ["EncodedEntries", "field1", "join_field1", "preencoded", "varint"]
