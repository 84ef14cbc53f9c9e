"""One worker thread owning one sqlite3 connection: how berth keeps sqlite off the event loop.

Every use of the connection (opening, each transaction, closing) runs in
that thread, one at a time and in submission order, so a transaction never
interleaves with another and the event loop never blocks on the database.
The metadata store and the snapshotters' record store both build on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _close_if_opened(opening: concurrent.futures.Future[tuple[sqlite3.Connection, R]]) -> None:
    if opening.done() and not opening.cancelled() and opening.exception() is None:
        opening.result()[0].close()


class SqliteThread:
    """The thread and its connection; build with :meth:`start`."""

    def __init__(self, executor: concurrent.futures.ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._executor = executor
        self._conn = conn

    @classmethod
    async def start(
        cls, name: str, connect: Callable[[], tuple[sqlite3.Connection, R]]
    ) -> tuple[SqliteThread, R]:
        """Run ``connect()`` in a new thread named ``name``; the thread and what else connect returned.

        If ``connect`` raises, or the caller is cancelled meanwhile, the
        thread is stopped and any connection it opened is closed.
        """
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        opening = executor.submit(connect)
        try:
            conn, extra = await asyncio.wrap_future(opening)
        except BaseException:
            # Cancelled while the thread was still connecting: close what it opens.
            executor.submit(_close_if_opened, opening)
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn), extra

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """``job(conn)`` in the thread, after everything submitted before it."""
        return await asyncio.wrap_future(self._executor.submit(job, self._conn))

    async def close(self) -> None:
        """Close the connection after queued work, then let the thread end; call once."""
        try:
            await asyncio.wrap_future(self._executor.submit(self._conn.close))
        finally:
            self._executor.shutdown(wait=False)
