"""The RuntimeService mixin for Exec, Attach and PortForward: each answers a URL on the streaming server.

kubelet (or crictl) then connects to that URL with SPDY or WebSocket; the
request is validated and a single-use token minted here, so a bad request is
refused on the gRPC call, with the field named, before any connection is made.
"""

from __future__ import annotations

from plugins.cri.streaming.server import StreamingServer
from protos.runtime import v1 as cri


class StreamingRpcs:
    """Needs ``self.streaming``: the plugin's started :class:`StreamingServer`."""

    streaming: StreamingServer

    async def exec(self, exec_request: cri.ExecRequest) -> cri.ExecResponse:
        return cri.ExecResponse(url=self.streaming.url("exec", exec_request))

    async def attach(self, attach_request: cri.AttachRequest) -> cri.AttachResponse:
        return cri.AttachResponse(url=self.streaming.url("attach", attach_request))

    async def port_forward(self, port_forward_request: cri.PortForwardRequest) -> cri.PortForwardResponse:
        return cri.PortForwardResponse(url=self.streaming.url("portforward", port_forward_request))
