"""Type URLs carry protobuf full names, even where betterproto renamed the class."""

from __future__ import annotations

from betterproto.lib.google.protobuf import Any as ProtoAny

from daemon import typeurl
from protos.containerd.events import ContainerCreateRuntime, TaskExit, TaskIo, TaskOom
from protos.typeurls import PROTO_NAMES


def test_renamed_classes_use_proto_names() -> None:
    assert typeurl.type_url(TaskIo()) == "containerd.events.TaskIO"
    assert typeurl.type_url(TaskOom()) == "containerd.events.TaskOOM"
    assert typeurl.type_url(ContainerCreateRuntime()) == "containerd.events.ContainerCreate.Runtime"
    assert typeurl.type_url(TaskExit()) == "containerd.events.TaskExit"


def test_decode_by_proto_name_and_with_google_prefix() -> None:
    io = typeurl.pack_any(TaskIo(stdin="/in", terminal=True))
    assert io.type_url == "containerd.events.TaskIO"
    decoded = typeurl.decode_any(
        ProtoAny(type_url="type.googleapis.com/containerd.events.TaskIO", value=io.value)
    )
    assert isinstance(decoded, TaskIo) and decoded.stdin == "/in" and decoded.terminal
    rt = typeurl.decode_any(typeurl.pack_any(ContainerCreateRuntime(name="io.containerd.runc.v2")))
    assert isinstance(rt, ContainerCreateRuntime) and rt.name == "io.containerd.runc.v2"
    assert typeurl.decode_any(ProtoAny(type_url="nobody.Knows", value=b"")) is None


def test_table_covers_every_generated_message() -> None:
    # Every entry points at a class that exists, and proto names are unique.
    import importlib

    for path in PROTO_NAMES:
        module, _, name = path.rpartition(".")
        assert hasattr(importlib.import_module(module), name), path
    assert len(set(PROTO_NAMES.values())) == len(PROTO_NAMES)
