"""``berth images|snapshots|content|gc`` against a real berthd and Debian's docker-registry.

The CLI runs as a subprocess without a terminal, so pull prints its plain
one-line-per-change progress. Each daemon is stopped in the fixture, which
then checks that nothing stays mounted under its directories; registries
are the fixtures' (stopped by PID at teardown). The terminal rendering of
progress is checked in process at the end.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from daemon.cli.output import human_size
from daemon.cli.progress import PlainPrinter, TtyPrinter, bar, render
from daemon.mount import mount_points_under
from protos.berth.services.images.v1 import LayerProgress, PullProgress
from protos.containerd.types import Descriptor
from tests.integration.conftest import BIN, Berthd
from tests.support.oci import Image
from tests.support.push import push_image_sync
from tests.support.registry import PASSWORD, USER, Registry

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
GC_LATER = 'version = 1\n[plugins."berth.metadata.v1.sqlite"]\ngc_delay = 3600\n'


@pytest.fixture
async def daemon(make_berthd: Callable[..., Berthd]) -> AsyncIterator[Berthd]:
    """A berthd whose own collections wait an hour, so ``berth gc`` is what collects.

    Stopped here; then no mount may be left under its base.
    """
    d = make_berthd(config=GC_LATER).start()
    await d.wait_ready()
    yield d
    d.stop()
    assert mount_points_under(d.base) == []


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def fails(proc: subprocess.CompletedProcess[str], rc: int = 1) -> str:
    """The single error line of a failed command."""
    assert proc.returncode == rc, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("berth: "), proc.stderr
    return lines[0]


def berth_bytes(d: Berthd, *args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(
        [str(BIN / "berth"), "--address", d.address, *args], input=stdin, capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout


def push(registry: Registry, image: Image, tag: str = "1", **auth: str) -> str:
    push_image_sync(registry.url, "team/busybox", tag, image, auth.get("username"), auth.get("password"))
    return f"{registry.address}/team/busybox:{tag}"


def table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


async def test_pull_then_look_at_images_snapshots_and_content(
    daemon: Berthd, registry: Registry, busybox: Image
) -> None:
    ref = push(registry, busybox)
    m = busybox.manifest_for("linux/amd64")

    out = ok(daemon.berth("images", "pull", ref))
    lines = out.splitlines()
    assert "\x1b" not in out  # no terminal: no redrawing
    assert lines[0] == f"resolving {ref}"
    assert lines.index(f"fetching {ref}") < lines.index(f"unpacking {ref}")
    for name in (f"manifest-{m.manifest.digest}", f"config-{m.config.digest}"):
        assert lines.index(f"{name}: downloading") < lines.index(f"{name}: done")
    for layer in m.layers:
        name = f"layer-{layer.digest}"
        assert (
            lines.index(f"{name}: waiting") < lines.index(f"{name}: applying") < lines.index(f"{name}: done")
        )
    assert len(lines) == len(set(lines))  # one line per change, never a repeat
    assert lines[-2:] == [f"name:   {ref}", f"digest: {busybox.digest}"]

    size = m.manifest.size + sum(b.size for b in m.blobs().values())
    rows = table(ok(daemon.berth("images", "ls")))
    assert rows[0] == ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"]
    assert rows[1] == [ref, MANIFEST, busybox.digest, *human_size(size).split(), "linux/amd64", "-"]
    assert ok(daemon.berth("images", "ls", "-q")).split() == [ref]
    assert ok(daemon.berth("images", "ls", "-q", "name==nothing")).split() == []
    listed = json.loads(ok(daemon.berth("--format", "json", "images", "ls")))
    assert [(i["name"], i["target"]["digest"], i["size"], i["platforms"]) for i in listed] == [
        (ref, busybox.digest, size, ["linux/amd64"])
    ]

    info = json.loads(ok(daemon.berth("images", "inspect", ref)))
    assert info["image"]["name"] == ref and info["image"]["target"]["media_type"] == MANIFEST
    assert info["manifest"]["digest"] == m.manifest.digest
    assert info["manifest"]["content"] == json.loads(m.manifest.data)
    assert info["config"]["content"]["rootfs"]["diff_ids"] == m.diff_ids
    assert [c["chain_id"] for c in info["chain"]] == m.chain_ids
    assert [c["parent"] for c in info["chain"]] == ["", *m.chain_ids[:-1]]
    assert [c["layer"]["digest"] for c in info["chain"]] == [layer.digest for layer in m.layers]
    assert {c["snapshot"] for c in info["chain"]} == {"committed"} and info["unpacked"] is True

    c0, c1, c2 = m.chain_ids
    rows = table(ok(daemon.berth("snapshots", "ls")))
    assert rows[0] == ["KEY", "PARENT", "KIND"]
    assert sorted(rows[1:]) == sorted([[c0, "committed"], [c1, c0, "committed"], [c2, c1, "committed"]])
    assert ok(daemon.berth("snapshots", "--snapshotter", "overlayfs", "tree")).splitlines() == [
        c0,
        f"  \\_ {c1}",
        f"    \\_ {c2}",
    ]
    tree = json.loads(ok(daemon.berth("--format", "json", "snapshots", "tree")))
    assert [
        tree[0]["name"],
        tree[0]["children"][0]["name"],
        tree[0]["children"][0]["children"][0]["name"],
    ] == [
        c0,
        c1,
        c2,
    ]
    assert "native" in fails(daemon.berth("snapshots", "-s", "nosuch", "ls"))  # names what is loaded

    rows = table(ok(daemon.berth("content", "ls")))
    assert rows[0] == ["DIGEST", "SIZE", "AGE", "LABELS"]
    assert {r[0] for r in rows[1:]} == {m.manifest.digest, *m.blobs()}
    assert berth_bytes(daemon, "content", "get", m.manifest.digest) == m.manifest.data
    assert berth_bytes(daemon, "content", "get", m.config.digest) == m.config.data
    missing = fails(daemon.berth("content", "get", "sha256:" + "0" * 64))
    assert missing.startswith("berth: not found:")


async def test_export_import_remove_and_collect(
    daemon: Berthd, registry: Registry, busybox: Image, tmp_path: Path
) -> None:
    ref = push(registry, busybox)
    m = busybox.manifest_for("linux/amd64")
    ok(daemon.berth("images", "pull", ref))

    archive = tmp_path / "bb.tar"
    assert ok(daemon.berth("images", "export", str(archive), ref)) == ""
    assert [p.name for p in tmp_path.iterdir()] == ["bb.tar"]  # no partial file left beside it
    with tarfile.open(archive) as tf:
        index = json.loads(tf.extractfile("index.json").read())  # type: ignore[union-attr]
    assert [e["digest"] for e in index["manifests"]] == [busybox.digest]
    streamed = berth_bytes(daemon, "images", "export", "-", ref)
    with tarfile.open(fileobj=io.BytesIO(streamed)) as tf:
        assert {f"blobs/sha256/{d.removeprefix('sha256:')}" for d in busybox.blobs()} <= set(tf.getnames())

    rows = table(ok(daemon.berth("-n", "other", "images", "import", str(archive))))
    assert rows == [["REF", "DIGEST"], [ref, busybox.digest]]
    keys = {r[0] for r in table(ok(daemon.berth("-n", "other", "snapshots", "ls")))[1:]}
    assert keys == set(m.chain_ids)
    # from stdin, content only
    out = berth_bytes(
        daemon, "-n", "third", "--format", "json", "images", "import", "--no-unpack", "-", stdin=streamed
    )
    assert [i["name"] for i in json.loads(out)] == [ref]
    assert table(ok(daemon.berth("-n", "third", "snapshots", "ls")))[1:] == []

    failed = daemon.berth("images", "rm", "--sync", ref, "ghost")
    assert failed.returncode == 1 and failed.stdout.split() == [ref]
    assert failed.stderr.strip() == 'berth: image ghost: not found: image "ghost": not found'
    assert ok(daemon.berth("-n", "other", "images", "rm", "--sync", ref)).split() == [ref]
    assert ok(daemon.berth("-n", "third", "images", "rm", ref)).split() == [ref]

    # --sync collected at once what only those images held; the third namespace waits for `berth gc`
    assert table(ok(daemon.berth("content", "ls")))[1:] == []
    assert table(ok(daemon.berth("-n", "other", "snapshots", "ls")))[1:] == []
    assert len(table(ok(daemon.berth("-n", "third", "content", "ls")))[1:]) == len(busybox.blobs())
    freed = json.loads(ok(daemon.berth("--format", "json", "gc")))
    assert freed["content_removed"] == len(busybox.blobs()) and freed["errors"] == []
    assert freed["bytes_freed"] == sum(b.size for b in busybox.blobs().values())
    for ns in ("default", "other", "third"):
        assert ok(daemon.berth("-n", ns, "content", "ls", "-q")) == ""
        assert ok(daemon.berth("-n", ns, "images", "ls", "-q")) == ""
    blobs = daemon.root / "berth.content.v1.local" / "blobs"
    assert [p for p in blobs.rglob("*") if p.is_file()] == []
    again = ok(daemon.berth("gc")).splitlines()
    assert again[:4] == [
        "content removed:    0",
        "snapshots removed:  0",
        "leases expired:     0",
        "bytes freed:        0 B (0)",
    ]


async def test_errors_are_one_line(
    daemon: Berthd, registry: Registry, busybox: Image, tmp_path: Path
) -> None:
    ref = push(registry, busybox)
    missing = fails(daemon.berth("images", "pull", ref.replace(":1", ":no-such-tag")))
    assert missing.startswith("berth: not found:") and "no-such-tag" in missing
    assert "reference" in fails(daemon.berth("images", "pull", "Not A Ref"))
    assert "nosuch" in fails(daemon.berth("images", "pull", "--snapshotter", "nosuch", ref))
    assert "platform" in fails(daemon.berth("images", "inspect", "--platform", "a/b/c/d", ref))

    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is no archive\n" * 10000)
    assert fails(daemon.berth("images", "import", str(garbage))).startswith(
        "berth: invalid argument: archive"
    )
    assert "no such file" in fails(daemon.berth("images", "import", str(tmp_path / "absent.tar")))
    assert 'image "ghost"' in fails(daemon.berth("images", "export", str(tmp_path / "x.tar"), "ghost"))
    assert "no such directory" in fails(daemon.berth("images", "export", str(tmp_path / "a" / "x.tar"), ref))
    assert not (tmp_path / "x.tar").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["garbage.tar"]
    assert 'image "ghost"' in fails(daemon.berth("images", "inspect", "ghost"))
    assert "not found" in fails(daemon.berth("snapshots", "rm", "no-such-key"))

    down = subprocess.run(
        [str(BIN / "berth"), "--address", str(tmp_path / "none.sock"), "images", "ls"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode == 3 and "is berthd running?" in down.stderr


async def test_pull_with_basic_auth(daemon: Berthd, basic_registry: Registry, busybox: Image) -> None:
    ref = push(basic_registry, busybox, username=USER, password=PASSWORD)
    denied = fails(daemon.berth("images", "pull", ref))
    assert denied.startswith("berth: permission denied:") and "authentication required" in denied
    assert "no password" in fails(daemon.berth("images", "pull", "--user", USER, ref))  # stdin is no terminal
    out = json.loads(
        ok(daemon.berth("--format", "json", "images", "pull", "--user", f"{USER}:{PASSWORD}", ref))
    )
    assert (out["name"], out["target"]["digest"]) == (ref, busybox.digest)


# -- progress drawing, in process -----------------------------------------------------------


def message(phase: str, *layers: tuple[str, str, str, int, int]) -> PullProgress:
    return PullProgress(
        phase=phase,
        layers=[
            LayerProgress(
                descriptor=Descriptor(
                    digest=digest, size=total, annotations={"io.berth.progress.kind": kind}
                ),
                status=status,
                offset=offset,
                total=total,
            )
            for kind, digest, status, offset, total in layers
        ],
    )


D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def test_tty_printer_redraws_in_place() -> None:
    out = io.StringIO()
    printer = TtyPrinter("r:1", out, columns=80)
    printer.update(message("resolving", ("manifest", D1, "downloading", 0, 700)))
    first = out.getvalue()
    assert "\x1b[" not in first.split("\x1b[2K", 1)[0]  # nothing to move over yet
    printer.update(
        message("fetching", ("manifest", D1, "done", 700, 700), ("layer", D2, "downloading", 512, 2048))
    )
    second = out.getvalue()[len(first) :]
    assert second.startswith("\x1b[2F")  # back over the two lines drawn before
    lines = [line.removeprefix("\x1b[2K") for line in second.removeprefix("\x1b[2F").splitlines()]
    assert lines[0].startswith("fetching r:1")
    assert lines[1].startswith("manifest-sha256:111111111111 done")
    assert lines[2].startswith("layer-sha256:222222222222") and "512 B/2.0 KiB" in lines[2]
    assert all(len(line) <= 79 for line in lines)


def test_render_and_bar() -> None:
    assert bar(0, 100, 10) == "[          ]"
    assert bar(50, 100, 10) == "[====>     ]"
    assert bar(100, 100, 10) == "[==========]"
    assert bar(0, 0, 10) == "[==========]"
    wide = render("r", message("fetching", ("layer", D2, "downloading", 1, 3)), 1.25, columns=200)
    assert wide[0] == "fetching r   1.2s" and "[=========>" + " " * 20 + "]" in wide[1]


def test_plain_printer_prints_changes_only() -> None:
    out = io.StringIO()
    printer = PlainPrinter("r:1", out)
    printer.update(message("fetching", ("layer", D2, "downloading", 0, 10)))
    printer.update(message("fetching", ("layer", D2, "downloading", 5, 10)))
    printer.update(message("unpacking", ("layer", D2, "applying", 10, 10)))
    printer.update(message("done", ("layer", D2, "done", 10, 10)))
    assert out.getvalue().splitlines() == [
        "fetching r:1",
        f"layer-{D2}: downloading",
        "unpacking r:1",
        f"layer-{D2}: applying",
        f"layer-{D2}: done",
    ]
