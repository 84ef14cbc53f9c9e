"""``berth-shim-runc-v2``: the shim v2 bootstrap (``start``/``delete``) and serving mode.

Follows containerd's runtime v2 contract (core/runtime/v2/README.md):

* ``-namespace NS -id ID -address ADDR start`` starts a detached shim (new
  session, stdio to a log file) serving containerd.task.v2.Task over ttrpc on
  a unix socket, and prints ``unix://<socket>`` on stdout once the shim is
  ready. A shim already answering for the same (address, namespace, id) is
  reused.
* ``... delete`` (cwd = bundle) cleans up after a shim that died: force-deletes
  the runc container and prints a marshalled DeleteResponse on stdout.
* without an action it serves: the process started by ``start``.

State lives under ``-state`` / $BERTH_SHIM_STATE (default /run/berth/shim):
``s/<hash>`` sockets (short names: unix paths are limited to 108 bytes),
``runc/<ns>`` runc's root, ``<ns>/<id>/`` the shim's pid file and log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from daemon import logs
from daemon.ttrpc import TtrpcServer
from daemon.ttrpc.services import TASK_METHODS, TASK_SERVICE, bind
from plugins.runtime.runc_v2.shim.reaper import Reaper
from plugins.runtime.runc_v2.shim.service import RUNC, TaskService
from protos.containerd.task.v2 import DeleteResponse

log = structlog.get_logger(__name__)

DEFAULT_STATE = "/run/berth/shim"
STATE_ENV = "BERTH_SHIM_STATE"
START_TIMEOUT = 30.0
PR_SET_CHILD_SUBREAPER = 36


class Layout:
    """Where one shim keeps its things under the state directory."""

    def __init__(self, state: str, namespace: str, shim_id: str, address: str) -> None:
        self.state = Path(state)
        key = hashlib.sha256(f"{address}\0{namespace}\0{shim_id}".encode()).hexdigest()[:32]
        self.socket = self.state / "s" / key
        self.runc_root = self.state / "runc" / namespace
        self.dir = self.state / namespace / shim_id
        self.pid_file = self.dir / "shim.pid"
        self.log_file = self.dir / "shim.log"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="berth-shim-runc-v2", allow_abbrev=False)
    parser.add_argument("-namespace", required=True)
    parser.add_argument("-id", required=True)
    parser.add_argument("-address", default="", help="the daemon's address (identifies the shim)")
    parser.add_argument("-publish-binary", dest="publish_binary", default="", help="accepted, unused yet")
    parser.add_argument("-bundle", default="", help="accepted, the bundle is the working directory")
    parser.add_argument("-debug", action="store_true")
    parser.add_argument("-state", default=os.environ.get(STATE_ENV, DEFAULT_STATE))
    parser.add_argument("-ready-fd", dest="ready_fd", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("action", nargs="?", choices=["start", "delete"])
    args = parser.parse_args(argv)
    if not args.namespace or not args.id:
        parser.error("-namespace and -id must not be empty")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    layout = Layout(args.state, args.namespace, args.id, args.address)
    if args.action == "start":
        sys.exit(start(args, layout))
    if args.action == "delete":
        sys.exit(delete(args, layout))
    logs.configure("debug" if args.debug else "info", "json", sys.stderr)
    asyncio.run(serve(args, layout))


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def start(args: argparse.Namespace, layout: Layout) -> int:
    """Start a detached serving shim and print its address; 0 once it listens."""
    if _answers(layout.socket):
        print(f"unix://{layout.socket}", flush=True)
        return 0
    layout.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    layout.dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    argv = [
        sys.executable,
        "-m",
        "plugins.runtime.runc_v2.shim.main",
        *("-namespace", args.namespace, "-id", args.id, "-address", args.address),
        *("-state", str(layout.state)),
        *(["-debug"] if args.debug else []),
    ]
    read_fd, write_fd = os.pipe()
    try:
        with open(layout.log_file, "ab") as log_file:
            proc = subprocess.Popen(
                [*argv, "-ready-fd", str(write_fd)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        os.close(write_fd)
        write_fd = -1
        # The shim writes one byte once it listens, or dies and the pipe reads EOF.
        ready, _, _ = select.select([read_fd], [], [], START_TIMEOUT)
        ok = bool(ready) and os.read(read_fd, 1) == b"1"
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    if not ok:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        print(f"berth-shim-runc-v2: shim did not start, see {layout.log_file}", file=sys.stderr)
        return 1
    print(f"unix://{layout.socket}", flush=True)
    return 0


def delete(args: argparse.Namespace, layout: Layout) -> int:
    """Clean up after a dead shim: force-delete its container, report it as SIGKILLed."""
    result = subprocess.run(
        [RUNC, "--root", str(layout.runc_root), "delete", "--force", args.id],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 and "does not exist" not in result.stderr:
        print(f"berth-shim-runc-v2: runc delete {args.id}: {result.stderr.strip()}", file=sys.stderr)
        return 1
    with contextlib.suppress(FileNotFoundError):
        layout.socket.unlink()
    shutil.rmtree(layout.dir, ignore_errors=True)
    response = DeleteResponse(exit_status=128 + signal.SIGKILL, exited_at=datetime.now(UTC))
    sys.stdout.buffer.write(bytes(response))
    sys.stdout.buffer.flush()
    return 0


def become_subreaper() -> None:
    """Adopt orphaned descendants: container inits are reparented to the shim when runc exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


async def serve(args: argparse.Namespace, layout: Layout) -> None:
    """Serve the Task service until Shutdown (or SIGTERM/SIGINT), then remove the socket and pid file."""
    become_subreaper()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reaper = Reaper()
    reaper.install()
    layout.runc_root.mkdir(parents=True, exist_ok=True, mode=0o711)
    service = TaskService(reaper, str(layout.runc_root), stop.set)
    server = TtrpcServer({TASK_SERVICE: bind(TASK_METHODS, service)})
    await server.start(layout.socket)
    layout.pid_file.write_text(f"{os.getpid()}\n")
    log.info("shim.serve", namespace=args.namespace, id=args.id, socket=str(layout.socket), pid=os.getpid())
    if args.ready_fd >= 0:
        os.write(args.ready_fd, b"1")
        os.close(args.ready_fd)
    started = time.monotonic()
    try:
        await stop.wait()
    finally:
        await server.stop()
        reaper.uninstall()
        with contextlib.suppress(FileNotFoundError):
            layout.pid_file.unlink()
        log.info("shim.exit", uptime=round(time.monotonic() - started, 3))


if __name__ == "__main__":
    main()
