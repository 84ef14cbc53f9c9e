"""``kill -9`` in the middle of writes leaves a consistent database that lost no commit.

A child process writes transactions in a loop; each one creates a lease with
its resources and bumps a counter label on the namespace, so a half-applied
transaction would show up as a lease without all its resources, or a lease
the counter does not account for. The child reports each commit on stdout
after ``write`` returned; the parent kills it with SIGKILL while it is still
writing, reopens the database and checks it. Several rounds run on the same
file, each child recovering what the previous one left.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from daemon.metadata import LeaseResource, MetadataStore

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "crash"
RESOURCES = 3
ROUNDS = 3
COMMITS_PER_ROUND = 15
DEADLINE_SECONDS = 30.0

CHILD = r"""
import asyncio, hashlib, pathlib, sys
import structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
from daemon.errors import NotFound
from daemon.metadata import LeaseResource, MetadataStore

NS, RESOURCES = sys.argv[3], int(sys.argv[4])
PAD = "p" * 3000  # several pages per transaction: the kill can land inside one

def digest(i, r):
    return "sha256:" + hashlib.sha256(f"{i}/{r}".encode()).hexdigest()

async def main(path, sync):
    store = await MetadataStore.open(pathlib.Path(path), synchronous=sync)

    def current(conn):
        try:
            return int(store.namespaces.get_tx(conn, NS).labels.get("commits", "0"))
        except NotFound:
            return 0

    n = await store.read(current)
    while True:
        n += 1

        def tx(conn, i=n):
            lease = f"lease-{i}"
            store.leases.create_tx(conn, NS, lease, {"seq": str(i), "pad": PAD})
            for r in range(RESOURCES):
                store.leases.add_resource_tx(conn, NS, lease, LeaseResource(id=digest(i, r), type="content"))
            store.namespaces.update_tx(conn, NS, {"commits": str(i)}, ["labels.commits"])

        await store.write(tx)
        sys.stdout.write(f"commit {n}\n")
        sys.stdout.flush()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _digest(i: int, r: int) -> str:
    return "sha256:" + hashlib.sha256(f"{i}/{r}".encode()).hexdigest()


def _kill_after(pid: int, delay: float) -> None:
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)  # our unreaped child: the pid cannot have been reused


async def _write_until_killed(db: Path, synchronous: str, commits: int) -> int:
    """Run a writer child, SIGKILL it after ``commits`` reported commits; return the last reported."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(db),
        synchronous,
        NAMESPACE,
        str(RESOURCES),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    loop = asyncio.get_running_loop()
    last = 0
    try:
        times: list[float] = []
        async with asyncio.timeout(DEADLINE_SECONDS):
            while len(times) < commits:
                line = await proc.stdout.readline()
                if not line:
                    err = (await proc.stderr.read()).decode(errors="replace")
                    pytest.fail(f"writer exited early (rc={await proc.wait()}):\n{err}")
                if line.startswith(b"commit "):
                    last = int(line.split()[1])
                    times.append(loop.time())
            # Killing right after a report would always hit the start of the next
            # transaction; a random delay of up to two commit intervals spreads the
            # kill over every point of the transactions. It is timed in a thread:
            # the event loop's timers have millisecond granularity and fire when
            # the next report wakes the loop, which would defeat the spreading.
            interval = (times[-1] - times[0]) / (len(times) - 1)
            await asyncio.to_thread(_kill_after, proc.pid, random.uniform(0, 2 * interval))
            await proc.wait()
            # Commits reported between our last read and the kill count too.
            for rest in (await proc.stdout.read()).splitlines():
                if rest.startswith(b"commit "):
                    last = int(rest.split()[1])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return last


async def _check(db: Path, reported: int) -> int:
    store = await MetadataStore.open(db)
    try:
        assert await store.read(lambda c: c.execute("PRAGMA integrity_check").fetchall()) == [("ok",)]
        assert await store.read(lambda c: c.execute("PRAGMA foreign_key_check").fetchall()) == []

        commits = int((await store.namespaces.get(NAMESPACE)).labels["commits"])
        assert commits >= reported, f"committed and reported {reported}, database has {commits}"

        leases = await store.leases.list(NAMESPACE)
        assert sorted(le.id for le in leases) == sorted(f"lease-{i}" for i in range(1, commits + 1))
        for le in leases:
            i = int(le.id.removeprefix("lease-"))
            assert le.labels["seq"] == str(i)

        def all_resources(conn: sqlite3.Connection) -> set[tuple[str, str]]:
            cur = conn.execute(
                "SELECT lease_id, id FROM lease_resources WHERE namespace = ? AND type = 'content'",
                (NAMESPACE,),
            )
            return set(cur.fetchall())

        expected = {(f"lease-{i}", _digest(i, r)) for i in range(1, commits + 1) for r in range(RESOURCES)}
        assert await store.read(all_resources) == expected
        return commits
    finally:
        await store.close()


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_kill_9_mid_write_loses_no_commit_and_shows_no_half_transaction(
    tmp_path: Path, synchronous: str
) -> None:
    db = tmp_path / "meta.db"
    total = 0
    for _ in range(ROUNDS):
        reported = await _write_until_killed(db, synchronous, COMMITS_PER_ROUND)
        assert reported >= total + COMMITS_PER_ROUND
        # The writer died with its connection open: recovery of the WAL is exercised.
        assert db.with_name("meta.db-wal").exists()
        total = await _check(db, reported)
    assert total >= ROUNDS * COMMITS_PER_ROUND
    store = await MetadataStore.open(db)
    try:
        held = await store.leases.list_resources(NAMESPACE, "lease-1")
        assert held == sorted(
            (LeaseResource(id=_digest(1, r), type="content") for r in range(RESOURCES)), key=lambda r: r.id
        )
    finally:
        await store.close()
