"""Type URLs: how an event travels as ``google.protobuf.Any``.

containerd names an ``Any``'s type by the message's protobuf full name, with
no ``type.googleapis.com/`` prefix (``containerd.events.TaskExit``); clients
look the name up to decode. betterproto's class names do not always equal
the proto names (``TaskIO`` becomes ``TaskIo``; nested ``ContainerCreate.Runtime``
becomes ``ContainerCreateRuntime``), so names come from ``protos.typeurls``,
a table generated from the descriptors with the rest of ``protos/``.
"""

from __future__ import annotations

import importlib
from typing import Any

import betterproto
from betterproto.lib.google.protobuf import Any as ProtoAny

from protos.typeurls import PROTO_NAMES

#: proto full name -> "package.PythonClass" (module path minus ``protos.``)
_BY_PROTO_NAME = {proto: path.removeprefix("protos.") for path, proto in PROTO_NAMES.items()}

_TYPES: dict[str, type[betterproto.Message] | None] = {}


def type_url(event: Any) -> str:
    """The containerd type url of an event: ``containerd.events.TaskExit``.

    For a class generated into ``protos.<package>`` it is the proto package
    plus the class name; a class may override it with a ``__type_url__``
    attribute; an ``Any`` carries its own.
    """
    if isinstance(event, ProtoAny):
        return str(event.type_url)
    cls: type[Any] = type(event)
    override = getattr(cls, "__type_url__", None)
    if isinstance(override, str):
        return override
    path = f"{cls.__module__}.{cls.__name__}"
    known: str | None = PROTO_NAMES.get(path)
    if known is not None:
        return known
    return path.removeprefix("protos.")


def register_type(cls: type[betterproto.Message]) -> type[betterproto.Message]:
    """Make ``decode_any`` know a message class (usable as a decorator).

    Classes generated under ``protos.`` are found without registration.
    """
    _TYPES[type_url(cls())] = cls
    return cls


def _resolve(url: str) -> type[betterproto.Message] | None:
    if url in _TYPES:
        return _TYPES[url]
    found: type[betterproto.Message] | None = None
    name = url.rsplit("/", 1)[-1]  # tolerate "type.googleapis.com/pkg.Msg"
    name = _BY_PROTO_NAME.get(name, name)
    module, _, cls_name = name.rpartition(".")
    if module and all(part.isidentifier() for part in (*module.split("."), cls_name)):
        try:
            candidate = getattr(importlib.import_module(f"protos.{module}"), cls_name, None)
        except ImportError:
            candidate = None
        if isinstance(candidate, type) and issubclass(candidate, betterproto.Message):
            found = candidate
    _TYPES[url] = found
    return found


def decode_any(value: ProtoAny) -> betterproto.Message | None:
    """The message packed in an ``Any``, or None when its type is unknown."""
    cls = _resolve(value.type_url)
    return None if cls is None else cls().parse(value.value)


def pack_any(event: Any) -> ProtoAny:
    """An event as ``google.protobuf.Any`` (as the Events service sends it)."""
    if isinstance(event, ProtoAny):
        return event
    return ProtoAny(type_url=type_url(event), value=bytes(event))
