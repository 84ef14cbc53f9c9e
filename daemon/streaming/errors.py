"""Errors of the streaming codecs (SPDY/3.1 sessions and the Kubernetes channel protocols).

They extend the one vocabulary of :mod:`daemon.errors`, so a server that turns
them into log events or HTTP answers needs no second mapping.
"""

from __future__ import annotations

from daemon.errors import Aborted, InvalidArgument, Unavailable


class ProtocolError(InvalidArgument):
    """The peer sent bytes that break the protocol (malformed frame, bad header block, bad JSON).

    For SPDY this is a session error: the session answers with GOAWAY
    PROTOCOL_ERROR and closes the connection; no stream survives it.
    """


class StreamResetError(Aborted):
    """A stream was reset: by the peer (RST_STREAM), by us, or because the session ended.

    ``code`` is the SPDY RST_STREAM status (see :class:`~daemon.streaming.spdy.frames.RstStatus`),
    ``stream_id`` the stream it hit.
    """

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code


class SessionClosedError(Unavailable):
    """The SPDY session is gone (GOAWAY received or sent, or the connection closed)."""
