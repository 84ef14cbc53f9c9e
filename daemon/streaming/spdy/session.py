"""An asyncio SPDY/3.1 session over one StreamReader/StreamWriter pair, client or server.

After the HTTP ``Upgrade: SPDY/3.1`` exchange, both ends of a Kubernetes
exec/attach/port-forward connection run one of these. The client opens streams
(odd ids, SYN_STREAM with a ``streamtype`` header), the server accepts them
(SYN_REPLY) and both sides move bytes with DATA frames::

    session = Session(reader, writer, client=False)
    await session.start()
    stream = await session.accept()          # the peer's SYN_STREAM
    await stream.reply()                     # SYN_REPLY
    data = await stream.read()               # b"" after the peer's FIN
    await stream.write(b"out"); await stream.close()
    await session.close()                    # GOAWAY, then the connection

Rules kept here, per SPDY/3 and what moby/spdystream (kubectl, kubelet) does:

* stream ids: the client's are odd, the server's even, each side's strictly
  increasing; a SYN_STREAM breaking that is refused with RST_STREAM
  PROTOCOL_ERROR, as spdystream does (the session lives on);
* frames are written whole under one lock, and the header deflater advances
  under that same lock, so compression order is wire order;
* PINGs from the peer (the other parity) are echoed; our own resolve :meth:`ping`;
* GOAWAY: after sending it we refuse new peer streams; after receiving it we
  open none, and our streams above its last-good id are failed;
* a malformed frame is a session error: GOAWAY PROTOCOL_ERROR and the connection
  is closed; every stream still open fails with StreamResetError.

Flow control: windows start at 64 KiB per stream and per session (SPDY/3.1),
SETTINGS INITIAL_WINDOW_SIZE moves the per-stream ones, WINDOW_UPDATE refills
them. moby/spdystream neither sends WINDOW_UPDATE nor honours ours, so a sender
that enforced windows against kubectl would stall at 64 KiB. ``flow_control=None``
(the default) therefore enforces only once the peer has shown it speaks flow
control (any SETTINGS or WINDOW_UPDATE frame; this session sends SETTINGS first
thing, so two berth ends always enforce). The receiver never kills a peer for
overrunning its window: it buffers up to ``max(receive_window, 256 KiB)`` per
stream and then stops reading the socket, so TCP pushes back instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from daemon.streaming.errors import ProtocolError, SessionClosedError, StreamResetError
from daemon.streaming.spdy.frames import (
    DEFAULT_MAX_CONTROL_LENGTH,
    DEFAULT_MAX_DATA_LENGTH,
    FLAG_FIN,
    FLAG_UNIDIRECTIONAL,
    STREAM_ID_MAX,
    DataFrame,
    Frame,
    FrameReader,
    GoAway,
    GoAwayStatus,
    HeadersFrame,
    Ping,
    RstStatus,
    RstStream,
    Setting,
    SettingId,
    Settings,
    SynReply,
    SynStream,
    UnknownFrame,
    WindowUpdate,
    encode_frame,
)
from daemon.streaming.spdy.headers import HeaderDeflater, Headers
from daemon.streaming.spdy.stream import Stream

log = structlog.get_logger("berth.streaming")

DEFAULT_WINDOW = 64 << 10
DEFAULT_MAX_STREAMS = 100
DEFAULT_MAX_CHUNK = 32 << 10
_MIN_BUFFER = 256 << 10


class Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        client: bool,
        flow_control: bool | None = None,
        receive_window: int = DEFAULT_WINDOW,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        max_control_length: int = DEFAULT_MAX_CONTROL_LENGTH,
        max_data_length: int = DEFAULT_MAX_DATA_LENGTH,
    ) -> None:
        self.client = client
        self.max_chunk = max_chunk
        self._writer = writer
        self._frames = FrameReader(
            reader, max_control_length=max_control_length, max_data_length=max_data_length
        )
        self._deflater = HeaderDeflater()
        self._wlock = asyncio.Lock()
        self._flow_control = flow_control
        self._peer_speaks_flow_control = False
        self._receive_window = receive_window
        self._buffer_limit = max(receive_window, _MIN_BUFFER)
        self._max_streams = max_streams
        self._peer_initial_window = DEFAULT_WINDOW
        self.send_window = DEFAULT_WINDOW  # the session-level window the peer granted us
        self._session_unacked = 0
        self._window_event = asyncio.Event()
        self._streams: dict[int, Stream] = {}
        self._next_id = 1 if client else 2
        self._last_peer_id = 0
        self._incoming: asyncio.Queue[Stream | None] = asyncio.Queue()
        self._next_ping = 1 if client else 2
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._goaway_sent = False
        self._goaway_received = False
        self._closed = False
        self.error: BaseException | None = None
        """Why the session ended, if it did not end by our own close()."""
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def going_away(self) -> bool:
        """A GOAWAY went one way or the other: no new streams on this session."""
        return self._goaway_sent or self._goaway_received

    @property
    def enforcing_flow_control(self) -> bool:
        if self._flow_control is not None:
            return self._flow_control
        return self._peer_speaks_flow_control

    async def start(self) -> None:
        """Announce our receive window (SETTINGS, plus a session WINDOW_UPDATE above 64 KiB), read."""
        await self._send(Settings((Setting(SettingId.INITIAL_WINDOW_SIZE, self._receive_window),)))
        if self._receive_window > DEFAULT_WINDOW:
            await self._send(WindowUpdate(0, self._receive_window - DEFAULT_WINDOW))
        self._task = asyncio.create_task(
            self._run(), name=f"spdy-session-{'client' if self.client else 'server'}"
        )

    # -- the caller's API ----------------------------------------------------

    async def open_stream(
        self, headers: Headers, *, fin: bool = False, wait_reply: bool = True, priority: int = 0
    ) -> Stream:
        """SYN_STREAM with ``headers``; by default wait for the peer's SYN_REPLY (or its refusal)."""
        async with self._wlock:
            if self._closed or self.going_away:
                raise SessionClosedError("spdy session: going away, no new streams")
            stream_id = self._next_id
            if stream_id > STREAM_ID_MAX:
                raise SessionClosedError("spdy session: stream ids exhausted")
            self._next_id += 2
            stream = Stream(self, stream_id, headers, ours=True)
            stream._local_fin = fin
            self._streams[stream_id] = stream
            await self._write(SynStream(stream_id, headers, FLAG_FIN if fin else 0, priority=priority))
        if wait_reply:
            await stream.wait_reply()
        return stream

    async def accept(self) -> Stream:
        """The next stream the peer opened; raises SessionClosedError once the session ended."""
        stream = await self._incoming.get()
        if stream is None:
            self._incoming.put_nowait(None)  # for the next waiter
            raise SessionClosedError("spdy session: closed")
        return stream

    async def ping(self) -> float:
        """Round-trip time of one PING, in seconds (bound it with ``asyncio.timeout``)."""
        ping_id = self._next_ping
        self._next_ping += 2
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = fut
        start = time.monotonic()
        try:
            await self._send(Ping(ping_id))
            await fut
        finally:
            self._pings.pop(ping_id, None)
        return time.monotonic() - start

    async def goaway(self, status: int = GoAwayStatus.OK) -> None:
        """Tell the peer we take no new streams; streams already open carry on. Idempotent."""
        if self._goaway_sent or self._closed:
            return
        self._goaway_sent = True
        await self._send_quietly(GoAway(self._last_peer_id, status))

    async def close(self, grace: float = 0.0) -> None:
        """GOAWAY, wait up to ``grace`` seconds for open streams to finish, then drop the connection."""
        await self.goaway()
        if grace > 0:
            deadline = time.monotonic() + grace
            while self._streams and not self._closed and time.monotonic() < deadline:
                self._window_event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._window_event.wait(), deadline - time.monotonic())
        self._shutdown(SessionClosedError("spdy session: closed"))
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Until the reader task has ended and the connection is closed."""
        if self._task is not None and self._task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    # -- writing -------------------------------------------------------------

    async def _write(self, frame: Frame) -> None:
        """Encode and write one frame; the caller holds ``_wlock``."""
        if self._closed:
            raise SessionClosedError("spdy session: closed")
        data = encode_frame(frame, self._deflater)
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._shutdown(exc)
            raise SessionClosedError(f"spdy session: connection lost: {exc}") from exc

    async def _send(self, frame: Frame) -> None:
        async with self._wlock:
            await self._write(frame)

    async def _send_quietly(self, frame: Frame) -> None:
        """Best effort (RST, GOAWAY, WINDOW_UPDATE): a dead session has nobody to tell."""
        with contextlib.suppress(SessionClosedError):
            await self._send(frame)

    async def _wait_window(self, stream: Stream) -> None:
        while stream.send_window <= 0 or self.send_window <= 0:
            stream._check_usable()
            if self._closed:
                raise SessionClosedError("spdy session: closed")
            if not self.enforcing_flow_control:
                return
            self._window_event.clear()
            await self._window_event.wait()

    async def _consumed(self, stream: Stream, n: int) -> None:
        """Give consumed bytes back to the peer once half a window has been read.

        Not to a peer that never spoke flow control (no SETTINGS, no WINDOW_UPDATE:
        spdystream, i.e. kubelet's and containerd's servers): it ignores the window
        anyway, and it closes its socket after the exit status without reading
        what we sent, so unread WINDOW_UPDATEs in its buffer turn that close into a
        TCP reset, which can discard output we had not read yet.
        """
        if not self._peer_speaks_flow_control:
            return
        stream._unacked += n
        self._session_unacked += n
        if stream._unacked >= self._receive_window // 2 and not stream.remote_closed:
            delta, stream._unacked = stream._unacked, 0
            await self._send_quietly(WindowUpdate(stream.id, delta))
        if self._session_unacked >= self._receive_window // 2:
            delta, self._session_unacked = self._session_unacked, 0
            await self._send_quietly(WindowUpdate(0, delta))

    # -- stream bookkeeping --------------------------------------------------

    def _forget(self, stream: Stream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            self._window_event.set()  # close(grace) waits on this

    def _maybe_forget(self, stream: Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._forget(stream)

    def _is_peer_id(self, stream_id: int) -> bool:
        return (stream_id % 2 == 0) == self.client

    def _known(self, stream_id: int) -> bool:
        """Was this id ever used (so a late frame for it is noise, not an error)?"""
        if self._is_peer_id(stream_id):
            return stream_id <= self._last_peer_id
        return stream_id < self._next_id

    def _shutdown(self, error: BaseException) -> None:
        if self._closed:
            return
        self._closed = True
        if not isinstance(error, SessionClosedError) or self.error is None:
            self.error = error
        reset = StreamResetError(0, RstStatus.CANCEL, f"spdy session ended: {error}")
        for stream in list(self._streams.values()):
            stream._on_session_end(StreamResetError(stream.id, reset.code, str(reset)))
        self._streams.clear()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(SessionClosedError("spdy session: closed before PING reply"))
        self._incoming.put_nowait(None)
        self._window_event.set()
        self._writer.close()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    # -- reading -------------------------------------------------------------

    async def _run(self) -> None:
        error: BaseException = SessionClosedError("spdy session: peer closed the connection")
        try:
            while (frame := await self._frames.read()) is not None:
                await self._dispatch(frame)
        except ProtocolError as exc:
            log.warning("spdy.protocol_error", error=str(exc), client=self.client)
            error = exc
            if not self._goaway_sent:
                self._goaway_sent = True
                with contextlib.suppress(SessionClosedError):
                    await asyncio.wait_for(
                        self._send(GoAway(self._last_peer_id, GoAwayStatus.PROTOCOL_ERROR)), 1
                    )
        except (ConnectionError, OSError, SessionClosedError) as exc:
            error = exc
        finally:
            self._shutdown(error)

    async def _dispatch(self, frame: Frame) -> None:
        match frame:
            case DataFrame(stream_id, data, flags):
                await self._on_data(stream_id, data, flags)
            case SynStream():
                await self._on_syn_stream(frame)
            case SynReply(stream_id, headers, flags):
                stream = self._streams.get(stream_id)
                if stream is None or not stream.ours:
                    if not self._known(stream_id):
                        await self._send_quietly(RstStream(stream_id, RstStatus.INVALID_STREAM))
                elif not stream._on_reply(headers):
                    await stream.reset(RstStatus.STREAM_IN_USE)
                elif flags & FLAG_FIN:
                    stream._on_data(b"", True)
                    self._maybe_forget(stream)
            case RstStream(stream_id, status):
                if (stream := self._streams.get(stream_id)) is not None:
                    stream._fail(
                        StreamResetError(
                            stream_id, status, f"spdy stream {stream_id}: reset by peer ({status})"
                        ),
                        keep_data=True,
                    )
                    self._forget(stream)
            case Settings(entries):
                self._peer_speaks_flow_control = True
                for entry in entries:
                    if entry.id == SettingId.INITIAL_WINDOW_SIZE:
                        delta = entry.value - self._peer_initial_window
                        self._peer_initial_window = entry.value
                        for stream in self._streams.values():
                            stream.send_window += delta
                self._window_event.set()
            case Ping(ping_id):
                if (ping_id % 2 == 1) != self.client:
                    await self._send_quietly(frame)
                elif (fut := self._pings.get(ping_id)) is not None and not fut.done():
                    fut.set_result(None)
            case GoAway(last_good):
                self._goaway_received = True
                for stream in [s for s in self._streams.values() if s.ours and s.id > last_good]:
                    stream._fail(
                        StreamResetError(stream.id, RstStatus.REFUSED_STREAM, "spdy: peer went away")
                    )
                    self._forget(stream)
                self._window_event.set()
            case HeadersFrame(stream_id, headers, flags):
                if (stream := self._streams.get(stream_id)) is not None:
                    stream.extra_headers.append(headers)
                    if flags & FLAG_FIN:
                        stream._on_data(b"", True)
                        self._maybe_forget(stream)
            case WindowUpdate(stream_id, delta):
                self._peer_speaks_flow_control = True
                if stream_id == 0:
                    self.send_window += delta
                elif (stream := self._streams.get(stream_id)) is not None:
                    stream.send_window += delta
                self._window_event.set()
            case UnknownFrame(type=kind, length=length):
                log.debug("spdy.unknown_frame", type=kind, length=length)

    async def _on_data(self, stream_id: int, data: bytes, flags: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._known(stream_id):
                await self._send_quietly(RstStream(stream_id, RstStatus.INVALID_STREAM))
            return
        if stream.remote_closed:
            await stream.reset(RstStatus.STREAM_ALREADY_CLOSED)
            return
        stream._on_data(data, bool(flags & FLAG_FIN))
        self._maybe_forget(stream)
        if not stream._space.is_set():
            await stream._space.wait()  # a peer ignoring our window: let TCP push back

    async def _on_syn_stream(self, frame: SynStream) -> None:
        sid = frame.stream_id
        if not self._is_peer_id(sid) or sid <= self._last_peer_id:
            await self._send_quietly(RstStream(sid, RstStatus.PROTOCOL_ERROR))
            return
        self._last_peer_id = sid
        active = sum(1 for s in self._streams.values() if not s.ours)
        if self._goaway_sent or active >= self._max_streams:
            await self._send_quietly(RstStream(sid, RstStatus.REFUSED_STREAM))
            return
        stream = Stream(self, sid, frame.headers, ours=False)
        stream._remote_fin = bool(frame.flags & FLAG_FIN)
        stream._local_fin = bool(frame.flags & FLAG_UNIDIRECTIONAL)
        self._streams[sid] = stream
        self._incoming.put_nowait(stream)
