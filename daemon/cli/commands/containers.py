"""``berth containers``: ls, info, rm; container records as ``ctr containers`` shows them.

``rm`` follows ``ctr``: a container whose task is stopped (or created and
never started) has that task deleted first; one with a live task (running,
paused) is refused; the container's snapshot is removed with it unless
``--keep-snapshot``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import betterproto.lib.google.protobuf as pb
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemon.cli import output
from daemon.cli.client import Client
from daemon.cli.commands import Handler, remove_each
from daemon.cli.commands.run import task_client
from daemon.cli.taskclient import SPEC_TYPE_URL, TaskClient
from protos.containerd.services.containers.v1 import Container
from protos.containerd.v1.types import Status as TaskStatus

#: Task states ``rm`` deletes on its way (``ctr``: Stopped or Created).
DELETABLE = frozenset({TaskStatus.STOPPED, TaskStatus.CREATED})


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    p = sub.add_parser("containers", aliases=["container", "c"], help="containers")
    sc = p.add_subparsers(dest="sub", required=True)
    ls = sc.add_parser("ls", aliases=["list"], help="list containers: CONTAINER IMAGE RUNTIME")
    ls.add_argument("--quiet", "-q", action="store_true", help="ids only")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. labels.app==web")
    info = sc.add_parser("info", help="a container record, its spec decoded, as JSON")
    info.add_argument("id", metavar="ID")
    rm = sc.add_parser("rm", aliases=["remove", "delete", "del"], help="delete containers (not running ones)")
    rm.add_argument("--keep-snapshot", action="store_true", help="keep the container's snapshot")
    rm.add_argument("ids", nargs="+", metavar="ID")
    return {"containers": run, "container": run, "c": run}


async def run(c: Client, args: argparse.Namespace) -> None:
    rc = task_client(c)
    if args.sub in ("ls", "list"):
        await _ls(rc, args)
    elif args.sub == "info":
        output.emit_json(container_json(await rc.get_container(args.id)))
    else:
        await remove_each("container", args.ids, lambda cid: delete_container(rc, cid, args.keep_snapshot))


def any_json(value: pb.Any | None) -> dict[str, Any] | None:
    if value is None or (not value.type_url and not value.value):
        return None
    return output.decode_any(value)  # type: ignore[no-any-return]


def spec_json(value: pb.Any | None) -> Any:
    """The OCI spec of a container (JSON in an Any), or what is known of an Any of another type."""
    if value is None or (not value.type_url and not value.value):
        return None
    if value.type_url == SPEC_TYPE_URL:
        try:
            return json.loads(value.value)
        except ValueError:
            pass
    return {"type_url": value.type_url, "size": len(value.value)}


def container_json(c: Container) -> dict[str, Any]:
    return {
        "id": c.id,
        "labels": dict(c.labels),
        "image": c.image,
        "runtime": {
            "name": c.runtime.name if c.runtime else "",
            "options": any_json(c.runtime.options) if c.runtime else None,
        },
        "snapshotter": c.snapshotter,
        "snapshot_key": c.snapshot_key,
        "created_at": output.timestamp(c.created_at),
        "updated_at": output.timestamp(c.updated_at),
        "extensions": {k: any_json(v) for k, v in c.extensions.items()},
        "sandbox": c.sandbox,
        "spec": spec_json(c.spec),
    }


async def _ls(rc: TaskClient, args: argparse.Namespace) -> None:
    containers = sorted(await rc.list_containers(args.filters), key=lambda c: c.id)
    if args.quiet:
        for c in containers:
            print(c.id)
    elif args.format == "json":
        output.emit_json([container_json(c) for c in containers])
    else:
        output.table(
            ["CONTAINER", "IMAGE", "RUNTIME"],
            [[c.id, c.image or "-", c.runtime.name if c.runtime else "-"] for c in containers],
        )


async def delete_container(rc: TaskClient, container_id: str, keep_snapshot: bool = False) -> None:
    """``ctr containers rm``: the stopped task, then the record, then (unless kept) the snapshot."""
    container = await rc.get_container(container_id)
    try:
        task = await rc.get_task(container_id)
    except GRPCError as exc:
        if exc.status is not Status.NOT_FOUND:
            raise
    else:
        if task.status not in DELETABLE:
            state = task.status.name.lower() if task.status.name else str(int(task.status))
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                f"cannot delete a container whose task is {state} "
                f"(kill it first: berth tasks kill {container_id})",
            )
        await rc.delete_task(container_id)
    await rc.delete_container(container_id)
    if not keep_snapshot and container.snapshot_key and container.snapshotter:
        try:
            await rc.remove_snapshot(container.snapshotter, container.snapshot_key)
        except GRPCError as exc:
            if exc.status is not Status.NOT_FOUND:
                raise
