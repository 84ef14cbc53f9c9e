"""Bundle directories: ``<state>/<namespace>/<id>/``, one per task, as containerd's runtime v2 lays them out.

A bundle holds what a shim needs and what a restarted berthd needs to find
the shim again::

    config.json        the OCI spec (root.path "rootfs" when berth mounts the rootfs)
    rootfs/            mount point of the snapshot (the shim mounts it at Create)
    log                a FIFO: containerd's shim writes its log there, berthd reads it
    address            the shim's ttrpc address (``unix:///...``), written after start
    shim-binary-path   the shim binary used, for the ``delete`` bootstrap after a crash
    options.json       runc options, written by the shim (where runc keeps its state)

Removal refuses to follow a rootfs that is still mounted: it unmounts first,
so a shim that died before unmounting never makes berthd delete a snapshot's
files through the mount.

A group's shim started before its first task (``TaskManager.prepare_shim``)
has a group directory instead, ``<state>/.prepared/<namespace>/<group>/``:
a ``config.json`` that only names the group (what the shim's start reads
to know its identity) and the ``address`` written by the start. It lives as
long as that shim, so a restarted berthd finds a prepared shim that never
got a task; :func:`walk` does not list it (the ``.`` directory is skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import structlog

from daemon.errors import AlreadyExists, InvalidArgument
from daemon.mount import mount_points_under, unmount_all

log = structlog.get_logger("berth.runtime.bundle")

ROOTFS = "rootfs"
CONFIG = "config.json"
LOG_FIFO = "log"
ADDRESS = "address"
SHIM_BINARY = "shim-binary-path"
#: where group directories of prepared shims live, under the plugin's state
PREPARED = ".prepared"
#: the annotation a group directory's config.json names its group with (containerd's)
GROUP_ANNOTATION = "io.containerd.runc.v2.group"


def _check_component(value: str, what: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise InvalidArgument(f"{what} {value!r}: must be a non-empty path component")


class Bundle:
    """One task's bundle directory; methods that touch the disk block (call them in a thread)."""

    def __init__(self, state: Path, namespace: str, container_id: str) -> None:
        _check_component(namespace, "namespace")
        _check_component(container_id, "container id")
        self.namespace = namespace
        self.id = container_id
        self.path = state / namespace / container_id

    def __repr__(self) -> str:
        return f"<Bundle {self.namespace}/{self.id}>"

    @property
    def rootfs(self) -> Path:
        return self.path / ROOTFS

    @property
    def log_fifo(self) -> Path:
        return self.path / LOG_FIFO

    def _make_dir(self, what: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            self.path.mkdir(mode=0o711)
        except FileExistsError:
            raise AlreadyExists(f"{what} {self.path}: already exists") from None

    def create(self, spec: bytes) -> None:
        """Make the directory, ``config.json``, ``rootfs/`` and the ``log`` FIFO; AlreadyExists if present."""
        self._make_dir("bundle")
        (self.path / CONFIG).write_bytes(spec)
        self.rootfs.mkdir(mode=0o711)
        os.mkfifo(self.log_fifo, 0o700)

    def create_group(self) -> None:
        """Make a group directory (module docstring): ``config.json`` naming ``self.id`` as the group."""
        self._make_dir("group directory")
        spec = json.dumps({"ociVersion": "1.0.2", "annotations": {GROUP_ANNOTATION: self.id}})
        (self.path / CONFIG).write_text(spec)

    def exists(self) -> bool:
        return (self.path / CONFIG).is_file()

    def read_address(self) -> str:
        """The shim address recorded at start ("" if none)."""
        try:
            return (self.path / ADDRESS).read_text().strip()
        except FileNotFoundError:
            return ""

    def write_address(self, address: str) -> None:
        _write_atomic(self.path / ADDRESS, address)

    def read_binary(self) -> str:
        try:
            return (self.path / SHIM_BINARY).read_text().strip()
        except FileNotFoundError:
            return ""

    def write_binary(self, binary: str) -> None:
        _write_atomic(self.path / SHIM_BINARY, binary)

    def write_shim(self, address: str, binary: str) -> None:
        """``address`` and ``shim-binary-path`` (one job for a worker thread)."""
        self.write_address(address)
        self.write_binary(binary)

    async def remove(self) -> None:
        """Unmount whatever is still mounted under the bundle, then delete it. Idempotent."""
        points = await asyncio.to_thread(mount_points_under, self.path)
        if points:
            log.warning("bundle.still_mounted", bundle=str(self.path), mounts=points)
            await unmount_all(self.rootfs, detach=True)
            if await asyncio.to_thread(mount_points_under, self.path):  # something else is mounted there
                await unmount_all(self.path, detach=True)
        await asyncio.to_thread(self._rmtree)

    def _rmtree(self) -> None:
        if mount_points_under(self.path):
            raise OSError(errno.EBUSY, f"bundle {self.path}: still has mounts, not removed")
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):  # the namespace dir goes with its last bundle
            self.path.parent.rmdir()


def walk(state: Path) -> Iterator[Bundle]:
    """Every bundle under ``state`` (a directory per namespace, one per task); blocking."""
    if not state.is_dir():
        return
    for ns_dir in sorted(state.iterdir()):
        if not ns_dir.is_dir() or ns_dir.name.startswith("."):  # .runc, .shim: not namespaces
            continue
        for task_dir in sorted(ns_dir.iterdir()):
            if task_dir.is_dir() and not task_dir.is_symlink():
                yield Bundle(state, ns_dir.name, task_dir.name)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LogReader:
    """Drains a bundle's ``log`` FIFO into berthd's log, so the shim never blocks writing it.

    The FIFO is opened O_RDWR|O_NONBLOCK: opening never waits for a writer,
    and holding a write end means no EOF when the shim restarts its writer.
    """

    def __init__(self, fifo: Path, *, namespace: str, shim: str) -> None:
        self._fifo = fifo
        self._log = log.bind(namespace=namespace, shim=shim)
        self._fd = -1
        self._buffer = b""

    def open(self) -> None:
        try:
            fd = os.open(self._fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            return
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > 65536:
            lines.append(self._buffer)
            self._buffer = b""
        for line in lines:
            if line.strip():
                self._log.debug("shim.log", line=line.decode(errors="replace"))

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
