"""``berth tasks``: ls, start, kill, exec, ps, pause, resume, metrics; as ``ctr tasks`` does them.

``start`` makes the task of an existing container and attaches to it like
``berth run`` (the spec's ``process.terminal`` decides the terminal);
``exec`` adds a process to a running task, its spec the container's process
with the given args. Both exit with the process's status. ``metrics``
decodes the cgroup statistics by their type URL (cgroups v1 or v2 Metrics)
and prints the memory, CPU and pids figures; a type this berth has no
module for is shown by its type URL.
"""

from __future__ import annotations

import argparse
import json
import signal
from typing import Any

import betterproto
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from daemon import typeurl
from daemon.cli import output
from daemon.cli.client import Client
from daemon.cli.commands import CliError, Handler
from daemon.cli.commands.run import attached, task_client
from daemon.cli.taskclient import PROCESS_TYPE_URL, SPEC_TYPE_URL, TaskClient, spec_any
from daemon.oci.spec import merge_env
from protos.containerd.services.tasks.v1 import CreateTaskRequest, ExecProcessRequest
from protos.containerd.types import Metric
from protos.containerd.v1.types import Process

#: What ``metrics`` prints for cgroups v1 and v2 (``ctr tasks metrics``'s rows): label, path in the message.
METRIC_ROWS: dict[str, tuple[tuple[str, str], ...]] = {
    "io.containerd.cgroups.v1.Metrics": (
        ("memory.usage_in_bytes", "memory.usage.usage"),
        ("memory.limit_in_bytes", "memory.usage.limit"),
        ("memory.stat.cache", "memory.total_cache"),
        ("cpuacct.usage", "cpu.usage.total"),
        ("cpuacct.usage_percpu", "cpu.usage.per_cpu"),
        ("pids.current", "pids.current"),
        ("pids.limit", "pids.limit"),
    ),
    "io.containerd.cgroups.v2.Metrics": (
        ("pids.current", "pids.current"),
        ("pids.limit", "pids.limit"),
        ("cpu.usage_usec", "cpu.usage_usec"),
        ("cpu.user_usec", "cpu.user_usec"),
        ("cpu.system_usec", "cpu.system_usec"),
        ("cpu.nr_periods", "cpu.nr_periods"),
        ("cpu.nr_throttled", "cpu.nr_throttled"),
        ("cpu.throttled_usec", "cpu.throttled_usec"),
        ("memory.usage", "memory.usage"),
        ("memory.usage_limit", "memory.usage_limit"),
        ("memory.swap_usage", "memory.swap_usage"),
        ("memory.swap_limit", "memory.swap_limit"),
    ),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Handler]:
    p = sub.add_parser("tasks", aliases=["task", "t"], help="tasks (running containers)")
    st = p.add_subparsers(dest="sub", required=True)
    st.add_parser("ls", aliases=["list"], help="list tasks: TASK PID STATUS")
    start = st.add_parser("start", help="start a container's task and attach to it")
    start.add_argument("--detach", "-d", action="store_true", help="start it and return (no stdio)")
    start.add_argument("id", metavar="ID")
    kill = st.add_parser("kill", help="signal a task (default SIGTERM)")
    kill.add_argument("--signal", "-s", default="SIGTERM", help="name (TERM, SIGKILL) or number")
    kill.add_argument("--all", "-a", action="store_true", help="every process of the task")
    kill.add_argument("--exec-id", default="", help="an exec process instead of the task")
    kill.add_argument("id", metavar="ID")
    ex = st.add_parser("exec", help="run another process in a task")
    ex.add_argument("--exec-id", required=True, help="the process's id within the task")
    ex.add_argument("--tty", "-t", action="store_true", help="allocate a terminal")
    ex.add_argument("--detach", "-d", action="store_true", help="start it and return (no stdio)")
    ex.add_argument("--cwd", default="", help="working directory (default: the container's)")
    ex.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="set (or, as K, unset) a variable"
    )
    ex.add_argument("id", metavar="ID")
    ex.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD")
    ps = st.add_parser("ps", help="processes of a task: PID INFO")
    ps.add_argument("id", metavar="ID")
    for name, what in (("pause", "freeze"), ("resume", "thaw")):
        st.add_parser(name, help=f"{what} a task").add_argument("id", metavar="ID")
    metrics = st.add_parser("metrics", aliases=["metric"], help="cgroup statistics of a task")
    metrics.add_argument("id", metavar="ID")
    return {"tasks": run, "task": run, "t": run}


async def run(c: Client, args: argparse.Namespace) -> None:
    rc = task_client(c)
    sub = {"list": "ls", "metric": "metrics"}.get(args.sub, args.sub)
    if sub == "ls":
        await _ls(rc, args)
    elif sub == "start":
        await _start(rc, args)
    elif sub == "kill":
        await rc.kill_task(args.id, parse_signal(args.signal), exec_id=args.exec_id, all_=args.all)
    elif sub == "exec":
        await _exec(rc, args)
    elif sub == "ps":
        await _ps(rc, args)
    elif sub == "pause":
        await rc.pause_task(args.id)
    elif sub == "resume":
        await rc.resume_task(args.id)
    elif sub == "metrics":
        await _metrics(rc, args)


def parse_signal(text: str) -> int:
    """``9``, ``KILL``, ``SIGKILL``, ``sigkill`` -> 9; CliError naming the value otherwise."""
    if text.isdigit():
        number = int(text)
        if not 0 < number < signal.NSIG:
            raise CliError(f"--signal {text}: out of range (1-{signal.NSIG - 1})")
        return number
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise CliError(f"--signal {text!r}: unknown signal") from None


def status_name(p: Process) -> str:
    return p.status.name if p.status.name else str(int(p.status))


async def _ls(rc: TaskClient, args: argparse.Namespace) -> None:
    tasks = sorted(await rc.list_tasks(), key=lambda t: t.id or t.container_id)
    rows = [{"task": t.id or t.container_id, "pid": t.pid, "status": status_name(t)} for t in tasks]
    if args.format == "json":
        output.emit_json(rows)
        return
    output.table(["TASK", "PID", "STATUS"], [[r["task"], str(r["pid"]), r["status"]] for r in rows])


def _container_spec(raw: Any) -> dict[str, Any]:
    if raw is None or raw.type_url != SPEC_TYPE_URL:
        raise CliError("container spec: not an OCI runtime spec")
    try:
        spec = json.loads(raw.value)
    except ValueError as exc:
        raise CliError(f"container spec: not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise CliError("container spec: not a JSON object")
    return spec


async def _start(rc: TaskClient, args: argparse.Namespace) -> None:
    container = await rc.get_container(args.id)
    spec = _container_spec(container.spec)
    tty = bool((spec.get("process") or {}).get("terminal"))
    if tty and args.detach:
        raise CliError(f"container {args.id!r} has a terminal: it cannot be started detached")

    async def create(fifos: Any) -> None:
        req = CreateTaskRequest(container_id=args.id, terminal=tty)
        if container.snapshot_key:
            req.rootfs = await rc.snapshot_mounts(container.snapshotter, container.snapshot_key)
        if fifos is not None:
            req.stdin, req.stdout, req.stderr = fifos.stdin, fifos.stdout, fifos.stderr
        await rc.create_task(req)

    async def delete() -> None:
        await rc.delete_task(args.id)

    code = await attached(rc, args.id, tty=tty, detach=args.detach, create=create, on_exit=delete)
    if code:
        raise SystemExit(code)


async def _exec(rc: TaskClient, args: argparse.Namespace) -> None:
    argv = args.args[1:] if args.args and args.args[0] == "--" else list(args.args)
    if not argv:
        raise CliError("exec: a command is required")
    if args.tty and args.detach:
        raise CliError("--tty and --detach cannot be used together (a detached process has no terminal)")
    if args.cwd and not args.cwd.startswith("/"):
        raise CliError(f"--cwd {args.cwd!r}: must be an absolute path")
    container = await rc.get_container(args.id)
    process = dict(_container_spec(container.spec).get("process") or {})
    process["args"] = argv
    process["terminal"] = args.tty
    if args.cwd:
        process["cwd"] = args.cwd
    if args.env:
        process["env"] = merge_env(process.get("env") or [], args.env)
    if args.tty:
        process["env"] = merge_env(process.get("env") or [], ["TERM=xterm"])
    doc = spec_any(json.dumps(process).encode(), PROCESS_TYPE_URL)

    async def create(fifos: Any) -> None:
        req = ExecProcessRequest(container_id=args.id, exec_id=args.exec_id, terminal=args.tty, spec=doc)
        if fifos is not None:
            req.stdin, req.stdout, req.stderr = fifos.stdin, fifos.stdout, fifos.stderr
        await rc.exec_process(req)

    async def delete() -> None:
        await rc.delete_process(args.id, args.exec_id)

    code = await attached(
        rc, args.id, exec_id=args.exec_id, tty=args.tty, detach=args.detach, create=create, on_exit=delete
    )
    if code:
        raise SystemExit(code)


async def _ps(rc: TaskClient, args: argparse.Namespace) -> None:
    processes = await rc.list_pids(args.id)
    rows: list[dict[str, Any]] = []
    for p in processes:
        info: Any = None
        if p.info is not None and p.info.type_url:
            decoded = typeurl.decode_any(p.info)
            info = (
                decoded.to_pydict(casing=betterproto.Casing.SNAKE)
                if decoded is not None
                else {"type_url": p.info.type_url}
            )
        rows.append({"pid": p.pid, "info": info})
    if args.format == "json":
        output.emit_json(rows)
        return
    output.table(["PID", "INFO"], [[str(r["pid"]), _info_text(r["info"])] for r in rows])


def _info_text(info: Any) -> str:
    if not info:
        return "-"
    if isinstance(info, dict) and set(info) == {"exec_id"}:
        return f"exec_id={info['exec_id']}"
    return json.dumps(info, sort_keys=True)


def pick(data: Any, path: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None where a part is missing."""
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def metric_rows(metric: Metric) -> tuple[str, dict[str, Any] | None, list[tuple[str, Any]]]:
    """(type url, decoded data or None, the rows ``ctr`` prints for that type)."""
    data = metric.data
    url = data.type_url if data is not None else ""
    decoded = typeurl.decode_any(data) if data is not None and url else None
    if decoded is None:
        return url, None, []
    values = decoded.to_pydict(casing=betterproto.Casing.SNAKE, include_default_values=True)
    name = url.rsplit("/", 1)[-1]
    rows = [(label, pick(values, path)) for label, path in METRIC_ROWS.get(name, ())]
    return url, values, [(label, value) for label, value in rows if value is not None]


async def _metrics(rc: TaskClient, args: argparse.Namespace) -> None:
    metrics = await rc.metrics([f"id=={args.id}"])
    if not metrics:
        raise GRPCError(Status.NOT_FOUND, f"task {args.id!r}: no metrics (no such task?)")
    if args.format == "json":
        out = []
        for m in metrics:
            url, values, _ = metric_rows(m)
            out.append({"id": m.id, "timestamp": output.timestamp(m.timestamp), "type": url, "data": values})
        output.emit_json(out)
        return
    for m in metrics:
        url, values, rows = metric_rows(m)
        output.table(["ID", "TIMESTAMP"], [[m.id, output.timestamp(m.timestamp) or "-"]])
        print()
        if values is None:
            print(f"metrics of type {url or '(none)'}: this berth cannot decode them")
            continue
        if not rows:
            print(f"metrics of type {url}: no memory, cpu or pids figures known for this type")
            continue
        output.table(["METRIC", "VALUE"], [[label, _value_text(v)] for label, v in rows])


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return "[" + " ".join(str(v) for v in value) + "]"
    return str(value)
