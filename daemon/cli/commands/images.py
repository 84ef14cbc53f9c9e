"""``berth images``: pull, ls, rm, import, export, inspect.

Pull, import and export run inside berthd (the Transfer service); the CLI
only streams bytes and draws progress. ``ls`` and ``inspect`` read the
image's documents through the Content service (:mod:`daemon.cli.imagetree`).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemon.cli import output
from daemon.cli.client import Client
from daemon.cli.commands import CliError, Handler, remove_each
from daemon.cli.imagetree import default_platform, default_snapshotter, read_tree
from daemon.cli.progress import PlainPrinter, Printer, TtyPrinter
from protos.berth.services.images.v1 import Auth, ImportChunk, PullRequest, StoredImage
from protos.containerd.services.images.v1 import Image as PbImage

#: Bytes per ImportChunk sent (grpclib accepts messages up to 4 MiB).
IMPORT_CHUNK = 1 << 20


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    images = sub.add_parser("images", aliases=["image", "i"], help="images").add_subparsers(
        dest="sub", required=True
    )
    pull = images.add_parser("pull", help="pull an image from a registry (inside berthd)")
    pull.add_argument("--platform", default="", help="os/arch[/variant] (default: the daemon's)")
    pull.add_argument(
        "--snapshotter", default="", help="unpack into this snapshotter (default: the daemon's)"
    )
    pull.add_argument("--user", "-u", default="", metavar="USER[:PASSWORD]", help="registry credentials")
    pull.add_argument("--no-unpack", action="store_true", help="fetch the content only")
    pull.add_argument("ref", metavar="REF")

    ls = images.add_parser("ls", aliases=["list"], help="list images")
    ls.add_argument("--quiet", "-q", action="store_true", help="names only")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help='containerd filters, e.g. name~="busybox"')

    rm = images.add_parser("rm", aliases=["remove", "delete"], help="remove images")
    rm.add_argument("--sync", action="store_true", help="collect what they held before returning")
    rm.add_argument("refs", nargs="+", metavar="REF")

    imp = images.add_parser("import", help="import an OCI layout or docker save tar (FILE or - for stdin)")
    imp.add_argument("--name", default="", help="name for an image the archive leaves unnamed")
    imp.add_argument("--snapshotter", default="", help="unpack into this snapshotter (default: the daemon's)")
    imp.add_argument("--no-unpack", action="store_true", help="store the content only")
    imp.add_argument("file", metavar="FILE|-")

    exp = images.add_parser("export", help="export images as an OCI layout tar (FILE or - for stdout)")
    exp.add_argument(
        "--platform", default="", help="os/arch[/variant] of index images (default: the daemon's)"
    )
    exp.add_argument("file", metavar="FILE|-")
    exp.add_argument("refs", nargs="+", metavar="REF")

    ins = images.add_parser("inspect", help="record, manifest, config and snapshot chain, as JSON")
    ins.add_argument("--platform", default="", help="os/arch[/variant] of an index (default: the daemon's)")
    ins.add_argument("--snapshotter", default="", help="where to look for the chain (default: the daemon's)")
    ins.add_argument("ref", metavar="REF")
    return {"images": run, "image": run, "i": run}


async def run(c: Client, args: argparse.Namespace) -> None:
    await {
        "pull": _pull,
        "ls": _ls,
        "list": _ls,
        "rm": _rm,
        "remove": _rm,
        "delete": _rm,
        "import": _import,
        "export": _export,
        "inspect": _inspect,
    }[args.sub](c, args)


def descriptor_json(d: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"media_type": d.media_type, "digest": d.digest, "size": d.size}
    if d.annotations:
        out["annotations"] = dict(d.annotations)
    return out


def image_json(image: PbImage | StoredImage) -> dict[str, Any]:
    return {
        "name": image.name,
        "target": descriptor_json(image.target),
        "labels": dict(image.labels),
        "created_at": output.timestamp(image.created_at),
        "updated_at": output.timestamp(image.updated_at),
    }


def _auth(user: str) -> Auth | None:
    if not user:
        return None
    name, sep, password = user.partition(":")
    if not name:
        raise CliError(f"--user {user!r}: expected USER[:PASSWORD]")
    if not sep:
        if not sys.stdin.isatty():
            raise CliError("--user: no password given (USER:PASSWORD), and stdin is no terminal to ask on")
        password = getpass.getpass(f"password for {name}: ")
    return Auth(username=name, password=password)


async def _pull(c: Client, args: argparse.Namespace) -> None:
    req = PullRequest(
        reference=args.ref,
        platform=args.platform,
        snapshotter=args.snapshotter,
        no_unpack=args.no_unpack,
    )
    auth = _auth(args.user)
    if auth is not None:
        req.auth = auth
    printer: Printer | None = None
    if args.format != "json":
        if sys.stdout.isatty():
            printer = TtyPrinter(args.ref, sys.stdout, shutil.get_terminal_size().columns)
        else:
            printer = PlainPrinter(args.ref, sys.stdout)
    image: StoredImage | None = None
    async for message in c.pull(req):
        if printer is not None:
            printer.update(message)
        if message.image is not None and message.image.name:
            image = message.image
    if printer is not None:
        printer.finish()
    if image is None:
        raise CliError(f"pull {args.ref}: the daemon ended the transfer without an image")
    if args.format == "json":
        output.emit_json(image_json(image))
    else:
        print(f"name:   {image.name}\ndigest: {image.target.digest}")


async def _ls(c: Client, args: argparse.Namespace) -> None:
    images = await c.list_images(args.filters)
    if args.quiet:
        for image in images:
            print(image.name)
        return
    platform = await default_platform(c)
    # Each image's documents are read over the socket; a few images at a time
    # so that a node with hundreds of images lists in seconds, not minutes.
    limit = asyncio.Semaphore(8)

    async def row(image: Any) -> dict[str, Any]:
        async with limit:
            tree = await read_tree(c, image, platform)
        return {**image_json(image), "size": tree.size, "platforms": tree.platforms}

    rows: list[dict[str, Any]] = list(await asyncio.gather(*(row(image) for image in images)))
    if args.format == "json":
        output.emit_json(rows)
        return
    output.table(
        ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"],
        [
            [
                r["name"],
                r["target"]["media_type"],
                r["target"]["digest"],
                output.human_size(r["size"]),
                ",".join(r["platforms"]) or "-",
                output.labels_text(r["labels"]) or "-",
            ]
            for r in rows
        ],
    )


async def _rm(c: Client, args: argparse.Namespace) -> None:
    await remove_each("image", args.refs, lambda ref: c.delete_image(ref, sync=args.sync))


def _open_input(name: str) -> IO[bytes]:
    if name == "-":
        return sys.stdin.buffer
    try:
        return open(name, "rb")
    except FileNotFoundError:
        raise CliError(f"import: {name}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"import: {name}: is a directory, not a tar file") from None
    except PermissionError:
        raise CliError(f"import: {name}: permission denied") from None


async def _import(c: Client, args: argparse.Namespace) -> None:
    f = _open_input(args.file)

    async def chunks() -> AsyncIterator[ImportChunk]:
        # The first chunk carries the options, even for an empty file (the daemon says what is wrong).
        data = await asyncio.to_thread(f.read, IMPORT_CHUNK)
        yield ImportChunk(data=data, name=args.name, snapshotter=args.snapshotter, no_unpack=args.no_unpack)
        while data:
            data = await asyncio.to_thread(f.read, IMPORT_CHUNK)
            if data:
                yield ImportChunk(data=data)

    try:
        images = await c.import_archive(chunks())
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    if args.format == "json":
        output.emit_json([image_json(i) for i in images])
        return
    output.table(["REF", "DIGEST"], [[i.name, i.target.digest] for i in images])


async def _export(c: Client, args: argparse.Namespace) -> None:
    if args.file == "-":
        if sys.stdout.isatty():
            raise CliError(
                "export: refusing to write a tar archive to a terminal (redirect stdout or name a FILE)"
            )
        out = sys.stdout.buffer
        async for data in c.export(args.refs, args.platform):
            await asyncio.to_thread(out.write, data)
        await asyncio.to_thread(out.flush)
        return
    path = Path(args.file)
    # Written beside the target and renamed at the end: a failed export leaves no half archive.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    f = await asyncio.to_thread(_open_output, path, tmp)
    try:
        with f:
            async for data in c.export(args.refs, args.platform):
                await asyncio.to_thread(f.write, data)
        await asyncio.to_thread(os.replace, tmp, path)
    finally:
        await asyncio.to_thread(tmp.unlink, missing_ok=True)


def _open_output(path: Path, tmp: Path) -> IO[bytes]:
    if path.is_dir():
        raise CliError(f"export: {path}: is a directory")
    try:
        return open(tmp, "wb")
    except FileNotFoundError:
        raise CliError(f"export: {path.parent}: no such directory") from None
    except PermissionError:
        raise CliError(f"export: {path.parent}: permission denied") from None


async def _inspect(c: Client, args: argparse.Namespace) -> None:
    platform = await default_platform(c, args.platform)
    record = await c.get_image(args.ref)
    snapshotter = await default_snapshotter(c, args.snapshotter)
    tree = await read_tree(c, record, platform)
    chain: list[dict[str, Any]] = []
    parent = ""
    for layer, diff_id, chain_id in zip(tree.layers, tree.diff_ids, tree.chain_ids, strict=False):
        try:
            info = await c.stat_snapshot(snapshotter, chain_id)
            kind: str | None = info.kind.name.lower() if info.kind.name else str(int(info.kind))
        except GRPCError as exc:
            if exc.status is not Status.NOT_FOUND:
                raise
            kind = None
        chain.append(
            {
                "chain_id": chain_id,
                "parent": parent,
                "diff_id": diff_id,
                "layer": descriptor_json_dict(layer),
                "snapshot": kind,
            }
        )
        parent = chain_id
    data: dict[str, Any] = {
        "image": image_json(record),
        "platform": str(platform),
        "platforms": tree.platforms,
        "size": tree.size,
        "index": tree.index,
        "manifest": {"digest": tree.manifest_digest, "content": tree.manifest}
        if tree.manifest_digest
        else None,
        "config": {"digest": tree.config_digest, "content": tree.config} if tree.config_digest else None,
        "snapshotter": snapshotter,
        "chain": chain,
        "unpacked": bool(chain) and all(link["snapshot"] == "committed" for link in chain),
    }
    output.emit_json(data)


def descriptor_json_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A descriptor of a manifest (JSON keys as the manifest spells them)."""
    out = {"media_type": d.get("mediaType", ""), "digest": d.get("digest", ""), "size": d.get("size", 0)}
    if d.get("annotations"):
        out["annotations"] = d["annotations"]
    return out
