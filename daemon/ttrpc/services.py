"""Service tables: what a ttrpc service's methods take and return.

ttrpc has no Python code generator, so a service is described by a table
method name -> (request class, response class), built from the betterproto
messages generated for its .proto. The server uses the request class to decode
payloads; callers use the response class with :meth:`TtrpcClient.call`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import betterproto.lib.google.protobuf as pb

from daemon.ttrpc.server import Method
from protos.berth.shim.v1 import ReopenLogRequest
from protos.containerd.services.events.ttrpc.v1 import ForwardRequest
from protos.containerd.task.v2 import (
    CheckpointTaskRequest,
    CloseIoRequest,
    ConnectRequest,
    ConnectResponse,
    CreateTaskRequest,
    CreateTaskResponse,
    DeleteRequest,
    DeleteResponse,
    ExecProcessRequest,
    KillRequest,
    PauseRequest,
    PidsRequest,
    PidsResponse,
    ResizePtyRequest,
    ResumeRequest,
    ShutdownRequest,
    StartRequest,
    StartResponse,
    StateRequest,
    StateResponse,
    StatsRequest,
    StatsResponse,
    UpdateTaskRequest,
    WaitRequest,
    WaitResponse,
)

ServiceTable = Mapping[str, tuple[type[Any], type[Any]]]

TASK_SERVICE = "containerd.task.v2.Task"

TASK_METHODS: ServiceTable = {
    "State": (StateRequest, StateResponse),
    "Create": (CreateTaskRequest, CreateTaskResponse),
    "Start": (StartRequest, StartResponse),
    "Delete": (DeleteRequest, DeleteResponse),
    "Pids": (PidsRequest, PidsResponse),
    "Pause": (PauseRequest, pb.Empty),
    "Resume": (ResumeRequest, pb.Empty),
    "Checkpoint": (CheckpointTaskRequest, pb.Empty),
    "Kill": (KillRequest, pb.Empty),
    "Exec": (ExecProcessRequest, pb.Empty),
    "ResizePty": (ResizePtyRequest, pb.Empty),
    "CloseIO": (CloseIoRequest, pb.Empty),
    "Update": (UpdateTaskRequest, pb.Empty),
    "Wait": (WaitRequest, WaitResponse),
    "Stats": (StatsRequest, StatsResponse),
    "Connect": (ConnectRequest, ConnectResponse),
    "Shutdown": (ShutdownRequest, pb.Empty),
}

#: What shims call at $TTRPC_ADDRESS to hand events to the daemon (berthd serves it).
EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"

EVENTS_METHODS: ServiceTable = {
    "Forward": (ForwardRequest, pb.Empty),
}

#: berth's own service of berth-shim-runc-v2 (containerd's shim does not serve it): CRI log files.
LOGS_SERVICE = "berth.shim.v1.Logs"

LOGS_METHODS: ServiceTable = {
    "Reopen": (ReopenLogRequest, pb.Empty),
}


def snake_case(method: str) -> str:
    """``CloseIO`` -> ``close_io``, ``ResizePty`` -> ``resize_pty``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", method).lower()


def bind(table: ServiceTable, impl: object) -> dict[str, Method]:
    """Server handlers for every method of ``table`` that ``impl`` implements.

    Method ``State`` is served by ``impl.state``; methods ``impl`` lacks are left
    out, so clients get UNIMPLEMENTED for them as upstream does.
    """
    handlers: dict[str, Method] = {}
    for name, (request_cls, _response_cls) in table.items():
        handler = getattr(impl, snake_case(name), None)
        if handler is not None:
            handlers[name] = Method(request_cls, handler)
    return handlers
