"""The metrics endpoint: ``GET /v1/metrics`` (containerd's path) over aiohttp.

Listens on TCP (``127.0.0.1:9102``; port 0 picks a free one) or on a unix
socket (``/run/berth/metrics.sock``), replacing a stale socket file but never a
live one or a non-socket file.
"""

from __future__ import annotations

import contextlib
import stat
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web

from daemon.errors import FailedPrecondition, InvalidArgument
from daemon.metrics import CONTENT_TYPE, METRICS_PATH, MetricsRegistry
from daemon.server import prepare_socket_path

log = structlog.get_logger("berth.metrics")


@dataclass(frozen=True)
class _Address:
    unix: Path | None = None
    host: str | None = None
    port: int = 0


def parse_address(address: str) -> _Address:
    """``host:port``, ``[v6]:port``, ``:port`` (all interfaces), ``/path`` or ``unix:///path``."""
    if address.startswith("unix://"):
        path = address.removeprefix("unix://")
        if not path:
            raise InvalidArgument(f'metrics address "{address}": empty socket path')
        return _Address(unix=Path(path))
    if address.startswith("/"):
        return _Address(unix=Path(address))
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidArgument(
            f'metrics address "{address}": want host:port, [ipv6]:port or a unix socket path'
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidArgument(f'metrics address "{address}": put an IPv6 host in brackets, [::1]:9102')
    return _Address(host=host or None, port=int(port_text))


class MetricsServer:
    """``GET /v1/metrics`` over TCP or a unix socket; start with :meth:`start`, end with :meth:`stop`.

    ``url`` is where it can be scraped (``http://127.0.0.1:41234/v1/metrics``
    or ``unix:///run/x.sock``); ``port`` is the bound port (useful with port
    0) and ``path`` the socket path.
    """

    def __init__(self, runner: web.AppRunner, *, url: str, port: int | None, path: Path | None) -> None:
        self._runner = runner
        self.url = url
        self.port = port
        self.path = path
        self._stopped = False

    @classmethod
    async def start(cls, registry: MetricsRegistry, address: str) -> MetricsServer:
        addr = parse_address(address)

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=registry.render().encode(), headers={"Content-Type": CONTENT_TYPE})

        app = web.Application()
        app.router.add_get(METRICS_PATH, metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            if addr.unix is not None:
                prepare_socket_path(str(addr.unix), section="metrics")
                await web.UnixSite(runner, str(addr.unix)).start()
                server = cls(runner, url=f"unix://{addr.unix}", port=None, path=addr.unix)
            else:
                await web.TCPSite(runner, addr.host, addr.port, reuse_address=True).start()
                bound = runner.addresses[0]
                host, port = str(bound[0]), int(bound[1])
                shown = f"[{host}]" if ":" in host else host
                server = cls(runner, url=f"http://{shown}:{port}{METRICS_PATH}", port=port, path=None)
        except OSError as exc:
            await runner.cleanup()
            raise FailedPrecondition(f'metrics address "{address}": {exc.strerror or exc}') from exc
        except BaseException:
            await runner.cleanup()
            raise
        log.info("metrics.listen", address=address, url=server.url)
        return server

    async def stop(self) -> None:
        """Stop serving and remove the socket file. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self._runner.cleanup()
        if self.path is not None:
            _remove_socket_file(self.path)


# A metadata-only file operation, instant even on a slow disk: called inline on purpose.


def _remove_socket_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
