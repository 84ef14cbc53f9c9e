"""The CRI streaming server: where the URLs of Exec, Attach and PortForward lead.

kubelet (or crictl) calls Exec/Attach/PortForward over CRI; the RPC calls
:meth:`StreamingServer.url`, which validates the request, resolves the
container or sandbox (it must exist; a container must be running) and stores
the request under a single-use token (:mod:`.tokens`), returning
``http://<address>:<port>/{exec|attach|portforward}/<token>``. The client then
connects there and upgrades to SPDY/3.1 (:mod:`.spdy`) or WebSocket
(:mod:`.websocket`); the handlers (:mod:`.exec`, :mod:`.attach`,
:mod:`.portforward`) run the request through a :class:`~.backend.StreamBackend`.
An unknown, used or expired token is a 404 before anything starts.

Lifecycle (aiohttp's runner): ``url = await server.start()`` binds
``stream_server_address:stream_server_port`` (port 0 picks one);
``await server.stop()`` cancels every live stream (the backends clean up their
processes) and closes the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal, TypeAlias

import structlog
from aiohttp import web

from daemon.errors import InvalidArgument
from daemon.streaming.channel import (
    HEADER_ACCEPTED_PROTOCOL_VERSIONS,
    HEADER_PROTOCOL_VERSION,
    SPDY_PORTFORWARD_PROTOCOLS,
    SPDY_REMOTECOMMAND_PROTOCOLS,
    StreamOptions,
    is_spdy_upgrade,
    negotiate_protocol,
)
from daemon.streaming.errors import ProtocolError, SessionClosedError
from daemon.streaming.wschannel import (
    WS_PORTFORWARD_PROTOCOLS,
    WS_REMOTECOMMAND_PROTOCOLS,
    is_websocket_upgrade,
    parse_ports,
)
from plugins.cri.config import CriConfig
from plugins.cri.streaming import portforward, spdy, websocket
from plugins.cri.streaming.attach import serve_attach
from plugins.cri.streaming.backend import StreamBackend
from plugins.cri.streaming.exec import CommandConnection, serve_exec
from plugins.cri.streaming.tokens import TokenCache, ttl_from_env
from protos.runtime import v1 as cri

log = structlog.get_logger("berth.cri.streaming")

Kind = Literal["exec", "attach", "portforward"]
KINDS: tuple[Kind, ...] = ("exec", "attach", "portforward")
StreamRequest: TypeAlias = cri.ExecRequest | cri.AttachRequest | cri.PortForwardRequest


def _check_stdio(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
    if tty and stderr:
        raise InvalidArgument("tty and stderr cannot both be true")
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout, or stderr must be set")


class StreamingServer:
    def __init__(
        self,
        config: CriConfig,
        backend: StreamBackend,
        *,
        tokens: TokenCache | None = None,
        stream_creation_timeout: float = spdy.STREAM_CREATION_TIMEOUT,
    ) -> None:
        self._address = config.stream_server_address
        self._port = config.stream_server_port
        self._backend = backend
        self.tokens = tokens if tokens is not None else TokenCache(ttl=ttl_from_env())
        self.stream_creation_timeout = stream_creation_timeout
        self._runner: web.AppRunner | None = None
        self._base = ""
        self._active: set[asyncio.Task[object]] = set()

    @property
    def base_url(self) -> str:
        """``http://host:port`` once started; "" before."""
        return self._base

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("GET", "/{kind}/{token}", self._handle)
        app.router.add_route("POST", "/{kind}/{token}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self._address, self._port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise InvalidArgument(
                f"stream_server_address/port {self._address}:{self._port}: "
                f"cannot listen: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        host, port = runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        self._base = f"http://{host}:{port}"
        log.info("streaming.start", url=self._base)
        return self._base

    async def stop(self) -> None:
        for task in list(self._active):
            task.cancel()
        await asyncio.gather(*self._active, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        log.info("streaming.stop", url=self._base)

    def url(self, kind: Kind, request: StreamRequest) -> str:
        """Validate ``request``, mint a token for it; the URL the RPC returns.

        InvalidArgument for a malformed request, NotFound/FailedPrecondition from
        the backend for a missing or stopped container (or sandbox),
        ResourceExhausted when too many tokens are outstanding.
        """
        if not self._base:
            raise InvalidArgument("streaming server is not started")
        stored: StreamRequest
        if kind == "exec" and isinstance(request, cri.ExecRequest):
            if not request.container_id:
                raise InvalidArgument("missing required container_id")
            if not request.cmd:
                raise InvalidArgument("cmd must not be empty")
            _check_stdio(request.stdin, request.stdout, request.stderr, request.tty)
            stored = cri.ExecRequest(
                container_id=self._backend.resolve_container(request.container_id),
                cmd=list(request.cmd),
                tty=request.tty,
                stdin=request.stdin,
                stdout=request.stdout,
                stderr=request.stderr,
            )
        elif kind == "attach" and isinstance(request, cri.AttachRequest):
            if not request.container_id:
                raise InvalidArgument("missing required container_id")
            _check_stdio(request.stdin, request.stdout, request.stderr, request.tty)
            stored = cri.AttachRequest(
                container_id=self._backend.resolve_container(request.container_id),
                stdin=request.stdin,
                tty=request.tty,
                stdout=request.stdout,
                stderr=request.stderr,
            )
        elif kind == "portforward" and isinstance(request, cri.PortForwardRequest):
            if not request.pod_sandbox_id:
                raise InvalidArgument("missing required pod_sandbox_id")
            for port in request.port:
                if not 1 <= port <= 0xFFFF:
                    raise InvalidArgument(f"port {port}: not in 1..65535")
            stored = cri.PortForwardRequest(
                pod_sandbox_id=self._backend.resolve_sandbox(request.pod_sandbox_id), port=list(request.port)
            )
        else:
            raise InvalidArgument(f"streaming: {type(request).__name__} does not go to a {kind!r} URL")
        return f"{self._base}/{kind}/{self.tokens.mint(kind, stored)}"

    # -- HTTP --------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        stored = self.tokens.consume(kind, request.match_info["token"]) if kind in KINDS else None
        if stored is None:
            return web.Response(status=404, text="404: unknown, used or expired streaming token\n")
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        try:
            headers = request.headers
            if is_websocket_upgrade(headers.get("Connection"), headers.get("Upgrade")):
                return await self._websocket(kind, request, stored)
            if is_spdy_upgrade(headers.get("Connection"), headers.get("Upgrade")):
                return await self._spdy(kind, request, stored)
            return web.Response(status=400, text="streaming: upgrade to SPDY/3.1 or websocket required\n")
        finally:
            self._active.discard(task)

    async def _spdy(self, kind: str, request: web.Request, stored: object) -> web.StreamResponse:
        server_protocols = (
            SPDY_PORTFORWARD_PROTOCOLS if kind == "portforward" else SPDY_REMOTECOMMAND_PROTOCOLS
        )
        offered = request.headers.getall(HEADER_PROTOCOL_VERSION, [])
        protocol = negotiate_protocol(offered, server_protocols) if offered else ""
        if protocol is None:
            return web.Response(
                status=403,
                headers=[(HEADER_ACCEPTED_PROTOCOL_VERSIONS, p) for p in server_protocols],  # type: ignore[arg-type]
                text=f"streaming: none of the offered protocols {offered} is supported\n",
            )
        response, session = await spdy.upgrade(request, protocol or None)
        try:
            if isinstance(stored, cri.PortForwardRequest):
                await portforward.serve_spdy(session, self._backend, stored.pod_sandbox_id)
                return response
            assert isinstance(stored, cri.ExecRequest | cri.AttachRequest)
            opts = StreamOptions(stored.stdin, stored.stdout, stored.stderr, stored.tty)
            try:
                streams = await spdy.accept_command_streams(
                    session, protocol, opts, self.stream_creation_timeout
                )
            except (TimeoutError, ProtocolError, SessionClosedError) as exc:
                log.info("spdy.stream_handshake_failed", kind=kind, error=str(exc) or type(exc).__name__)
                return response
            await self._command(spdy.SpdyCommand(session, protocol, streams, opts.tty), stored)
            return response
        finally:
            await session.close()
            with contextlib.suppress(Exception):
                request.protocol.force_close()

    async def _websocket(self, kind: str, request: web.Request, stored: object) -> web.StreamResponse:
        if isinstance(stored, cri.PortForwardRequest):
            try:
                query_ports = request.query.getall("port", [])
                ports = parse_ports(query_ports) if query_ports else list(stored.port)
            except ProtocolError as exc:
                return web.Response(status=400, text=f"{exc.message}\n")
            if not ports:
                return web.Response(status=400, text='port-forward: query parameter "port" is required\n')
            accepted = await websocket.accept(request, WS_PORTFORWARD_PROTOCOLS)
            if isinstance(accepted, web.Response):
                return accepted
            ws, protocol = accepted
            await portforward.serve_websocket(ws, protocol, self._backend, stored.pod_sandbox_id, ports)
            return ws
        assert isinstance(stored, cri.ExecRequest | cri.AttachRequest)
        accepted = await websocket.accept(request, WS_REMOTECOMMAND_PROTOCOLS)
        if isinstance(accepted, web.Response):
            return accepted
        ws, protocol = accepted
        conn = websocket.WsCommand(
            ws, protocol, StreamOptions(stored.stdin, stored.stdout, stored.stderr, stored.tty)
        )
        await conn.ready()
        await self._command(conn, stored)
        return ws

    async def _command(self, conn: CommandConnection, stored: cri.ExecRequest | cri.AttachRequest) -> None:
        if isinstance(stored, cri.ExecRequest):
            await serve_exec(conn, self._backend, stored)
        else:
            await serve_attach(conn, self._backend, stored)
