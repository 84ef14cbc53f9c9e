"""``berth-shim-runc-v2``: the shim v2 bootstrap (``start``/``delete``) and serving mode.

Follows containerd's runtime v2 contract (core/runtime/v2/README.md), as
containerd 1.6's runc v2 shim does it:

* ``-namespace NS -id ID -address ADDR start`` (cwd = the bundle, env
  ``TTRPC_ADDRESS``) starts a detached shim (new session, stdio to a log file,
  child subreaper) serving containerd.task.v2.Task over ttrpc on a unix socket,
  writes ``address`` and ``shim.pid`` into the bundle and prints
  ``unix://<socket>`` once the shim listens (it also serves berth.shim.v1.Logs,
  reopen of the CRI log files it writes: :mod:`.crilog`). The shim's identity is
  the bundle's group annotation (``io.containerd.runc.v2.group``, else
  ``io.kubernetes.cri.sandbox-id``) or else the id: a live shim of the same
  (address, namespace, identity) is reused, so one shim serves a pod.
* ``... delete`` (cwd = bundle) cleans up after a shim that died: unmounts
  ``<bundle>/rootfs``, force-deletes the runc container (runc's root and binary
  from ``<bundle>/options.json``, written by the shim at Create) and prints a
  marshalled DeleteResponse (exit status 137) on stdout.
* without an action it serves: the process started by ``start``. It publishes
  task events to ``$TTRPC_ADDRESS`` and exits after a Shutdown that finds no task.

The fast path skips the exec: :mod:`.zygote` forks pre-imported shims and calls
:func:`serve_forked`, the same serving code. So that ``start``/``delete`` stay
cheap, this module imports asyncio, ttrpc and the protos only where it serves,
and as a program it keeps ssl, importlib.metadata and dateutil out (:mod:`.lean`).

State lives under ``-state`` / $BERTH_SHIM_STATE (default /run/berth/shim):
``s/<hash>`` sockets (short names: unix paths are limited to 108 bytes),
``runc/<ns>`` runc's default root, ``<ns>/<identity>/`` the shim's pid file and log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_STATE = "/run/berth/shim"
STATE_ENV = "BERTH_SHIM_STATE"
START_TIMEOUT = 30.0
PUBLISH_FLUSH_TIMEOUT = 3.0
PR_SET_CHILD_SUBREAPER = 36
#: Bundle annotations naming the group of a task, in order of precedence (containerd's).
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
#: What ``delete`` reports for a task whose shim died: containerd's 128 + SIGKILL.
KILLED_STATUS = 137


@dataclass(frozen=True)
class ShimOptions:
    """What a serving shim needs to know; ``id`` is its identity (the group, or else the task id)."""

    namespace: str
    id: str
    address: str
    ttrpc_address: str
    state: str
    debug: bool = False


class Layout:
    """Where one shim keeps its things under the state directory."""

    def __init__(self, state: str, namespace: str, shim_id: str, address: str) -> None:
        import hashlib  # here: the bootstrap blocks OpenSSL's _hashlib first (lean.block_unused)

        self.state = Path(state)
        key = hashlib.sha256(f"{address}\0{namespace}\0{shim_id}".encode()).hexdigest()[:32]
        self.socket = self.state / "s" / key
        self.lock_file = self.state / "s" / f"{key}.lock"
        self.runc_root = self.state / "runc" / namespace
        self.dir = self.state / namespace / shim_id
        self.pid_file = self.dir / "shim.pid"
        self.log_file = self.dir / "shim.log"

    @classmethod
    def of(cls, options: ShimOptions) -> Layout:
        return cls(options.state, options.namespace, options.id, options.address)

    def prepare(self) -> None:
        """Create the directories a starting shim writes into."""
        self.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o711)


def shim_identity(bundle: str | os.PathLike[str], task_id: str) -> str:
    """The group a bundle's config.json annotations name, else ``task_id``."""
    try:
        with open(Path(bundle) / "config.json", "rb") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return task_id  # no readable spec: Create will report it
    annotations = spec.get("annotations") if isinstance(spec, dict) else None
    if isinstance(annotations, dict):
        for key in GROUP_ANNOTATIONS:
            group = annotations.get(key)
            if isinstance(group, str) and group:
                return group
    return task_id


def answers(path: Path) -> bool:
    """Whether a shim listens on ``path`` (a leftover socket file of a dead shim does not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def write_bundle_files(bundle: str | os.PathLike[str], address: str, pid: int | None) -> None:
    """``address`` and ``shim.pid`` in the bundle, as containerd's shims leave them (atomically)."""
    files = {"address": address, **({"shim.pid": str(pid)} if pid is not None else {})}
    for name, content in files.items():
        target = Path(bundle) / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text(content)
        tmp.replace(target)


def lock_identity(layout: Layout) -> int:
    """An fd holding the exclusive flock of this shim identity (``start`` runs under it).

    The exiting shim unlinks the lock file under the same lock, so a lock taken
    on a file that was unlinked meanwhile is retried on the new file.
    """
    import fcntl

    while True:
        fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(layout.lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def remove_lock(layout: Layout) -> None:
    """Unlink the identity's lock file unless a ``start`` holds it (then it stays: harmless)."""
    import fcntl

    try:
        fd = os.open(layout.lock_file, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(layout.lock_file).st_ino == os.fstat(fd).st_ino:
                layout.lock_file.unlink()
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def running_pid(layout: Layout) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(layout.pid_file.read_text())
    return None


# -- command line --------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="berth-shim-runc-v2", allow_abbrev=False)
    parser.add_argument("-namespace", required=True)
    parser.add_argument("-id", required=True)
    parser.add_argument("-address", default="", help="the daemon's address (identifies the shim)")
    parser.add_argument("-publish-binary", dest="publish_binary", default="", help="accepted, unused")
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
    """The program ``berth-shim-runc-v2``: never called inside another process (it trims imports)."""
    from plugins.runtime.runc_v2.shim import lean

    lean.block_unused()
    args = parse_args(argv)
    if args.action != "start":  # start only execs a shim: it needs no betterproto
        lean.import_betterproto()
    if args.action == "start":
        sys.exit(start(args))
    if args.action == "delete":
        sys.exit(delete(args))
    options = ShimOptions(
        namespace=args.namespace,
        id=args.id,
        address=args.address,
        ttrpc_address=os.environ.get("TTRPC_ADDRESS", ""),
        state=args.state,
        debug=args.debug,
    )
    run(options, args.ready_fd)


def start(args: argparse.Namespace) -> int:
    """Start (or find) the serving shim of this bundle's identity, print its address; 0 once it listens."""
    bundle = os.getcwd()
    identity = shim_identity(bundle, args.id)
    layout = Layout(args.state, args.namespace, identity, args.address)
    layout.prepare()
    # The lock serialises concurrent starts of one group, so exactly one shim binds its socket.
    lock = lock_identity(layout)
    try:
        pid = running_pid(layout) if answers(layout.socket) else _spawn(args, identity, layout)
    finally:
        os.close(lock)
    if pid is None:
        print(f"berth-shim-runc-v2: shim did not start, see {layout.log_file}", file=sys.stderr)
        return 1
    address = f"unix://{layout.socket}"
    if os.path.exists("config.json"):  # a bundle indeed: a start run by hand elsewhere leaves no litter
        write_bundle_files(bundle, address, pid)
    print(address, flush=True)
    return 0


def _spawn(args: argparse.Namespace, identity: str, layout: Layout) -> int | None:
    """Exec a serving shim in its own session; its pid once it listens, None if it died first."""
    import subprocess

    argv = [
        sys.executable,
        "-m",
        "plugins.runtime.runc_v2.shim.main",
        *("-namespace", args.namespace, "-id", identity, "-address", args.address),
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
        ok = wait_ready(read_fd, START_TIMEOUT)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    if not ok:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        return None
    return proc.pid


def wait_ready(read_fd: int, timeout: float) -> bool:
    """Whether the shim at the other end of the pipe wrote its ready byte (EOF: it died)."""
    ready, _, _ = select.select([read_fd], [], [], timeout)
    return bool(ready) and os.read(read_fd, 1) == b"1"


def delete(args: argparse.Namespace) -> int:
    """Clean up after a dead shim's task: unmount its rootfs, force-delete its container.

    Prints a DeleteResponse reporting the task SIGKILLed, as containerd's shim
    does. The shim's socket and state go too, unless the shim (of a group) still answers.
    """
    import asyncio
    import subprocess
    from datetime import UTC, datetime

    from daemon import logs
    from daemon.mount import release
    from protos.containerd.task.v2 import DeleteResponse

    logs.configure("debug" if args.debug else "info", "json", sys.stderr)  # stdout is the response
    bundle = Path.cwd()
    layout = Layout(args.state, args.namespace, shim_identity(bundle, args.id), args.address)
    options = _read_options(bundle)
    # As containerd's shim: runc's root is <options.root>/<namespace>, else the shim's default.
    runc_root = (
        os.path.join(options["root"], args.namespace) if options.get("root") else str(layout.runc_root)
    )
    runc = str(options.get("binary_name") or "runc")
    rootfs = bundle / "rootfs"
    try:
        asyncio.run(release(rootfs))
    except Exception as exc:  # noqa: BLE001 - reported, and the container still gets deleted
        print(f"berth-shim-runc-v2: unmount {rootfs}: {exc}", file=sys.stderr)
    result = subprocess.run(
        [runc, "--root", runc_root, "delete", "--force", args.id],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 and "does not exist" not in result.stderr:
        print(f"berth-shim-runc-v2: runc delete {args.id}: {result.stderr.strip()}", file=sys.stderr)
        return 1
    if not answers(layout.socket):
        with contextlib.suppress(FileNotFoundError):
            layout.socket.unlink()
        import shutil

        shutil.rmtree(layout.dir, ignore_errors=True)
    response = DeleteResponse(exit_status=KILLED_STATUS, exited_at=datetime.now(UTC))
    with contextlib.suppress(OSError, ValueError):
        response.pid = int((bundle / "init.pid").read_text())
    sys.stdout.buffer.write(bytes(response))
    sys.stdout.buffer.flush()
    return 0


def _read_options(bundle: Path) -> dict[str, Any]:
    """``<bundle>/options.json``, the runc options of Create; empty if the shim never wrote it."""
    try:
        options = json.loads((bundle / "options.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        print(f"berth-shim-runc-v2: {bundle / 'options.json'}: {exc}", file=sys.stderr)
        return {}
    return options if isinstance(options, dict) else {}


# -- serving -------------------------------------------------------------------


def become_subreaper() -> None:
    """Adopt orphaned descendants: container inits are reparented to the shim when runc exits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(code)}")


def run(options: ShimOptions, ready_fd: int = -1, *, configure_logs: bool = True) -> None:
    """Serve until Shutdown: the body of the exec'd shim and of a zygote's child.

    ``configure_logs=False`` keeps the process's structlog set-up: a zygote's
    child whose zygote configured the same level on the same stderr object
    (configuring again would only dirty ~0.7 MB of pages shared with the zygote).
    """
    import asyncio

    if configure_logs:
        from daemon import logs

        logs.configure("debug" if options.debug else "info", "json", sys.stderr)
    asyncio.run(serve(options, ready_fd))


async def serve(options: ShimOptions, ready_fd: int = -1) -> None:
    """Serve the Task service until Shutdown (or SIGTERM/SIGINT), then remove the socket and state.

    ``ready_fd`` (if >= 0) gets one byte ``1`` once the socket listens, and is closed.
    """
    import asyncio
    import signal
    import time

    import structlog

    from daemon.ttrpc import TtrpcServer
    from daemon.ttrpc.services import LOGS_METHODS, LOGS_SERVICE, TASK_METHODS, TASK_SERVICE, bind
    from plugins.runtime.runc_v2.shim.publisher import Publisher
    from plugins.runtime.runc_v2.shim.reaper import Reaper
    from plugins.runtime.runc_v2.shim.service import LogService, TaskService

    log = structlog.get_logger(__name__)
    layout = Layout.of(options)
    become_subreaper()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reaper = Reaper()
    reaper.install()
    layout.runc_root.mkdir(parents=True, exist_ok=True, mode=0o711)
    publisher = Publisher(options.ttrpc_address, options.namespace)
    delivering = asyncio.create_task(publisher.run(), name="publisher")
    service = TaskService(
        reaper, str(layout.runc_root), stop.set, publisher.publish, namespace=options.namespace
    )
    server = TtrpcServer(
        {
            TASK_SERVICE: bind(TASK_METHODS, service),
            LOGS_SERVICE: bind(LOGS_METHODS, LogService(service)),
        }
    )
    await server.start(layout.socket)
    layout.pid_file.write_text(f"{os.getpid()}\n")
    log.info(
        "shim.serve",
        namespace=options.namespace,
        id=options.id,
        socket=str(layout.socket),
        pid=os.getpid(),
        events=options.ttrpc_address,
    )
    if ready_fd >= 0:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    started = time.monotonic()
    try:
        await stop.wait()
    finally:
        await server.stop()
        await publisher.close(PUBLISH_FLUSH_TIMEOUT)
        await asyncio.gather(delivering, return_exceptions=True)
        reaper.uninstall()
        with contextlib.suppress(FileNotFoundError):
            layout.pid_file.unlink()
        remove_lock(layout)
        with contextlib.suppress(OSError):
            layout.log_file.unlink()
            layout.dir.rmdir()
        log.info("shim.exit", uptime=round(time.monotonic() - started, 3))


def serve_forked(
    options: ShimOptions, bundle: str, log_path: Path, ready_fd: int, *, configure_logs: bool = True
) -> None:
    """The zygote's child becomes a shim: detach, reset what the zygote set, serve, never return.

    Every fd >= 3 but ``ready_fd`` is the zygote's (its socket, its clients,
    other children's pipes) and is closed, as exec would have with CLOEXEC.
    """
    import signal

    code = 0
    try:
        os.setsid()
        os.chdir(bundle)
        devnull = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        if ready_fd != 3:
            os.dup2(ready_fd, 3, inheritable=False)
            ready_fd = 3
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        run(options, ready_fd, configure_logs=configure_logs)
    except BaseException as exc:  # noqa: BLE001 - nothing may unwind into the zygote's code
        code = 1
        with contextlib.suppress(Exception):
            print(f"berth-shim-runc-v2: forked shim failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
