"""The streaming verbs of ``berth cri``: logs, exec, attach, port-forward, stats, statsp, events.

``logs`` reads the CRI log file named by ContainerStatus.log_path (the CLI
runs on the node, as crictl does) and decodes it (:mod:`daemon.cli.crilogs`);
``-f`` follows it until ContainerStatus says the container exited.
``exec -s`` is ExecSync; ``exec`` without ``-s`` asks Exec for a streaming
URL and speaks SPDY to it with :mod:`daemon.streaming.client`, stdin taken
from the CLI's own (``-i``), the terminal put in raw mode for ``-t``. Both
exit with the command's exit code. ``attach`` does the same with the URL
of Attach (the container's stdio until it exits; its exit code).
``port-forward`` listens on 127.0.0.1 only, one listener per
``LOCAL:REMOTE`` pair, and carries every accepted connection as a stream
pair of one SPDY session to the PortForward URL (as kubectl and crictl); it
runs until interrupted or until the server ends the session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import termios
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import betterproto
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemon.cli import criview as view
from daemon.cli import output
from daemon.cli.commands import CliError
from daemon.cli.criclient import CriClient
from daemon.cli.crilogs import Follower, LogMessage, format_message, read_messages
from daemon.errors import BerthError
from protos.runtime import v1 as cri

if TYPE_CHECKING:
    from daemon.streaming.client import PortForward

#: Margin given to an ExecSync call beyond the command's own timeout.
EXEC_SYNC_MARGIN = 10.0
STDIN_CHUNK = 32 << 10
FORWARD_CHUNK = 64 << 10
#: How long a finished forwarded connection waits for the server's error stream to end.
FORWARD_ERROR_WAIT = 2.0


# -- logs ---------------------------------------------------------------------------------


def _write(msg: LogMessage, timestamps: bool) -> None:
    target = sys.stderr.buffer if msg.stream == "stderr" else sys.stdout.buffer
    target.write(format_message(msg, timestamps))
    target.flush()


async def logs(c: CriClient, args: argparse.Namespace) -> None:
    st = (await c.status(args.id)).status
    if not st.log_path:
        raise CliError(f"container {st.id}: has no log file (its pod has no log_directory or it no log_path)")

    def sink(msg: LogMessage) -> None:
        _write(msg, args.timestamps)

    if not args.follow:
        try:
            found = await asyncio.to_thread(read_messages, st.log_path, args.tail)
        except FileNotFoundError:
            raise CliError(f"container {st.id}: log file {st.log_path}: no such file") from None
        for msg in found:
            sink(msg)
        return

    async def exited() -> bool:
        try:
            now = (await c.status(st.id)).status
        except GRPCError as exc:
            if exc.status is Status.NOT_FOUND:
                return True
            raise
        return bool(now.state == cri.ContainerState.CONTAINER_EXITED)

    await Follower(st.log_path, sink, args.tail).run(exited)


# -- exec ---------------------------------------------------------------------------------


async def exec_command(c: CriClient, args: argparse.Namespace) -> None:
    if args.sync:
        if args.interactive or args.tty:
            raise CliError("exec: --sync collects output only: it takes no -i or -t")
        if args.exec_timeout < 0:
            raise CliError(f"exec: --timeout {args.exec_timeout}: must be 0 or more seconds")
        req = cri.ExecSyncRequest(container_id=args.id, cmd=list(args.cmd), timeout=args.exec_timeout)
        deadline = args.exec_timeout + EXEC_SYNC_MARGIN if args.exec_timeout else None
        resp = await c.rt_stream.exec_sync(req, timeout=deadline)
        sys.stdout.buffer.write(resp.stdout)
        sys.stdout.buffer.flush()
        sys.stderr.buffer.write(resp.stderr)
        sys.stderr.buffer.flush()
        if resp.exit_code:
            raise SystemExit(resp.exit_code)
        return
    req2 = cri.ExecRequest(
        container_id=args.id,
        cmd=list(args.cmd),
        tty=args.tty,
        stdin=args.interactive,
        stdout=True,
        stderr=not args.tty,
    )
    url = (await c.rt.exec(req2)).url
    code = await stream_exec(url, stdin=args.interactive, tty=args.tty)
    if code:
        raise SystemExit(code)


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    """Stdin in raw mode while a ``-t`` exec runs (keys go to the container), restored after."""
    if not enabled or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _stdin_chunks(queue: asyncio.Queue[bytes]) -> None:
    """Stdin into ``queue`` (``b""`` at its end) without a thread that could outlive the command."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    with contextlib.suppress(OSError):
        os.set_blocking(fd, False)
    try:
        ready = asyncio.Event()
        loop.add_reader(fd, ready.set)
    except PermissionError:  # a regular file: epoll refuses it, and reading it cannot block
        data = await asyncio.to_thread(sys.stdin.buffer.read)
        if data:
            await queue.put(data)
        await queue.put(b"")
        return
    try:
        while True:
            await ready.wait()
            ready.clear()
            try:
                data = os.read(fd, STDIN_CHUNK)
            except BlockingIOError:
                continue
            await queue.put(data)
            if not data:
                return
    finally:
        loop.remove_reader(fd)


async def stream_exec(url: str, *, stdin: bool, tty: bool) -> int:
    """Run the exec behind ``url`` with this process's stdio; its exit code."""
    from daemon.streaming.client import connect_command  # aiohttp: only for streaming verbs

    cmd = await connect_command(url, stdin=stdin, stdout=True, stderr=not tty, tty=tty)
    async with cmd:
        if tty and sys.stdout.isatty():
            size = shutil.get_terminal_size()
            with contextlib.suppress(Exception):
                await cmd.resize(size.columns, size.lines)

        async def pump(read_name: str, target: int) -> None:
            read = getattr(cmd, read_name)
            while chunk := await read():
                await asyncio.to_thread(os.write, target, chunk)

        async def feed() -> None:
            queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
            reader = asyncio.create_task(_stdin_chunks(queue))
            try:
                while data := await queue.get():
                    await cmd.write_stdin(data)
                await cmd.close_stdin()
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

        feeder = asyncio.create_task(feed()) if stdin else None
        with _raw_terminal(tty and stdin):
            try:
                pumps = [pump("read_stdout", 1)] + ([] if tty else [pump("read_stderr", 2)])
                await asyncio.gather(*pumps)
                status = await cmd.wait()
            finally:
                if feeder is not None:
                    feeder.cancel()
                    await asyncio.gather(feeder, return_exceptions=True)
    if status.exit_code is None:
        raise CliError(f"exec: {status.message}")
    return int(status.exit_code)


async def attach(c: CriClient, args: argparse.Namespace) -> None:
    """crictl's attach: stdout, stderr unless ``-t``, stdin with ``-i``; exits with the container's code."""
    req = cri.AttachRequest(
        container_id=args.id, stdin=args.interactive, tty=args.tty, stdout=True, stderr=not args.tty
    )
    url = (await c.rt.attach(req)).url
    code = await stream_exec(url, stdin=args.interactive, tty=args.tty)
    if code:
        raise SystemExit(code)


# -- port-forward -------------------------------------------------------------------------


@dataclass(frozen=True)
class PortPair:
    local: int
    remote: int


def parse_port_pair(text: str) -> PortPair:
    """``LOCAL:REMOTE`` or ``REMOTE`` (the same port locally); LOCAL 0 picks a free port."""
    local_text, sep, remote_text = text.rpartition(":")
    if not sep:
        local_text = remote_text
    try:
        local, remote = int(local_text), int(remote_text)
    except ValueError:
        raise CliError(f"port-forward: {text!r}: expected [LOCAL:]REMOTE, ports as numbers") from None
    if not 1 <= remote <= 0xFFFF:
        raise CliError(f"port-forward: {text!r}: remote port {remote} is not in 1..65535")
    if not 0 <= local <= 0xFFFF:
        raise CliError(f"port-forward: {text!r}: local port {local} is not in 0..65535")
    return PortPair(local, remote)


async def _forward_one(
    pf: PortForward, remote: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One local connection <-> one stream pair; the local socket closes when the pod's side ends."""
    from daemon.streaming.errors import SessionClosedError, StreamResetError

    upstream: asyncio.Task[None] | None = None
    try:
        try:
            conn = await pf.open(remote)
        except (SessionClosedError, StreamResetError, BerthError) as exc:
            print(f"port-forward: {remote}: {exc}", file=sys.stderr)
            return
        errors = asyncio.create_task(conn.error())

        async def up() -> None:
            with contextlib.suppress(ConnectionError, SessionClosedError, StreamResetError):
                while data := await reader.read(FORWARD_CHUNK):
                    await conn.write(data)
            await conn.close_write()

        upstream = asyncio.create_task(up())
        with contextlib.suppress(ConnectionError):
            while data := await conn.read():
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        try:
            message = await asyncio.wait_for(errors, FORWARD_ERROR_WAIT)
        except TimeoutError:
            message = ""
        if message:
            print(f"port-forward: {message}", file=sys.stderr)
    finally:
        if upstream is not None:
            upstream.cancel()
            await asyncio.gather(upstream, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def port_forward(c: CriClient, args: argparse.Namespace) -> None:
    """Listen on 127.0.0.1 per pair; print ``Forwarding from 127.0.0.1:L -> R`` (kubectl's line) for each."""
    from daemon.streaming.client import connect_portforward  # aiohttp: only for streaming verbs

    pairs = [parse_port_pair(text) for text in args.ports]
    req = cri.PortForwardRequest(pod_sandbox_id=args.pod, port=sorted({p.remote for p in pairs}))
    url = (await c.rt.port_forward(req)).url
    pf = await connect_portforward(url)
    servers: list[asyncio.Server] = []
    live: set[asyncio.Task[None]] = set()
    try:
        for pair in pairs:

            async def accepted(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, remote: int = pair.remote
            ) -> None:
                task = asyncio.current_task()
                assert task is not None
                live.add(task)
                try:
                    await _forward_one(pf, remote, reader, writer)
                finally:
                    live.discard(task)

            try:
                server = await asyncio.start_server(accepted, "127.0.0.1", pair.local)
            except OSError as exc:
                raise CliError(f"port-forward: 127.0.0.1:{pair.local}: {exc.strerror or exc}") from None
            servers.append(server)
            port = server.sockets[0].getsockname()[1]
            print(f"Forwarding from 127.0.0.1:{port} -> {pair.remote}", flush=True)
        # shielded: wait_closed swallows a cancellation, and Ctrl-C must reach this task
        await asyncio.shield(pf.session.wait_closed())
        raise CliError("port-forward: the streaming server closed the connection")
    finally:
        for server in servers:
            server.close()
        for task in list(live):
            task.cancel()
        await asyncio.gather(*live, return_exceptions=True)
        await pf.close()


# -- stats and events ---------------------------------------------------------------------


def _fs(usage: cri.FilesystemUsage | None) -> tuple[str, str]:
    if usage is None or not betterproto.serialized_on_wire(usage):
        return "-", "-"
    used = (
        view.human_size(usage.used_bytes.value) if betterproto.serialized_on_wire(usage.used_bytes) else "-"
    )
    inodes = str(usage.inodes_used.value) if betterproto.serialized_on_wire(usage.inodes_used) else "-"
    return used, inodes


async def stats(c: CriClient, args: argparse.Namespace) -> None:
    flt = cri.ContainerStatsFilter(id=args.id, pod_sandbox_id=args.pod, label_selector=dict(args.labels))
    found = list((await c.rt.list_container_stats(cri.ListContainerStatsRequest(filter=flt))).stats)
    if (args.output or args.format) == "json":
        output.emit_json({"stats": [view.message_json(s) for s in found]})
        return
    rows = []
    for s in found:
        disk, inodes = _fs(s.writable_layer)
        rows.append(
            [
                view.short_id(s.attributes.id),
                s.attributes.metadata.name,
                view.cpu_percent(s.cpu),
                view.memory_text(s.memory),
                disk,
                inodes,
            ]
        )
    output.table(["CONTAINER", "NAME", "CPU %", "MEM", "DISK", "INODES"], rows)


async def statsp(c: CriClient, args: argparse.Namespace) -> None:
    flt = cri.PodSandboxStatsFilter(id=args.id, label_selector=dict(args.labels))
    found = list((await c.rt.list_pod_sandbox_stats(cri.ListPodSandboxStatsRequest(filter=flt))).stats)
    if (args.output or args.format) == "json":
        output.emit_json({"stats": [view.message_json(s) for s in found]})
        return
    rows = [
        [
            s.attributes.metadata.name,
            view.short_id(s.attributes.id),
            view.cpu_percent(s.linux.cpu if s.linux else None),
            view.memory_text(s.linux.memory if s.linux else None),
        ]
        for s in found
    ]
    output.table(["POD", "POD ID", "CPU %", "MEM"], rows)


async def events(c: CriClient, args: argparse.Namespace) -> None:
    """GetContainerEvents, one compact JSON object per line, until interrupted or the daemon ends it."""
    async for event in c.rt_stream.get_container_events(cri.GetEventsRequest()):
        doc = event.to_dict(casing=betterproto.Casing.CAMEL)
        doc["containerEventType"] = event.container_event_type.name  # the zero value too (CREATED)
        output.emit_json(doc, compact=True)
        sys.stdout.flush()


__all__ = [
    "PortPair",
    "attach",
    "events",
    "exec_command",
    "logs",
    "parse_port_pair",
    "port_forward",
    "stats",
    "statsp",
    "stream_exec",
]
