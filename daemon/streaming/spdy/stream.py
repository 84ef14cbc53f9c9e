"""One SPDY stream: a bidirectional byte pipe with half-close, reset and flow control.

A stream is created by :meth:`Session.open_stream` (ours, SYN_STREAM sent) or
handed out by :meth:`Session.accept` (the peer's; answer it with
:meth:`Stream.reply` or refuse it with :meth:`Stream.reset`). Each direction
closes on its own: :meth:`close` sends FIN (the peer reads EOF, we may still
read), a received FIN makes :meth:`read` return ``b""``. :meth:`reset` (or the
peer's RST_STREAM, or the session ending) kills both directions: reads and
writes then raise :class:`~daemon.streaming.errors.StreamResetError`.

Flow control: :meth:`write` sends at most the peer's window for this stream and
for the session, then waits for WINDOW_UPDATE (when the session enforces it,
see :class:`Session`). :meth:`read` acknowledges what the caller consumed, so a
slow reader slows the peer instead of growing our buffer.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from daemon.errors import FailedPrecondition
from daemon.streaming.errors import StreamResetError
from daemon.streaming.spdy.frames import FLAG_FIN, DataFrame, RstStatus, RstStream, SynReply
from daemon.streaming.spdy.headers import Headers

if TYPE_CHECKING:
    from daemon.streaming.spdy.session import Session

DEFAULT_READ = 64 << 10


def _retrieve(fut: asyncio.Future[Headers]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark an unawaited failure as seen (no "never retrieved" warning)


class Stream:
    def __init__(self, session: Session, stream_id: int, headers: Headers, *, ours: bool) -> None:
        self._session = session
        self.id = stream_id
        self.headers = headers
        """The SYN_STREAM headers (ours for an opened stream, the peer's for an accepted one)."""
        self.ours = ours
        self.extra_headers: list[Headers] = []
        """Headers the peer sent later in HEADERS frames, in order."""
        self._reply: asyncio.Future[Headers] = asyncio.get_running_loop().create_future()
        self._reply.add_done_callback(_retrieve)
        self._replied = False  # accepted streams: SYN_REPLY sent
        self._buf = bytearray()
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._remote_fin = False
        self._local_fin = False
        self._error: StreamResetError | None = None
        self.send_window = session._peer_initial_window
        self._unacked = 0  # bytes consumed by read() and not yet given back by WINDOW_UPDATE
        self._write_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<spdy.Stream id={self.id} headers={self.headers!r}>"

    @property
    def remote_closed(self) -> bool:
        """The peer half-closed (FIN received): reads end with ``b""`` once the buffer is empty."""
        return self._remote_fin

    @property
    def local_closed(self) -> bool:
        return self._local_fin

    @property
    def reset_error(self) -> StreamResetError | None:
        return self._error

    # -- the caller's side -------------------------------------------------

    async def wait_reply(self) -> Headers:
        """For a stream we opened: the peer's SYN_REPLY headers; raises StreamResetError if refused."""
        return await asyncio.shield(self._reply)

    async def reply(self, headers: Headers | None = None, *, fin: bool = False) -> None:
        """Accept a stream the peer opened (SYN_REPLY); only then may we write to it."""
        if self.ours or self._replied:
            raise FailedPrecondition(f"spdy stream {self.id}: reply only once, to a stream the peer opened")
        self._check_usable()
        self._replied = True
        await self._session._send(SynReply(self.id, headers or Headers(), FLAG_FIN if fin else 0))
        if fin:
            self._local_fin = True
            self._session._maybe_forget(self)

    async def read(self, max_bytes: int = DEFAULT_READ) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` once the peer's FIN is reached."""
        while not self._buf:
            if self._error is not None:
                raise self._error
            if self._remote_fin:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = bytes(self._buf[:max_bytes])
        del self._buf[:max_bytes]
        if len(self._buf) <= self._session._buffer_limit:
            self._space.set()
        await self._session._consumed(self, len(chunk))
        return chunk

    async def write(self, data: bytes) -> None:
        """Send ``data`` in DATA frames, waiting for window where flow control is enforced."""
        if not data:
            return
        view = memoryview(data)
        async with self._write_lock:
            while view:
                self._check_writable()
                n = min(len(view), self._session.max_chunk)
                if self._session.enforcing_flow_control:
                    await self._session._wait_window(self)
                    n = min(n, self.send_window, self._session.send_window)
                self.send_window -= n
                self._session.send_window -= n
                await self._session._send(DataFrame(self.id, bytes(view[:n])))
                view = view[n:]

    async def close(self) -> None:
        """Half-close: send FIN. Reading goes on until the peer closes its side. Idempotent."""
        async with self._write_lock:
            if self._local_fin or self._error is not None:
                return
            if not self.ours and not self._replied:
                raise FailedPrecondition(f"spdy stream {self.id}: reply before closing")
            self._local_fin = True
            await self._session._send(DataFrame(self.id, b"", FLAG_FIN))
        self._session._maybe_forget(self)

    async def reset(self, status: int = RstStatus.CANCEL) -> None:
        """Abort both directions (RST_STREAM); the peer's reads and writes fail. Idempotent."""
        if self._error is not None or (self._local_fin and self._remote_fin):
            return
        self._fail(StreamResetError(self.id, status, f"spdy stream {self.id}: reset locally ({status})"))
        self._session._forget(self)
        await self._session._send_quietly(RstStream(self.id, status))

    # -- the session's side ------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error

    def _check_writable(self) -> None:
        self._check_usable()
        if self._local_fin:
            raise FailedPrecondition(f"spdy stream {self.id}: write after close")
        if not self.ours and not self._replied:
            raise FailedPrecondition(f"spdy stream {self.id}: reply before writing")

    def _on_reply(self, headers: Headers) -> bool:
        """False if this is a second SYN_REPLY (a protocol error for the stream)."""
        if self._reply.done():
            return False
        self._reply.set_result(headers)
        return True

    def _on_data(self, data: bytes, fin: bool) -> None:
        if data and self._error is None:
            self._buf += data
            if len(self._buf) > self._session._buffer_limit:
                self._space.clear()
        if fin:
            self._remote_fin = True
        self._readable.set()

    def _fail(self, error: StreamResetError, *, keep_data: bool = False) -> None:
        """Reset semantics: wake every waiter with ``error``.

        ``keep_data``: what already arrived stays readable before the error (a
        peer's RST_STREAM, as spdystream does: a server may send the exit status
        and reset the stream right after it); a local reset drops it.
        """
        if self._error is None:
            self._error = error
        if not keep_data:
            self._buf.clear()
        if not self._reply.done():
            self._reply.set_exception(error)
        self._readable.set()
        self._space.set()
        self._session._window_event.set()

    def _on_session_end(self, error: StreamResetError) -> None:
        """The connection ended: a stream whose peer already sent FIN keeps its buffered data."""
        if self._remote_fin:
            if not self._reply.done():
                self._reply.set_exception(error)
            self._readable.set()  # reads drain the buffer to EOF; writes fail in Session._send
            self._space.set()
            return
        self._fail(error)
