"""The verbs of ``berth cri`` (parsers in :mod:`daemon.cli.commands.cri`).

Each verb takes the :class:`~daemon.cli.criclient.CriClient` and the parsed
arguments. The daemon's refusals propagate as ``GRPCError`` (one line, exit
1); verbs over several ids try every id, print one ``berth: ...`` line per
refusal and exit 1 at the end, as crictl does.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import betterproto
from grpclib.exceptions import GRPCError

from daemon.cli import criview as view
from daemon.cli import output
from daemon.cli.commands import CliError
from daemon.cli.criclient import CriClient, load_message
from daemon.cli.criio import events, exec_command, logs, stats, statsp
from protos.runtime import v1 as cri

Verb = Callable[[CriClient, argparse.Namespace], Awaitable[None]]


def _format(args: argparse.Namespace) -> str:
    chosen = getattr(args, "output", None)
    return str(chosen) if chosen else str(args.format)


async def each(ids: Sequence[str], kind: str, act: Callable[[str], Awaitable[object]], done: str) -> None:
    """``act`` on every id, printing ``done`` (with ``{id}``) for each; exit 1 after any refusal."""
    failed = False
    for item in ids:
        try:
            await act(item)
        except (GRPCError, CliError) as exc:
            failed = True
            why = output.status_text(exc) if isinstance(exc, GRPCError) else str(exc)
            print(f"berth: {kind} {item}: {why}", file=sys.stderr)
            continue
        print(done.format(id=item), flush=True)
    if failed:
        raise SystemExit(1)


# -- runtime ------------------------------------------------------------------------------


async def version(c: CriClient, args: argparse.Namespace) -> None:
    v = await c.rt.version(cri.VersionRequest(version="v1"))
    if args.format == "json":
        output.emit_json(view.message_json(v))
        return
    print(f"Version:  {v.version}")
    print(f"RuntimeName:  {v.runtime_name}")
    print(f"RuntimeVersion:  {v.runtime_version}")
    print(f"RuntimeApiVersion:  {v.runtime_api_version}")


async def info(c: CriClient, args: argparse.Namespace) -> None:
    resp = await c.rt.status(cri.StatusRequest(verbose=True))
    output.emit_json({"status": view.message_json(resp.status), **view.info_json(dict(resp.info))})


# -- pods ---------------------------------------------------------------------------------


def _newest(items: list[Any], args: argparse.Namespace) -> list[Any]:
    items.sort(key=lambda i: int(i.created_at), reverse=True)
    if args.latest:
        return items[:1]
    return items[: args.last] if args.last > 0 else items


async def pods(c: CriClient, args: argparse.Namespace) -> None:
    flt = cri.PodSandboxFilter(id=args.id, label_selector=dict(args.labels))
    if args.state:
        try:
            flt.state = cri.PodSandboxStateValue(state=view.parse_pod_state(args.state))
        except ValueError as exc:
            raise CliError(str(exc)) from None
    found = [
        p
        for p in await c.pods(flt)
        if (args.name is None or args.name.search(p.metadata.name))
        and (args.pod_namespace is None or args.pod_namespace.search(p.metadata.namespace))
    ]
    found = _newest(found, args)
    if _format(args) == "json":
        output.emit_json({"items": [view.message_json(p) for p in found]})
    elif args.quiet:
        for p in found:
            print(p.id)
    elif args.verbose:
        for p in found:
            _pod_verbose(p)
    else:
        rows = [
            [
                view.short_id(p.id, args.no_trunc),
                view.ago(p.created_at),
                view.pod_state(p.state),
                p.metadata.name,
                p.metadata.namespace,
                str(p.metadata.attempt),
                p.runtime_handler or "(default)",
            ]
            for p in found
        ]
        output.table(["POD ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT", "RUNTIME"], rows)


def _pod_verbose(p: cri.PodSandbox) -> None:
    print(f"ID: {p.id}\nName: {p.metadata.name}\nUID: {p.metadata.uid}")
    print(f"Namespace: {p.metadata.namespace}\nAttempt: {p.metadata.attempt}")
    print(f"Status: {p.state.name}\nCreated: {view.ago(p.created_at)}")
    for title, values in (("Labels", p.labels), ("Annotations", p.annotations)):
        if values:
            print(f"{title}:")
            for k, v in sorted(values.items()):
                print(f"\t{k} -> {v}")
    print()


async def runp(c: CriClient, args: argparse.Namespace) -> None:
    config = load_message(args.pod_config, cri.PodSandboxConfig, "pod config")
    print(await c.run_pod(config, args.runtime))


async def stopp(c: CriClient, args: argparse.Namespace) -> None:
    await each(args.ids, "pod", c.stop_pod, "Stopped sandbox {id}")


async def rmp(c: CriClient, args: argparse.Namespace) -> None:
    ids = list(args.ids)
    if args.all_:
        ids += [p.id for p in await c.pods() if p.id not in ids]
    elif not ids:
        raise CliError("rmp: no pod sandbox id given (or --all)")

    async def remove(pod_id: str) -> None:
        st = (await c.pod_status(pod_id)).status
        if st.state == cri.PodSandboxState.SANDBOX_READY:
            if not (args.force or args.all_):
                raise CliError("pod sandbox is ready: stop it first (stopp) or use --force")
            await c.stop_pod(st.id)
        await c.remove_pod(st.id)

    await each(ids, "pod", remove, "Removed sandbox {id}")


async def inspectp(c: CriClient, args: argparse.Namespace) -> None:
    for pod_id in args.ids:
        resp = await c.pod_status(pod_id, verbose=True)
        output.emit_json(
            {
                "status": view.message_json(resp.status),
                "info": view.info_json(dict(resp.info)),
                "containersStatuses": [view.message_json(s) for s in resp.containers_statuses],
            }
        )


# -- containers ---------------------------------------------------------------------------


async def _ensure_image(c: CriClient, ref: str, pod_config: cri.PodSandboxConfig) -> None:
    if not await c.has_image(ref):
        await c.pull(ref, pod_config=pod_config)


async def create(c: CriClient, args: argparse.Namespace) -> None:
    config = load_message(args.container_config, cri.ContainerConfig, "container config")
    pod_config = load_message(args.pod_config, cri.PodSandboxConfig, "pod config")
    if args.with_pull:
        await _ensure_image(c, config.image.image, pod_config)
    print(await c.create(args.pod_id, config, pod_config))


async def start(c: CriClient, args: argparse.Namespace) -> None:
    await each(args.ids, "container", c.start, "{id}")


async def run(c: CriClient, args: argparse.Namespace) -> None:
    """runp + create + start; the pod is taken down again if the container cannot be made to run."""
    config = load_message(args.container_config, cri.ContainerConfig, "container config")
    pod_config = load_message(args.pod_config, cri.PodSandboxConfig, "pod config")
    if args.with_pull:
        await _ensure_image(c, config.image.image, pod_config)
    pod_id = await c.run_pod(pod_config, args.runtime)
    try:
        cid = await c.create(pod_id, config, pod_config)
        await c.start(cid)
    except BaseException:
        try:
            await c.stop_pod(pod_id)
            await c.remove_pod(pod_id)
        except GRPCError as exc:
            print(f"berth: pod {pod_id}: left behind: {output.status_text(exc)}", file=sys.stderr)
        raise
    print(cid)


async def ps(c: CriClient, args: argparse.Namespace) -> None:
    flt = cri.ContainerFilter(id=args.id, pod_sandbox_id=args.pod, label_selector=dict(args.labels))
    if args.state:
        try:
            flt.state = cri.ContainerStateValue(state=view.parse_container_state(args.state))
        except ValueError as exc:
            raise CliError(str(exc)) from None
    elif not args.all_ and not args.id and not args.last and not args.latest:
        flt.state = cri.ContainerStateValue(state=cri.ContainerState.CONTAINER_RUNNING)
    found = [
        ct
        for ct in await c.containers(flt)
        if (args.name is None or args.name.search(ct.metadata.name))
        and (args.image is None or args.image.search(ct.image.image) or args.image.search(ct.image_ref))
    ]
    found = _newest(found, args)
    if _format(args) == "json":
        output.emit_json({"containers": [view.message_json(ct) for ct in found]})
        return
    if args.quiet:
        for ct in found:
            print(ct.id)
        return
    pod_names = {p.id: p.metadata.name for p in await c.pods()} if found else {}
    rows = []
    for ct in found:
        image = ct.image.image
        if image.startswith(view.DIGEST_PREFIX):
            image = view.short_id(image, args.no_trunc)
        rows.append(
            [
                view.short_id(ct.id, args.no_trunc),
                image,
                view.ago(ct.created_at),
                view.container_state(ct.state),
                ct.metadata.name,
                str(ct.metadata.attempt),
                view.short_id(ct.pod_sandbox_id, args.no_trunc),
                pod_names.get(ct.pod_sandbox_id, ""),
            ]
        )
    output.table(["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT", "POD ID", "POD"], rows)


async def stop(c: CriClient, args: argparse.Namespace) -> None:
    if args.grace < 0:
        raise CliError(f"stop: --timeout {args.grace}: must be 0 or more seconds")
    await each(args.ids, "container", lambda cid: c.stop(cid, args.grace), "{id}")


async def rm(c: CriClient, args: argparse.Namespace) -> None:
    ids = list(args.ids)
    if args.all_:
        ids += [ct.id for ct in await c.containers() if ct.id not in ids]
    elif not ids:
        raise CliError("rm: no container id given (or --all)")

    async def remove(cid: str) -> None:
        st = (await c.status(cid)).status
        if st.state == cri.ContainerState.CONTAINER_RUNNING:
            if not args.force:
                raise CliError("container is running: stop it first or use --force")
            await c.stop(st.id)
        await c.remove(st.id)

    await each(ids, "container", remove, "{id}")


async def inspect(c: CriClient, args: argparse.Namespace) -> None:
    for cid in args.ids:
        resp = await c.status(cid, verbose=True)
        output.emit_json({"status": view.message_json(resp.status), "info": view.info_json(dict(resp.info))})


# -- images -------------------------------------------------------------------------------


async def images(c: CriClient, args: argparse.Namespace) -> None:
    flt = cri.ImageFilter(image=cri.ImageSpec(image=args.ref)) if args.ref else cri.ImageFilter()
    found = list((await c.images.list_images(cri.ListImagesRequest(filter=flt))).images)
    found.sort(key=lambda i: (i.repo_tags[:1], i.id))
    if _format(args) == "json":
        output.emit_json({"images": [view.message_json(i) for i in found]})
        return
    if args.quiet:
        for i in found:
            print(i.id)
        return
    headers = ["IMAGE", "TAG", *(["DIGEST"] if args.digests else []), "IMAGE ID", "SIZE"]
    output.table(headers, [row for i in found for row in view.image_rows(i, args.digests, args.no_trunc)])


async def inspecti(c: CriClient, args: argparse.Namespace) -> None:
    for ref in args.refs:
        resp = await c.image_status(ref, verbose=True)
        if not betterproto.serialized_on_wire(resp.image):
            raise CliError(f"no such image {ref}")
        output.emit_json({"status": view.message_json(resp.image), "info": view.info_json(dict(resp.info))})


def _auth(args: argparse.Namespace) -> cri.AuthConfig | None:
    if args.creds and args.auth:
        raise CliError("pull: --creds and --auth: give one of them")
    if args.auth:
        try:
            text = base64.b64decode(args.auth, validate=True).decode()
        except ValueError:  # binascii.Error and UnicodeDecodeError alike
            text = ""
        if ":" not in text:
            raise CliError("pull: --auth: not base64 of USER:PASSWORD")
        return cri.AuthConfig(auth=args.auth)
    if args.creds:
        user, _, password = args.creds.partition(":")
        if not user:
            raise CliError(f"pull: --creds {args.creds!r}: expected USER[:PASSWORD]")
        return cri.AuthConfig(username=user, password=password)
    return None


async def pull(c: CriClient, args: argparse.Namespace) -> None:
    pod_config = (
        load_message(args.pod_config, cri.PodSandboxConfig, "pod config") if args.pod_config else None
    )
    ref = await c.pull(args.ref, _auth(args), pod_config)
    print(f"Image is up to date for {ref}")


async def rmi(c: CriClient, args: argparse.Namespace) -> None:
    refs = list(args.refs)
    if args.all_ or args.prune:
        listed = list((await c.images.list_images(cri.ListImagesRequest())).images)
        used: set[str] = set()
        if args.prune:
            for ct in await c.containers():
                used.update({ct.image_ref, ct.image_id, ct.image.image})
        refs += [i.id for i in listed if i.id not in used and i.id not in refs]
    elif not refs:
        raise CliError("rmi: no image given (or --all, --prune)")
    failed = False
    for ref in refs:
        try:
            status = (await c.image_status(ref)).image
            if not betterproto.serialized_on_wire(status):
                raise CliError("no such image")
            await c.images.remove_image(cri.RemoveImageRequest(image=cri.ImageSpec(image=status.id)))
        except (GRPCError, CliError) as exc:
            failed = True
            why = output.status_text(exc) if isinstance(exc, GRPCError) else str(exc)
            print(f"berth: image {ref}: {why}", file=sys.stderr)
            continue
        for name in status.repo_tags or status.repo_digests or [status.id]:
            print(f"Deleted: {name}")
    if failed:
        raise SystemExit(1)


async def imagefsinfo(c: CriClient, args: argparse.Namespace) -> None:
    resp = await c.images.image_fs_info(cri.ImageFsInfoRequest())
    output.emit_json({"status": view.message_json(resp)})


VERBS: dict[str, Verb] = {
    "version": version,
    "info": info,
    "pods": pods,
    "runp": runp,
    "stopp": stopp,
    "rmp": rmp,
    "inspectp": inspectp,
    "create": create,
    "start": start,
    "run": run,
    "ps": ps,
    "stop": stop,
    "rm": rm,
    "inspect": inspect,
    "logs": logs,
    "exec": exec_command,
    "images": images,
    "image": images,
    "img": images,
    "inspecti": inspecti,
    "pull": pull,
    "rmi": rmi,
    "imagefsinfo": imagefsinfo,
    "stats": stats,
    "statsp": statsp,
    "events": events,
}

__all__ = ["VERBS", "each"]
