"""CRI streaming: exec round trip and stream throughput through berth's streaming server.

Runs the server with the production TaskBackend over host processes
(``tests.support.streambackend.HostTasks``: the shim's stdio code, no runc), so
the figures are the server + protocol + FIFO path, not container start-up.
containerd's side is not measured yet (it needs a CRI pod in containerd).

* ``exec echo hi`` over SPDY (v4): median and p99 of the full round trip
  (token -> upgrade -> streams -> process -> status), ``--execs`` times;
* 100 MB through exec stdout (``head -c``) and through port-forward (a server in
  a pinned netns writing 100 MB), MB/s.

    .venv/bin/python -m bench.streaming [--execs N] [--mb N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from daemon.streaming import client
from plugins.cri import netns
from plugins.cri.config import CriConfig
from plugins.cri.streaming.backend import TaskBackend
from plugins.cri.streaming.server import StreamingServer
from protos.runtime import v1 as cri
from tests.support.streambackend import FakeRecords, HostTasks, add_container, add_sandbox, make_store

SOURCE = r"""
import socket, sys
size = int(sys.argv[1])
srv = socket.socket(); srv.bind(("127.0.0.1", 7000)); srv.listen(4)
print("ready", flush=True)
chunk = b"x" * (1 << 20)
while True:
    conn, _ = srv.accept()
    left = size
    while left > 0:
        n = conn.send(chunk[: min(left, len(chunk))]); left -= n
    conn.close()
"""


async def run(execs: int, mb: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="berth-bench-stream-"))
    tasks = HostTasks()
    records = FakeRecords()
    store = make_store(tmp / "cri", records)
    add_container(store, records, "c")
    server = StreamingServer(
        CriConfig(), TaskBackend(tasks.as_task_manager(), store, records.as_store(), tmp / "f")
    )
    await server.start()
    proc = None
    nsdir = tmp / "ns"
    figures: dict[str, float] = {}
    try:
        times = []
        for _ in range(execs):
            start = time.perf_counter()
            url = server.url(
                "exec", cri.ExecRequest(container_id="c", cmd=["echo", "hi"], stdout=True, stderr=True)
            )
            result = await client.run_command(url)
            times.append(time.perf_counter() - start)
            assert result.stdout == b"hi\n" and result.exit_code == 0
        times.sort()
        figures["exec_echo_median_ms"] = statistics.median(times) * 1000
        figures["exec_echo_p99_ms"] = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000

        size = mb << 20
        url = server.url(
            "exec", cri.ExecRequest(container_id="c", cmd=["head", "-c", str(size), "/dev/zero"], stdout=True)
        )
        start = time.perf_counter()
        cmd = await client.connect_command(url, stdout=True, stderr=False)
        got = 0
        while chunk := await cmd.read_stdout():
            got += len(chunk)
        await cmd.wait()
        await cmd.close()
        assert got == size, got
        figures["exec_stdout_MB_s"] = mb / (time.perf_counter() - start)

        path = str((await netns.create(nsdir, ["net"]))["net"])
        lo_up = ["nsenter", f"--net={path}", "ip", "link", "set", "lo", "up"]
        await asyncio.to_thread(subprocess.run, lo_up, check=True)
        script = tmp / "source.py"
        script.write_text(SOURCE)
        argv = ["nsenter", f"--net={path}", sys.executable, str(script), str(size)]
        proc = await asyncio.to_thread(subprocess.Popen, argv, stdout=subprocess.PIPE)
        assert proc.stdout is not None and await asyncio.to_thread(proc.stdout.readline) == b"ready\n"
        add_sandbox(store, "sb", path)
        url = server.url("portforward", cri.PortForwardRequest(pod_sandbox_id="sb", port=[7000]))
        start = time.perf_counter()
        async with await client.connect_portforward(url) as pf:
            conn = await pf.open(7000)
            got = 0
            while chunk := await conn.read():
                got += len(chunk)
        assert got == size, got
        figures["portforward_MB_s"] = mb / (time.perf_counter() - start)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        await server.stop()
        await tasks.shutdown()
        await netns.remove_all(nsdir, ["net"])
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = asyncio.run(run(args.execs, args.mb))
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:24} {value:10.2f}")


if __name__ == "__main__":
    main()
