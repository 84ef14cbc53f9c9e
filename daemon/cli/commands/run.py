"""``berth run``: a container from an image, run in the foreground (or detached), like ``ctr run``.

The CLI does what containerd's client library does for ``ctr run``, over
the wire only:

1. the image record and the images plugin's defaults (platform,
   snapshotter) at once, then the image's documents (Images, Introspection,
   Content); a lease is taken meanwhile;
2. under the lease (so no garbage collection takes it half-way), an active
   snapshot keyed by the container id on the image's top chain id (a
   missing parent means the image is not unpacked there);
3. the OCI spec, built here with :mod:`daemon.oci.spec` from the image
   config and the options. User names and supplementary groups come from
   the image's /etc/passwd and /etc/group, read from the snapshot's layer
   directories or bind source (:mod:`daemon.oci.userfiles`), or, when the
   layers hold anything that reader leaves to the kernel, from the snapshot
   mounted read-only in a temporary directory;
4. the container record (``Containers.Create``), which from then on keeps
   the snapshot; the lease is dropped while the task is made;
5. the task: FIFOs (:mod:`daemon.cli.taskio`; none for stdin when ours is
   /dev/null, which the process then gets instead), ``Tasks.Create`` with
   the snapshot's mounts from step 2, ``Tasks.Wait`` issued before
   ``Tasks.Start``; output copied to the terminal until the task exits,
   whose exit status becomes ours (the shim reports 128+N for a death by
   signal N); the task is deleted.

``--rm`` deletes the task, the container and its snapshot at the end, on
errors too. Without it the stopped container stays, as with ``ctr``.

Everything here is short and runs while nothing else does, so the small
blocking steps (FIFOs, the two user files, the spec) run inline on the loop:
a worker thread would cost more to start than they take.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemon.cli import taskio
from daemon.cli.client import Client
from daemon.cli.commands import CliError, Handler, parse_pairs
from daemon.cli.imagetree import Platform, image_defaults, read_tree
from daemon.cli.taskclient import DEFAULT_RUNTIME, TaskClient, spec_any
from daemon.oci import spec as ocispec
from daemon.oci import userfiles
from protos.containerd.services.containers.v1 import Container, ContainerRuntime
from protos.containerd.services.tasks.v1 import CreateTaskRequest

if TYPE_CHECKING:
    from daemon.protocols import Mount as HostMount
    from protos.containerd.services.images.v1 import Image as PbImage
    from protos.containerd.types import Mount

T = TypeVar("T")

#: Seconds to wait for the last output once the task exited, before and after deleting it.
DRAIN_TIMEOUT = 5.0
#: Seconds a task killed during ``--rm`` cleanup may take to exit.
KILL_TIMEOUT = 10.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    p = sub.add_parser("run", help="run a container from an image (like ctr run)")
    p.add_argument("--rm", action="store_true", help="delete the container and its snapshot when it exits")
    p.add_argument("--tty", "-t", action="store_true", help="allocate a terminal")
    p.add_argument("--detach", "-d", action="store_true", help="start it and return (no stdio)")
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="set (or, as K, unset) a variable"
    )
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SPEC",
        help="type=bind,src=/host,dst=/in,options=rbind:ro (repeatable)",
    )
    p.add_argument("--user", "-u", default="", help="user[:group] or uid[:gid] (default: the image's)")
    p.add_argument("--cwd", default="", help="working directory (default: the image's)")
    p.add_argument("--memory-limit", type=int, default=0, metavar="BYTES", help="memory limit")
    p.add_argument("--cpus", type=float, default=0.0, metavar="N", help="CPUs (CFS quota over 100ms)")
    p.add_argument("--snapshotter", default="", help="snapshotter (default: the images plugin's)")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="container label")
    p.add_argument("--runtime", default=DEFAULT_RUNTIME, help=f"runtime name (default {DEFAULT_RUNTIME})")
    p.add_argument("--seccomp", action="store_true", help="apply the default seccomp profile")
    p.add_argument("--platform", default="", help="os/arch[/variant] of an index (default: the daemon's)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("id", metavar="ID")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD", help="command (default: the image's)")
    return {"run": run}


def task_client(c: Client) -> TaskClient:
    if not isinstance(c, TaskClient):
        raise TypeError("berth: the run/containers/tasks commands need a TaskClient")
    return c


# -- parsing -------------------------------------------------------------------------


def parse_mount(text: str) -> dict[str, Any]:
    """``ctr``'s ``--mount`` syntax as an OCI mount: type, src/source, dst/destination/target, options a:b."""
    fields: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise CliError(f"--mount {text!r}: {part!r} is not KEY=VALUE")
        fields[key.strip()] = value
    mount: dict[str, Any] = {"type": "none", "options": []}
    for key, value in fields.items():
        if key == "type":
            mount["type"] = value
        elif key in ("src", "source"):
            mount["source"] = value
        elif key in ("dst", "destination", "target"):
            mount["destination"] = value
        elif key == "options":
            mount["options"] = [o for o in value.split(":") if o]
        else:
            raise CliError(f"--mount {text!r}: unknown key {key!r} (type, src, dst, options)")
    if "destination" not in mount:
        raise CliError(f"--mount {text!r}: dst is required")
    if not str(mount["destination"]).startswith("/"):
        raise CliError(f"--mount {text!r}: dst must be an absolute path")
    if mount["type"] == "bind" and not any(o in ("bind", "rbind") for o in mount["options"]):
        mount["options"].insert(0, "rbind")
    return mount


# -- the snapshot, read-only --------------------------------------------------------


def readonly_mounts(mounts: Sequence[Mount]) -> list[HostMount] | str:
    """What to mount to read a snapshot without writing to it, or the directory to read in place.

    An overlay loses its upper and work directories; the upper directory
    becomes the top lower one, so what was written shows. A bind mount needs
    no mounting at all: its source is the snapshot.
    """
    if len(mounts) == 1 and mounts[0].type == "bind":
        return str(mounts[0].source)
    from daemon.protocols import Mount as HostMount

    out: list[HostMount] = []
    for m in mounts:
        if m.type != "overlay":
            opts = (*(o for o in m.options if o not in ("rw", "ro")), "ro")
            out.append(HostMount(m.type, m.source, "", opts))
            continue
        upper = ""
        lowers: list[str] = []
        rest: list[str] = []
        for o in m.options:
            if o.startswith("upperdir="):
                upper = o.removeprefix("upperdir=")
            elif o.startswith("lowerdir="):
                lowers = o.removeprefix("lowerdir=").split(":")
            elif not o.startswith("workdir=") and o not in ("rw", "ro"):
                rest.append(o)
        layers = ([upper] if upper else []) + lowers
        if len(layers) == 1:
            out.append(HostMount("bind", layers[0], "", ("rbind", "ro")))
        else:
            out.append(HostMount("overlay", "overlay", "", (*rest, f"lowerdir={':'.join(layers)}", "ro")))
    return out


@contextlib.asynccontextmanager
async def users_root(mounts: Sequence[Mount]) -> AsyncIterator[str]:
    """A rootfs for the spec's user lookups, for the body: the snapshot's /etc/passwd and /etc/group.

    Read from its layers or bind source (:mod:`daemon.oci.userfiles`, a
    :class:`~daemon.oci.users.UserFiles`), or, when that reader leaves them to
    the kernel, the snapshot mounted read-only (see :func:`readonly_mounts`).
    """
    try:
        files = userfiles.read_user_files(mounts)
    except userfiles.NeedsMount:
        pass
    else:
        yield files
        return
    plan = readonly_mounts(mounts)
    if isinstance(plan, str):
        yield plan
        return
    from daemon.cli.logs import quiet_logs

    quiet_logs()  # daemon.mount logs through structlog
    from daemon.mount import mounted

    async with mounted(plan) as root:
        yield str(root)


# -- run ---------------------------------------------------------------------------


def _spec_options(args: argparse.Namespace, config: dict[str, Any], rootfs: str) -> list[ocispec.SpecOpt]:
    opts: list[ocispec.SpecOpt] = [ocispec.with_image_config(config, rootfs, args=args.args)]
    if args.user:
        opts += [ocispec.with_user(args.user, rootfs), ocispec.with_additional_gids(args.user, rootfs)]
    if args.cwd:
        opts.append(ocispec.with_cwd(args.cwd))
    if args.env:
        opts.append(ocispec.with_env(args.env))
    if args.tty:
        opts.append(ocispec.with_tty())
    if args.mount:
        opts.append(ocispec.with_mounts([parse_mount(m) for m in args.mount]))
    if args.memory_limit:
        opts.append(ocispec.with_memory_limit(args.memory_limit))
    if args.cpus:
        period = 100_000
        opts.append(ocispec.with_cpu_quota(int(args.cpus * period), period))
    if args.seccomp:
        opts.append(ocispec.with_default_seccomp())
    return opts


async def run(c: Client, args: argparse.Namespace) -> None:
    rc = task_client(c)
    if args.rm and args.detach:
        raise CliError("--rm and --detach cannot be used together")
    if args.tty and args.detach:
        raise CliError("--tty and --detach cannot be used together (a detached task has no terminal)")
    if args.args and args.args[0] == "--":
        args.args = args.args[1:]
    labels = parse_pairs(args.label, "--label")
    for m in args.mount:
        parse_mount(m)  # the operator's mistakes before anything is created

    # Three independent calls at once; whichever fails, a lease that was made is dropped.
    leased: str | BaseException
    found: PbImage | BaseException
    defaults: tuple[Platform, str] | BaseException
    leased, found, defaults = await asyncio.gather(
        rc.create_lease("berth-run"),
        _image(rc, args.image),
        image_defaults(rc, args.platform, args.snapshotter),
        return_exceptions=True,
    )
    lease = leased if isinstance(leased, str) else ""
    dropping: asyncio.Task[None] | None = None
    state = _Created()
    code = 0
    try:
        image, (platform, snapshotter) = _result(found), _result(defaults)
        _result(leased)
        tree = await read_tree(rc, image, platform)
        if tree.config is None:
            raise CliError(f"image {args.image!r}: no config for platform {platform} in the content store")
        chain = tree.chain_ids
        if not chain:
            raise CliError(f"image {args.image!r}: its config lists no layers")
        config_labels = (tree.config.get("config") or {}).get("Labels") or {}
        state.snapshotter = snapshotter
        await _create_container(
            rc, args, tree.config, chain[-1], snapshotter, {**config_labels, **labels}, lease, state
        )
        # The container record keeps the snapshot now: the lease goes while the task is made.
        dropping, lease = asyncio.create_task(_drop_lease(rc, lease)), ""
        code = await attached(
            rc,
            args.id,
            tty=args.tty,
            detach=args.detach,
            create=lambda fifos: _create_task(rc, args.id, fifos, args.tty, state),
            on_exit=lambda: _delete_task(rc, args.id, state),
        )
    finally:
        if lease:
            await _drop_lease(rc, lease)
        if dropping is not None:
            await dropping
        if args.rm or not state.container:
            await _cleanup(rc, args.id, state.snapshotter, state)
    if code:
        raise SystemExit(code)


def _result(value: T | BaseException) -> T:
    """A result of ``gather(..., return_exceptions=True)``, or its exception raised."""
    if isinstance(value, BaseException):
        raise value
    return value


async def _image(rc: TaskClient, name: str) -> PbImage:
    try:
        return await rc.get_image(name)
    except GRPCError as exc:
        if exc.status is Status.NOT_FOUND:
            raise CliError(f"image {name!r}: not found (pull or import it first)") from None
        raise


async def _drop_lease(rc: TaskClient, lease: str) -> None:
    with contextlib.suppress(GRPCError):
        await rc.delete_lease(lease)


class _Created:
    """What ``run`` has made so far, for the cleanup and the task (the snapshot's mounts)."""

    def __init__(self) -> None:
        self.snapshotter = ""
        self.snapshot = False
        self.mounts: list[Mount] = []
        self.container = False
        self.task = False


async def _create_container(
    rc: TaskClient,
    args: argparse.Namespace,
    config: dict[str, Any],
    parent: str,
    snapshotter: str,
    labels: dict[str, str],
    lease: str,
    state: _Created,
) -> None:
    """The snapshot (under ``lease``), the spec, the container record."""
    try:
        state.mounts = await rc.prepare_snapshot(snapshotter, args.id, parent, lease)
    except GRPCError as exc:
        if exc.status is Status.ALREADY_EXISTS:
            raise CliError(f"container {args.id!r}: a snapshot with this key already exists") from None
        if exc.status is Status.NOT_FOUND and not await _has_snapshot(rc, snapshotter, parent):
            raise CliError(
                f"image {args.image!r}: not unpacked in snapshotter {snapshotter!r} (pull or import it there)"
            ) from None
        raise
    state.snapshot = True
    async with users_root(state.mounts) as rootfs:
        opts = _spec_options(args, config, rootfs)
        spec = ocispec.generate(args.id, *opts, namespace=rc.namespace)
    container = Container(
        id=args.id,
        labels=labels,
        image=args.image,
        runtime=ContainerRuntime(name=args.runtime),
        spec=spec_any(ocispec.encode(spec, args.id)),
        snapshotter=snapshotter,
        snapshot_key=args.id,
    )
    await rc.create_container(container, lease)
    state.container = True


async def _has_snapshot(rc: TaskClient, snapshotter: str, key: str) -> bool:
    """Whether ``key`` exists (asked only to explain a failed Prepare: is the image unpacked there?)."""
    try:
        await rc.stat_snapshot(snapshotter, key)
    except GRPCError as exc:
        if exc.status is Status.NOT_FOUND:
            return False
        raise
    return True


async def _create_task(
    rc: TaskClient, container_id: str, fifos: taskio.Fifos | None, tty: bool, state: _Created
) -> None:
    """``Tasks.Create`` on the mounts Prepare returned (what a ``Snapshots.Mounts`` call would answer)."""
    req = CreateTaskRequest(container_id=container_id, rootfs=state.mounts, terminal=tty)
    if fifos is not None:
        req.stdin, req.stdout, req.stderr = fifos.stdin, fifos.stdout, fifos.stderr
    await rc.create_task(req)
    state.task = True


async def _delete_task(rc: TaskClient, container_id: str, state: _Created) -> None:
    await rc.delete_task(container_id)
    state.task = False


async def _cleanup(rc: TaskClient, container_id: str, snapshotter: str, state: _Created) -> None:
    """Delete what exists of task, container and snapshot; each failure is reported, none stops the rest."""
    if state.task:
        try:
            with contextlib.suppress(GRPCError):
                await rc.kill_task(container_id, signal.SIGKILL, all_=True)
            with contextlib.suppress(TimeoutError, GRPCError):
                async with asyncio.timeout(KILL_TIMEOUT):
                    await rc.wait_task(container_id)
            await rc.delete_task(container_id)
            state.task = False
        except GRPCError as exc:
            _warn(f"task {container_id}", exc)
    if state.container:
        try:
            await rc.delete_container(container_id)
            state.container = False
        except GRPCError as exc:
            _warn(f"container {container_id}", exc)
    if state.snapshot and not state.container:
        try:
            await rc.remove_snapshot(snapshotter, container_id)
            state.snapshot = False
        except GRPCError as exc:
            if exc.status is not Status.NOT_FOUND:
                _warn(f"snapshot {container_id}", exc)


def _warn(what: str, exc: GRPCError) -> None:
    print(
        f"berth: cleanup: {what}: {exc.status.name.lower().replace('_', ' ')}: {exc.message}", file=sys.stderr
    )


# -- attaching to a process --------------------------------------------------------


def stdin_is_devnull(fd: int = 0) -> bool:
    """Whether ``fd`` is the null device (a script's ``< /dev/null``, a service's stdin)."""
    try:
        ours, null = os.fstat(fd), os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(ours.st_mode) and ours.st_rdev == null.st_rdev


async def attached(
    rc: TaskClient,
    container_id: str,
    *,
    exec_id: str = "",
    tty: bool,
    detach: bool,
    create: Callable[[taskio.Fifos | None], Awaitable[None]],
    on_exit: Callable[[], Awaitable[None]],
) -> int:
    """Create a process with our stdio wired to it, start it, and (unless ``detach``) see it to its end.

    ``create(fifos)`` makes the process (``Tasks.Create`` or ``Tasks.Exec``;
    ``fifos`` is None when detached: the process gets no stdio);
    ``on_exit()`` deletes it once it exited. The process's exit status is
    returned (0 when detached). Ctrl-C and the other :data:`taskio.FORWARDED_SIGNALS`
    go to the process; with ``tty`` our terminal is raw and its size follows ours.
    """
    loop = asyncio.get_running_loop()
    if detach:
        await create(None)
        await rc.start_task(container_id, exec_id)
        return 0
    name = exec_id or container_id
    # Our stdin being /dev/null, the process gets the shim's (/dev/null too): no FIFO, no copying
    # thread, no CloseIO once it ended.
    fifos = taskio.Fifos.create(name, stdin=tty or not stdin_is_devnull(), stderr=not tty)
    io: taskio.TaskIO | None = None
    waiter: asyncio.Task[Any] | None = None
    pending: set[asyncio.Task[Any]] = set()
    try:
        io = taskio.TaskIO(fifos)
        await create(fifos)
        # Wait goes out before Start: an exit right after the start cannot be missed.
        waiter = asyncio.create_task(rc.wait_task(container_id, exec_id))

        def forward(sig: int) -> None:
            task = asyncio.create_task(rc.kill_task(container_id, sig, exec_id=exec_id))
            pending.add(task)
            task.add_done_callback(pending.discard)

        def resize(_sig: int) -> None:
            size = taskio.terminal_size()
            if size is not None:
                task = asyncio.create_task(rc.resize_pty(container_id, size[0], size[1], exec_id))
                pending.add(task)
                task.add_done_callback(pending.discard)

        started = asyncio.Event()

        async def close_stdin() -> None:
            # Only once started: a shim may drop what the process has not read yet if told before.
            await started.wait()
            await rc.close_stdin(container_id, exec_id)

        def stdin_ended() -> None:
            task = asyncio.create_task(close_stdin())
            pending.add(task)
            task.add_done_callback(pending.discard)

        with taskio.RawTerminal(0) if tty else contextlib.nullcontext():
            io.start(loop, stdin_ended)
            with taskio.on_signals(loop, taskio.FORWARDED_SIGNALS, forward):
                if tty and not exec_id:
                    # A task's pty exists from Create on: sized before the process runs (an exec's
                    # comes with Start, so it is sized just after, as ctr does for both).
                    size = taskio.terminal_size()
                    if size is not None:
                        with contextlib.suppress(GRPCError):
                            await rc.resize_pty(container_id, size[0], size[1])
                await rc.start_task(container_id, exec_id)
                started.set()
                if tty:
                    with taskio.on_signals(loop, (signal.SIGWINCH,), resize):
                        resize(signal.SIGWINCH)
                        status = await waiter
                else:
                    status = await waiter
                io.writers_done()
                await io.drain(DRAIN_TIMEOUT)
        await asyncio.gather(*pending, return_exceptions=True)
        await on_exit()
        return int(status.exit_status)
    finally:
        for task in [waiter, *pending]:
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if io is not None:
            io.close()
        fifos.remove()
