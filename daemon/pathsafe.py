"""Paths resolved inside a root directory, never letting a symlink lead out of it.

A tree an image author controls (a snapshot being unpacked, a container's
rootfs) is walked from a directory fd held on its root, one component at a
time, with ``O_NOFOLLOW``: the kernel never follows a symlink for us. When a
component *is* a symlink, its target is read and walked the same way, absolute
targets restarting at the root and ``..`` stopping at it: the scoped resolution
of containerd's ``fs.RootPath`` (and of ``openat2(RESOLVE_IN_ROOT)``), so
``lib -> usr/lib`` works as images expect and ``evil -> /etc`` means
``<root>/etc``, never the host's.

:func:`walk` is the mechanism, generic over what a step opens (the diff
applier's steps also create and copy up directories); :func:`open_in_root` is
the plain read-only use of it. Both block (file system calls): callers on the
event loop use ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterable
from typing import TypeVar

#: Symlinks followed while resolving one path (Linux's MAXSYMLINKS).
MAX_SYMLINKS = 40
#: A directory component: never followed if it is a symlink.
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The last component, opened for reading: not followed, and a FIFO cannot block the open.
O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

N = TypeVar("N")
#: ``step(parent, name, last)``: the child node, a symlink's target (a str) to walk instead, or None
#: when the name is absent (the walk then yields None). ``last`` says no component follows.
Step = Callable[[N, str, bool], N | str | None]


def walk(root: N, parts: Iterable[str], step: Step[N], close: Callable[[N], None], what: str) -> N | None:
    """Resolve the components ``parts`` from ``root``, splicing in symlink targets as ``step`` reports them.

    Returns the node reached, which is ``root`` itself when the path names
    the root (the caller tells by identity; ``root`` stays the caller's),
    otherwise a node the caller must close; None when ``step`` found a name
    absent. Every other node opened on the way is closed, also on error.
    OSError(ELOOP), naming ``what``, after :data:`MAX_SYMLINKS` links.
    """
    stack = [root]
    todo = list(reversed(list(parts)))
    links = 0
    try:
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    close(stack.pop())
                continue
            last = all(part in ("", ".") for part in todo)
            nxt = step(stack[-1], name, last)
            if nxt is None:
                return None
            if not isinstance(nxt, str):
                stack.append(nxt)
                continue
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", what)
            if nxt.startswith("/"):
                while len(stack) > 1:
                    close(stack.pop())
            todo.extend(reversed(nxt.split("/")))
        return stack.pop() if len(stack) > 1 else root
    finally:
        for node in stack[1:]:
            close(node)


def _step_read(parent: int, name: str, last: bool) -> int | str:
    """Open ``name`` under ``parent`` (a directory unless it is the last component), or read its link."""
    try:
        return os.open(name, O_FILE if last else O_DIR, dir_fd=parent)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if not stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode):
            raise
        return os.readlink(name, dir_fd=parent)


def open_in_root(root: str, path: str) -> int:
    """An fd (O_RDONLY) on ``path`` resolved inside ``root``; symlinks never leave it.

    Raises FileNotFoundError when a component is missing, NotADirectoryError,
    and OSError(ELOOP) after :data:`MAX_SYMLINKS` links. The fd is the
    caller's to close.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = walk(root_fd, path.split("/"), _step_read, os.close, path)
        assert fd is not None  # _step_read raises rather than report a name absent
        return os.dup(root_fd) if fd == root_fd else fd
    finally:
        os.close(root_fd)
