"""grpclib server on the daemon's unix socket, and service registration.

Services are plugins of type ``berth.grpc.v1`` whose instance is a grpclib
servable (an object with ``__mapping__``, as betterproto generates). The
server wraps every handler once, here, to:

* map berth's error vocabulary to gRPC status codes (the only place that does);
* log each call at debug (method, status, duration) with the serving plugin;
* count calls and observe latency for the metrics registry;
* expose the call's metadata to the service through :func:`request_metadata`,
  because betterproto's generated service methods never see the stream
  (containerd clients send the namespace as the ``containerd-namespace`` header).
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog
from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from daemon.errors import BerthError, FailedPrecondition, InvalidArgument, grpc_status
from daemon.metrics import MetricsRegistry

log = structlog.get_logger("berth.server")

NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
_metadata: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "berth_grpc_metadata", default=None
)


def request_metadata() -> Mapping[str, Any]:
    """Metadata of the gRPC call being served (empty outside a call)."""
    return _metadata.get() or {}


def request_namespace(default: str | None = None) -> str:
    """The namespace a containerd-style client asked for.

    Raises InvalidArgument like containerd ("namespace is required") when the
    header is missing and no default applies.
    """
    value = _header(NAMESPACE_HEADER)
    if value:
        return value
    if default is not None:
        return default
    raise FailedPrecondition("namespace is required: set the containerd-namespace header (berth -n NAME)")


def request_lease() -> str:
    """The lease a containerd-style client works under (``containerd-lease`` header); "" if none.

    Objects the call creates (content, snapshots) are added to that lease;
    a lease that does not exist in the request's namespace makes the call
    fail with NotFound, as in containerd.
    """
    return _header(LEASE_HEADER)


def _header(name: str) -> str:
    """A metadata value of the call being served, as text; "" when absent or empty."""
    value = request_metadata().get(name)
    if isinstance(value, bytes):
        value = value.decode()
    return str(value) if value else ""


class _Instrumented:
    """A servable whose handlers are wrapped by :func:`_wrap`."""

    def __init__(self, mapping: dict[str, Handler]) -> None:
        self._mapping = mapping

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


def _wrap(
    method: str, handler: Handler, plugin: str, metrics: MetricsRegistry
) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
    calls = metrics.counter(
        "berth_grpc_requests_total", "gRPC calls served, by method and status code", ("method", "code")
    )
    latency = metrics.histogram(
        "berth_grpc_request_duration_seconds", "gRPC call latency, by method", ("method",)
    )
    func = handler.func
    plog = log.bind(plugin=plugin)

    async def serve(stream: Stream[Any, Any]) -> None:
        token = _metadata.set(stream.metadata)
        # Lines logged while serving (by any module) name the serving plugin.
        structlog.contextvars.bind_contextvars(plugin=plugin)
        started = time.monotonic()
        code = Status.OK
        message = ""
        try:
            await func(stream)
        except GRPCError as exc:
            code, message = exc.status, exc.message or ""
            raise
        except BerthError as exc:
            code, message = grpc_status(exc)
            raise GRPCError(code, message) from exc
        except asyncio.CancelledError:
            code = Status.CANCELLED
            raise
        except Exception as exc:
            code, message = grpc_status(exc)
            plog.error("grpc.internal_error", method=method, error=message, exc_info=True)
            raise GRPCError(code, message) from exc
        finally:
            elapsed = time.monotonic() - started
            _metadata.reset(token)
            calls.inc(method=method, code=code.name)
            latency.observe(elapsed, method=method)
            plog.debug(
                "grpc.call", method=method, code=code.name, ms=round(elapsed * 1000, 3), error=message or None
            )

    return serve


def instrument(servables: Mapping[str, Any], metrics: MetricsRegistry) -> list[_Instrumented]:
    """Wrap the handlers of each plugin's servable (plugin name -> servable)."""
    out: list[_Instrumented] = []
    seen: dict[str, str] = {}
    for plugin, servable in servables.items():
        mapping: dict[str, Handler] = {}
        for method, handler in servable.__mapping__().items():
            if method in seen:
                raise InvalidArgument(f"gRPC method {method}: served by both {seen[method]} and {plugin}")
            seen[method] = plugin
            mapping[method] = Handler(
                _wrap(method, handler, plugin, metrics),
                handler.cardinality,
                handler.request_type,
                handler.reply_type,
            )
        out.append(_Instrumented(mapping))
    return out


def normalize_address(address: str) -> str:
    """``unix:///run/x.sock`` and ``/run/x.sock`` name the same socket."""
    return address.removeprefix("unix://")


def prepare_socket_path(path: str, section: str = "grpc") -> None:
    """Make ``path`` bindable: create its directory, replace a stale socket.

    A socket file nobody answers on is stale (a killed daemon's) and is
    removed; one somebody answers on means another daemon owns the address,
    and berthd refuses to steal it; any other file is left alone. Errors name
    the ``<section>.address`` config key the path came from. The probe is a
    local connect that answers at once: done inline, at startup only.
    """
    where = f"{section}.address {path}"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        st = p.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{where}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise FailedPrecondition(f"{where}: cannot probe existing socket: {exc}") from exc
        p.unlink(missing_ok=True)
        log.info(f"{section}.stale_socket_removed", address=path)
        return
    finally:
        probe.close()
    raise FailedPrecondition(
        f"{where}: already in use: another process is listening on it (is another berthd running?)"
    )


class GrpcServer:
    """The API socket: start after plugins are loaded, stop before they close."""

    def __init__(self, address: str, uid: int = 0, gid: int = 0) -> None:
        self.address = normalize_address(address)
        self.uid = uid
        self.gid = gid
        self._server: Server | None = None
        self._bound = False

    async def start(self, handlers: list[_Instrumented]) -> None:
        prepare_socket_path(self.address)
        self._server = Server(handlers)
        await self._server.start(path=self.address)
        self._bound = True
        os.chmod(self.address, 0o660)
        if (self.uid, self.gid) != (os.getuid(), os.getgid()):
            os.chown(self.address, self.uid, self.gid)
        log.info("grpc.serving", address=self.address)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, give running calls ``grace`` seconds, remove the socket."""
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), grace)
            except TimeoutError:
                log.warning("grpc.stop_timeout", grace=grace)
            self._server = None
        if not self._bound:
            return  # never ours: a refused start must not delete another daemon's socket
        self._bound = False
        try:
            if stat.S_ISSOCK(os.lstat(self.address).st_mode):
                os.unlink(self.address)
        except FileNotFoundError:
            pass
