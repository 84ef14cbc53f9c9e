"""An aiohttp application served from its own thread and event loop.

Test servers (the fake registry, the token server) must keep answering while
the test blocks: integration tests run the ``berth`` CLI with a synchronous
``subprocess.run`` while berthd pulls from them. Serving them on the test's
own loop would deadlock there, so each gets a thread with a private loop,
bound to a free port on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web

START_TIMEOUT = 10.0


class ThreadedApp:
    """``start()`` serves ``app`` on ``host:port`` (port 0 = any free one); ``stop()`` joins the thread."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        """``host:port``, as a registry reference spells it."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> ThreadedApp:
        self._thread = threading.Thread(target=self._serve, name=f"aioserver-{id(self):x}", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError(f"test server did not start within {START_TIMEOUT}s")
        if self._error is not None:
            raise RuntimeError(f"test server failed to start: {self._error!r}") from self._error
        return self

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(self._setup(runner))
        except BaseException as e:  # noqa: BLE001 - reported to start()
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def _setup(self, runner: web.AppRunner) -> None:
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = int(runner.addresses[0][1])

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=15)
        self._thread = None

    def __enter__(self) -> ThreadedApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
