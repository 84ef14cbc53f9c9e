"""ttrpc, containerd's lightweight RPC over unix sockets, for shims.

:mod:`daemon.ttrpc.frame` holds the wire format, :mod:`.client` and
:mod:`.server` the two ends, :mod:`.services` the service tables (method ->
request/response classes) such as containerd.task.v2.Task.
"""

from daemon.ttrpc.client import TtrpcClient
from daemon.ttrpc.server import Method, TtrpcServer, request_metadata

__all__ = ["Method", "TtrpcClient", "TtrpcServer", "request_metadata"]
