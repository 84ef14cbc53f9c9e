"""The ``berth.diff.v1`` applier: a layer stream in, files in a snapshot out.

How one apply runs::

    event loop                       worker thread ("berth-diff-apply")
    ----------                       ---------------------------------
    stream.read(chunk) ─┐
    pipe.put(chunk)  ───┴─> Pipe ──> detect compression (magic bytes)
      (waits when full)              gunzip / unzstd, a bounded read at a time
                                     sha256 + size of the uncompressed tar
                                     tarfile "r|" -> Extractor -> Tree (fds)
    await result  <──────────────── Descriptor(diff id)

Memory per apply is bounded: at most ``queue_bytes`` of the raw stream wait
in the pipe (plus one chunk), the decompressors hand out at most a read's
worth (<= 256 KiB) at a time, the tar parser buffers 64 KiB and file data is
copied 1 MiB at a time: a few MiB in all, plus the zstd window the layer
declares (<= 128 MiB, usually 2-8 MiB). Nothing grows with the layer's size.

Where the layer goes is read from the mounts of the active snapshot, without
mounting anything: one ``overlay`` mount with ``upperdir=`` is written in its
upper dir (whiteouts in overlay form, the ``lowerdir=`` layers read to copy up
directories), one ``bind`` mount in its source directory (whiteouts delete).
Other mount types raise Unimplemented.

Errors: a bad media type, mounts, compression or tar is InvalidArgument
naming the layer digest (and the entry, when one is at fault); filesystem
failures are mapped by errno (:func:`plugins.diff.extract.os_error`). What
was written before a failure stays in the ACTIVE snapshot, which the caller
removes; committed snapshots are never written. An error of the stream itself
(``stream.read`` raised) propagates unchanged. Cancelling ``apply`` stops the
worker at its next read and waits for it, so nothing writes into the snapshot
once ``apply`` has returned or raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from daemon.protocols import ByteStream, Descriptor, Mount
from plugins.diff.decompress import (
    MEDIA_TYPE_LAYER_TAR,
    Compression,
    HashingReader,
    PeekSource,
    detect,
    media_type_hint,
    open_reader,
)
from plugins.diff.extract import Extractor
from plugins.diff.pipe import Pipe
from plugins.diff.secure import Tree

log = structlog.get_logger("berth.diff")

#: Bytes asked of the stream per read.
CHUNK_SIZE = 256 * 1024
#: Raw (usually compressed) bytes that may wait between the loop and the worker.
QUEUE_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class Target:
    """Where a layer is written: a directory, and how whiteouts are expressed there."""

    root: str
    #: overlay form: the lower layers (``lowerdir=``, top first), read-only
    lowers: tuple[str, ...] = ()
    #: True: overlay whiteouts in an upper dir; False: whiteouts delete
    overlay: bool = False


def target_for(mounts: Sequence[Mount]) -> Target:
    """The directory to extract into, from an active snapshot's mounts."""
    if not mounts:
        raise InvalidArgument("mounts: empty; a layer is applied onto the mounts of an active snapshot")
    if len(mounts) > 1:
        raise Unimplemented(f"mounts: {len(mounts)} mounts given; the tar applier takes exactly one")
    m = mounts[0]
    if m.type == "bind":
        if "ro" in m.options:
            raise FailedPrecondition(
                f"mount {m.source}: read-only bind mount (a view?); cannot apply a layer"
            )
        return Target(_absolute(m.source, "bind mount source"))
    if m.type == "overlay":
        upper = ""
        lowers: tuple[str, ...] = ()
        for opt in m.options:
            key, _, value = opt.partition("=")
            if key == "upperdir":
                upper = value
            elif key == "lowerdir":
                lowers = tuple(p for p in value.split(":") if p)
        if not upper:
            raise FailedPrecondition(
                "overlay mount without upperdir= is read-only (a view?); cannot apply a layer"
            )
        return Target(
            _absolute(upper, "overlay upperdir"),
            tuple(_absolute(p, "overlay lowerdir") for p in lowers),
            overlay=True,
        )
    raise Unimplemented(
        f"mount type {m.type!r}: the tar applier writes into bind and overlay (upperdir) mounts only; "
        "mounting other types is not supported yet"
    )


def _absolute(path: str, what: str) -> str:
    if not os.path.isabs(path):
        raise InvalidArgument(f"{what} {path!r}: must be an absolute path")
    return path


@dataclass(frozen=True)
class _Result:
    digest: str
    size: int
    entries: int


def _extract(pipe: Pipe, layer: str, hint: Compression | None, target: Target) -> _Result:
    """The worker: everything blocking of one apply."""
    try:
        raw = PeekSource(pipe)
        compression = detect(raw.peek(10), layer)
        if hint is not None and hint is not compression:
            log.info(
                "diff.compression_differs",
                layer=layer,
                media_type_says=hint.value,
                bytes_say=compression.value,
            )
        reader = HashingReader(open_reader(raw, compression, layer))
        try:
            tree = Tree(target.root, target.lowers, overlay=target.overlay)
        except FileNotFoundError:
            raise NotFound(f"snapshot directory {target.root}: not found") from None
        except OSError as exc:
            raise FailedPrecondition(f"snapshot directory {target.root}: {exc.strerror}") from None
        with tree:
            entries = Extractor(tree, layer).run(reader)
        reader.drain()
        return _Result(reader.digest(), reader.size, entries)
    except OSError as exc:  # outside any entry (entries map their own): the snapshot itself failed
        raise FailedPrecondition(f"layer {layer}: snapshot directory {target.root}: {exc}") from None
    finally:
        pipe.stop_reading()


class TarApplier:
    """Applies OCI/Docker layer tars (plain, gzip, zstd) onto bind or overlay mounts.

    ``chunk_size`` and ``queue_bytes`` bound what one apply holds of the raw
    stream (see the module docstring); the defaults suit registry pulls.
    """

    def __init__(self, *, chunk_size: int = CHUNK_SIZE, queue_bytes: int = QUEUE_BYTES) -> None:
        self.chunk_size = chunk_size
        self.queue_bytes = queue_bytes

    async def apply(self, desc: Descriptor, mounts: Sequence[Mount], stream: ByteStream) -> Descriptor:
        """Write the layer ``desc`` read from ``stream`` into ``mounts``; the uncompressed descriptor.

        The returned digest is the diff id (sha256 of the uncompressed tar,
        including its trailing padding); the caller checks it against the
        image config.
        """
        layer = desc.digest or "<no digest>"
        hint = media_type_hint(desc.media_type, layer)  # a known layer type; the bytes decide compression
        target = target_for(mounts)
        loop = asyncio.get_running_loop()
        pipe = Pipe(loop, self.queue_bytes)
        done: asyncio.Future[_Result] = loop.create_future()
        started = time.monotonic()

        def work() -> None:
            try:
                result = _extract(pipe, layer, hint, target)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                _settle_threadsafe(loop, done, None, exc)
            else:
                _settle_threadsafe(loop, done, result, None)

        ctx = contextvars.copy_context()  # logs from the worker keep the plugin's bindings
        threading.Thread(target=ctx.run, args=(work,), name="berth-diff-apply", daemon=True).start()
        try:
            try:
                while data := await stream.read(self.chunk_size):
                    if not await pipe.put(data):
                        break  # the worker stopped (failed): its error is the one to report
            except BaseException as exc:
                pipe.close(failure=f"layer stream failed: {type(exc).__name__}")
                raise
            pipe.close()
            result = await asyncio.shield(done)
        except BaseException:
            pipe.close(failure="apply cancelled or failed")
            if await _wait_worker(done):
                raise asyncio.CancelledError from None
            raise
        log.info(
            "diff.applied",
            layer=desc.digest,
            diff_id=result.digest,
            size=result.size,
            entries=result.entries,
            overlay=target.overlay,
            seconds=round(time.monotonic() - started, 3),
        )
        return Descriptor(media_type=MEDIA_TYPE_LAYER_TAR, digest=result.digest, size=result.size)


def _settle_threadsafe(
    loop: asyncio.AbstractEventLoop,
    fut: asyncio.Future[_Result],
    result: _Result | None,
    exc: BaseException | None,
) -> None:
    def settle() -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            assert result is not None
            fut.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody awaits the result
        loop.call_soon_threadsafe(settle)


async def _wait_worker(done: asyncio.Future[_Result]) -> bool:
    """Wait until the worker has stopped touching the snapshot; True if cancelled meanwhile."""
    cancelled = False
    while not done.done():
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException:  # noqa: BLE001 - the caller re-raises the first error
            break
    if not done.cancelled():
        done.exception()  # retrieved: the error reported is the caller's
    return cancelled
