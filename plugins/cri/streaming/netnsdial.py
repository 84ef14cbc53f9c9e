"""Connect to a TCP port *inside* a pod's network namespace, from berthd.

PortForward must reach ``127.0.0.1:<port>`` as the pod sees it (a server bound
to the pod's loopback, a pod without an IP reachable from the host), so the
socket is created in the pod's netns: a dedicated short-lived thread calls
``setns(2)`` on the pinned netns file (Python 3.11 has no ``os.setns``:
ctypes), creates and connects the socket, and exits. A socket keeps the
namespace it was created in, so the event loop then uses it like any other.
The thread never returns to the daemon's namespace and never serves anything
else, so no other work can run in the pod's namespace by accident.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import socket
import threading

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

CLONE_NEWNET = 0x40000000
DEFAULT_CONNECT_TIMEOUT = 10.0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _connect_in(netns_path: str, host: str, port: int, timeout: float) -> socket.socket:
    """Runs on the dedicated thread: join the netns, connect, hand the socket back."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, CLONE_NEWNET)
    finally:
        os.close(fd)
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setblocking(False)
    return sock


async def connect(
    netns_path: str, port: int, *, host: str = "127.0.0.1", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An asyncio connection to ``host:port`` as seen from inside ``netns_path``.

    NotFound if the netns file is missing, Unavailable if nothing listens
    (connection refused, timeout), InvalidArgument for a bad port.
    """
    if not 1 <= port <= 0xFFFF:
        raise InvalidArgument(f"port {port}: not in 1..65535")
    if not netns_path:
        raise FailedPrecondition("port-forward: the sandbox has no network namespace")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[socket.socket] = loop.create_future()

    def deliver(result: socket.socket | BaseException) -> None:
        if done.cancelled():
            if isinstance(result, socket.socket):
                result.close()
        elif isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)

    def run() -> None:
        result: socket.socket | BaseException
        try:
            result = _connect_in(netns_path, host, port, connect_timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, re-raised there
            result = exc
        try:
            loop.call_soon_threadsafe(deliver, result)
        except RuntimeError:  # loop closed meanwhile
            if isinstance(result, socket.socket):
                result.close()

    threading.Thread(target=run, name=f"netns-dial-{port}", daemon=True).start()
    try:
        sock = await done
    except FileNotFoundError:
        raise NotFound(f"network namespace {netns_path}: not found") from None
    except (TimeoutError, ConnectionRefusedError) as exc:
        raise Unavailable(f"connect to {host}:{port} in netns {netns_path}: {exc}") from None
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EPERM):
            raise FailedPrecondition(f"join network namespace {netns_path}: {exc.strerror}") from None
        raise Unavailable(f"connect to {host}:{port} in netns {netns_path}: {exc.strerror or exc}") from None
    return await asyncio.open_connection(sock=sock)
