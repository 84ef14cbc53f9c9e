"""Who a container runs as: the image's user string resolved against its own /etc/passwd and /etc/group.

The files are read from the container's rootfs, which the image author
controls, so they are opened with :func:`daemon.pathsafe.open_in_root`, the
scoped resolution the diff applier uses for layer paths: a symlink met on the
way is walked again from the rootfs, so ``/etc/passwd -> /etc/shadow`` means
the rootfs's shadow, and nothing resolves to the host's files. Only regular
files are read, and only so much of them (a FIFO or ``/dev/zero`` planted there cannot hang or exhaust us).

The semantics are containerd's ``WithUser``/``WithUserID``/``WithAdditionalGIDs``
(the OCI image spec's ``User`` forms ``user``, ``uid``, ``user:group``,
``uid:gid``, ``uid:group``, ``user:gid``): a name must exist; a bare uid that
the image does not list runs with gid 0; supplementary groups are the groups
listing the user by name, plus the primary gid (CVE-2023-25173).

The files need not be read from a mounted rootfs: a :class:`UserFiles`
holds them in memory (read from a snapshot's layers by
:mod:`daemon.oci.userfiles`) and is itself a "rootfs" for every function here
and for every option builder that passes one through (``daemon.oci.spec``,
the CRI's spec input), answering each lookup as the rootfs it came from would.

Blocking: reads files (a :class:`UserFiles` none); callers on the event loop use ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass, field

from daemon.errors import BerthError, FailedPrecondition, InvalidArgument, NotFound
from daemon.pathsafe import open_in_root

#: Largest passwd/group file read; anything bigger is refused, not truncated.
MAX_FILE_BYTES = 4 << 20
MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel


@dataclass(frozen=True)
class User:
    """A resolved user: what goes in the spec's ``process.user`` (and HOME)."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...] = field(default=())
    home: str = "/"
    name: str = ""


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


#: The files a lookup reads, as absolute paths in the rootfs.
USER_FILES = ("/etc/passwd", "/etc/group")

#: What a :class:`UserFiles` holds for one file: its bytes, None when absent, or the error reading it met.
FileState = bytes | BerthError | None


class UserFiles(str):
    """A rootfs's /etc/passwd and /etc/group held in memory: a rootfs for every lookup that takes one.

    A ``str`` (its value a label saying where the files came from, which
    messages name as the rootfs) so that every API taking a rootfs path takes
    it unchanged, with no copy written anywhere. Each file is its bytes, None
    when the rootfs has none, or the error reading it met, raised when (and
    only when) a lookup needs that file, as reading the rootfs would. String
    operations give plain strings: pass the object itself, never ``str(...)``
    of it.
    """

    files: dict[str, FileState]

    def __new__(cls, label: str, passwd: FileState, group: FileState) -> UserFiles:
        self = super().__new__(cls, label)
        self.files = {"/etc/passwd": passwd, "/etc/group": group}
        return self

    def __reduce__(self) -> tuple[type[UserFiles], tuple[str, FileState, FileState]]:
        return UserFiles, (str(self), self.files["/etc/passwd"], self.files["/etc/group"])

    @classmethod
    def from_root(cls, rootfs: str, label: str = "") -> UserFiles:
        """Both files of ``rootfs`` (read as :func:`read_in_root` does; errors kept for the lookup)."""
        if isinstance(rootfs, UserFiles):
            return rootfs
        label = label or rootfs
        states: list[FileState] = []
        for path in USER_FILES:
            try:
                states.append(_read_bytes(rootfs, path, label))
            except FailedPrecondition as exc:
                states.append(exc)
        return cls(label, states[0], states[1])

    def data(self, path: str) -> bytes | None:
        """The bytes of ``path`` (one of :data:`USER_FILES`), None when absent; the kept error otherwise."""
        key = posixpath.normpath("/" + path.lstrip("/"))
        if key not in self.files:
            raise ValueError(f"{path!r}: a UserFiles holds only {', '.join(USER_FILES)}")
        state = self.files[key]
        if isinstance(state, BerthError):
            raise type(state)(state.message)
        return state


def _read_bytes(root: str, path: str, label: str) -> bytes | None:
    try:
        fd = open_in_root(root, path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FailedPrecondition(f"rootfs {label!r}: {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FailedPrecondition(f"rootfs {label!r}: {path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise FailedPrecondition(f"rootfs {label!r}: {path}: larger than {MAX_FILE_BYTES} bytes")
        return os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)


def read_in_root(root: str, path: str) -> str | None:
    """The text of the regular file ``path`` inside ``root`` (a directory or a :class:`UserFiles`), or
    None when it does not exist."""
    data = root.data(path) if isinstance(root, UserFiles) else _read_bytes(root, path, root)
    return None if data is None else data.decode("utf-8", errors="replace")


def _parse_id(text: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def parse_passwd(text: str) -> list[PasswdEntry]:
    """``name:password:uid:gid:gecos:home:shell`` lines; malformed lines are skipped, as libc does."""
    entries = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 4:
            continue
        uid, gid = _parse_id(fields[2]), _parse_id(fields[3])
        if uid is None or gid is None:
            continue
        home = fields[5] if len(fields) > 5 and fields[5] else "/"
        entries.append(PasswdEntry(fields[0], uid, gid, home))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    """``name:password:gid:member,member`` lines; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 3:
            continue
        gid = _parse_id(fields[2])
        if gid is None:
            continue
        members = tuple(m for m in fields[3].split(",") if m) if len(fields) > 3 else ()
        entries.append(GroupEntry(fields[0], gid, members))
    return entries


def _passwd(rootfs: str) -> list[PasswdEntry] | None:
    text = read_in_root(rootfs, "/etc/passwd")
    return None if text is None else parse_passwd(text)


def _groups(rootfs: str) -> list[GroupEntry] | None:
    text = read_in_root(rootfs, "/etc/group")
    return None if text is None else parse_group(text)


def _user_by_name(rootfs: str, name: str, spec: str) -> PasswdEntry:
    entries = _passwd(rootfs)
    if entries is None:
        raise NotFound(f"user {spec!r}: rootfs {rootfs!r} has no /etc/passwd to look up {name!r}")
    for entry in entries:
        if entry.name == name:
            return entry
    raise NotFound(f"user {spec!r}: no user {name!r} in /etc/passwd of rootfs {rootfs!r}")


def _gid_by_name(rootfs: str, name: str, spec: str) -> int:
    entries = _groups(rootfs)
    if entries is None:
        raise NotFound(f"user {spec!r}: rootfs {rootfs!r} has no /etc/group to look up {name!r}")
    for entry in entries:
        if entry.name == name:
            return entry.gid
    raise NotFound(f"user {spec!r}: no group {name!r} in /etc/group of rootfs {rootfs!r}")


def _check_id(text: str, what: str, spec: str) -> int | None:
    """The id when ``text`` is numeric (a name otherwise); out-of-range numbers are an error."""
    if text.isascii() and text.isdigit():
        value = int(text)
        if value > MAX_ID:
            raise InvalidArgument(f"user {spec!r}: {what} {value} out of range (max {MAX_ID})")
        return value
    if not text:
        raise InvalidArgument(f"user {spec!r}: empty {what}")
    return None


def resolve_user(rootfs: str, spec: str) -> User:
    """Resolve an OCI image ``User`` string (``""`` is root) inside ``rootfs``.

    Raises NotFound naming the user and the rootfs when a *name* is not
    listed, InvalidArgument for a malformed string, FailedPrecondition when
    /etc/passwd or /etc/group cannot be read safely (symlink loop, not a
    regular file).
    """
    parts = spec.split(":") if spec else ["0"]
    if len(parts) > 2:
        raise InvalidArgument(f"user {spec!r}: expected user, uid, user:group or uid:gid")
    uid = _check_id(parts[0], "uid", spec)
    gid = _check_id(parts[1], "gid", spec) if len(parts) == 2 else None
    entry: PasswdEntry | None = None
    if uid is None:
        entry = _user_by_name(rootfs, parts[0], spec)
        uid = entry.uid
    else:
        entries = _passwd(rootfs) or []
        entry = next((e for e in entries if e.uid == uid), None)
    if len(parts) == 2:
        if gid is None:
            gid = _gid_by_name(rootfs, parts[1], spec)
    else:
        gid = entry.gid if entry is not None else 0
    home = entry.home if entry is not None else "/"
    name = entry.name if entry is not None else ""
    return User(uid, gid, additional_gids(rootfs, name, gid), home, name)


def additional_gids(rootfs: str, username: str, primary_gid: int) -> tuple[int, ...]:
    """The primary gid, then every group listing ``username`` as a member (rootfs's /etc/group).

    A user the image does not name (``username`` empty) gets only the
    primary gid. A group named like the user is not a *supplementary* group
    and is skipped (containerd's filter).
    """
    gids = [primary_gid]
    if username:
        for group in _groups(rootfs) or []:
            if group.name != username and username in group.members and group.gid not in gids:
                gids.append(group.gid)
    return tuple(gids)
