"""Streaming codecs shared by the CRI streaming server and the ``berth`` CLI client.

* :mod:`daemon.streaming.spdy`: SPDY/3.1 framing, header compression and an asyncio session;
* :mod:`daemon.streaming.channel`: the Kubernetes remotecommand / portforward conventions
  on top of it (stream types, subprotocols, upgrade handshake, exit-status JSON, resize JSON);
* :mod:`daemon.streaming.wschannel`: the same over WebSocket (channel byte, base64, v5 close).

No HTTP server lives here: the upgrade handshakes are pure functions the
aiohttp handlers (plugins/cri) and the CLI client call.
"""
