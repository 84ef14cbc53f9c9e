"""Plugin registry: registration rules, dependency order, failure isolation, shutdown order."""

from __future__ import annotations

import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import AlreadyExists, InvalidArgument, NotFound
from daemon.events import EventBus
from daemon.hookspecs import hookimpl
from daemon.metrics import MetricsRegistry
from daemon.registry import DaemonPaths, InitContext, PluginSkip, Registry, Status


def _module(name: str, register: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.berth_register = hookimpl(register)  # type: ignore[attr-defined]
    return mod


async def _init_all(reg: Registry, tmp_path: Path, configs: dict[str, Any] | None = None, **kw: Any) -> None:
    await reg.init_all(
        paths=DaemonPaths(root=tmp_path / "root", state=tmp_path / "state", address=str(tmp_path / "s")),
        configs=configs or {},
        bus=EventBus(),
        metrics=MetricsRegistry(),
        **kw,
    )


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    def plugin(self, name: str, fail: bool = False, skip: bool = False) -> Any:
        async def init(ic: InitContext) -> str:
            self.events.append(f"init {name}")
            if fail:
                raise RuntimeError(f"{name} broke")
            if skip:
                raise PluginSkip("no kernel support")

            async def close() -> None:
                self.events.append(f"close {name}")

            ic.on_close(close)
            return f"instance of {name}"

        return init


async def test_init_in_dependency_order_and_close_in_reverse(tmp_path: Path) -> None:
    rec = Recorder()

    def register(registry: Registry) -> None:
        # Registered deliberately out of order.
        registry.add(type="berth.grpc.v1", id="svc", init=rec.plugin("svc"), requires=["*"])
        registry.add(
            type="berth.snapshotter.v1", id="snap", init=rec.plugin("snap"), requires=["berth.metadata.v1"]
        )
        registry.add(type="berth.metadata.v1", id="db", init=rec.plugin("db"))

    reg = Registry()
    reg.register_module(_module("m", register))
    await _init_all(reg, tmp_path)
    assert rec.events == ["init db", "init snap", "init svc"]
    assert reg.instance("berth.snapshotter.v1") == "instance of snap"
    assert reg.instance("berth.metadata.v1.db") == "instance of db"
    assert (tmp_path / "root" / "berth.metadata.v1.db").is_dir()
    assert (tmp_path / "state" / "berth.metadata.v1.db").is_dir()
    errors = await reg.close_all()
    assert errors == []
    assert rec.events[3:] == ["close svc", "close snap", "close db"]


async def test_failure_is_recorded_and_dependents_skipped(tmp_path: Path) -> None:
    rec = Recorder()

    def register(registry: Registry) -> None:
        registry.add(type="berth.metadata.v1", id="db", init=rec.plugin("db", fail=True))
        registry.add(
            type="berth.content.v1", id="local", init=rec.plugin("local"), requires=["berth.metadata.v1"]
        )
        registry.add(
            type="berth.diff.v1", id="walk", init=rec.plugin("walk"), requires=["berth.content.v1.local"]
        )
        registry.add(type="berth.other.v1", id="fine", init=rec.plugin("fine"))
        registry.add(type="berth.snapshotter.v1", id="zfs", init=rec.plugin("zfs", skip=True))

    reg = Registry()
    reg.register_module(_module("m", register))
    await _init_all(reg, tmp_path)
    st = {s.full_name: s for s in reg.states()}
    assert st["berth.metadata.v1.db"].status is Status.ERROR
    assert "RuntimeError: db broke" in st["berth.metadata.v1.db"].error
    assert st["berth.content.v1.local"].status is Status.SKIP
    assert "berth.metadata.v1" in st["berth.content.v1.local"].error
    assert st["berth.diff.v1.walk"].status is Status.SKIP
    assert "berth.content.v1.local" in st["berth.diff.v1.walk"].error
    assert st["berth.other.v1.fine"].status is Status.OK
    assert st["berth.snapshotter.v1.zfs"].status is Status.SKIP
    assert st["berth.snapshotter.v1.zfs"].error == "no kernel support"
    assert "init local" not in rec.events and "init walk" not in rec.events
    with pytest.raises(NotFound):
        reg.instance("berth.metadata.v1")


async def test_missing_requirement_and_cycle_are_reported(tmp_path: Path) -> None:
    rec = Recorder()

    def register(registry: Registry) -> None:
        registry.add(type="berth.a.v1", id="a", init=rec.plugin("a"), requires=["berth.b.v1.b"])
        registry.add(type="berth.b.v1", id="b", init=rec.plugin("b"), requires=["berth.a.v1"])
        registry.add(type="berth.c.v1", id="c", init=rec.plugin("c"), requires=["berth.nothing.v1"])

    reg = Registry()
    reg.register_module(_module("m", register))
    await _init_all(reg, tmp_path)
    st = {s.full_name: s for s in reg.states()}
    assert st["berth.a.v1.a"].status is Status.ERROR
    assert "dependency cycle" in st["berth.a.v1.a"].error
    assert "berth.a.v1.a" in st["berth.a.v1.a"].error and "berth.b.v1.b" in st["berth.a.v1.a"].error
    assert st["berth.b.v1.b"].status is Status.ERROR
    assert st["berth.c.v1.c"].status is Status.SKIP
    assert st["berth.c.v1.c"].error == "requires berth.nothing.v1: no such plugin registered"
    assert rec.events == []


async def test_disabled_plugins_and_config_passed(tmp_path: Path) -> None:
    seen: list[Any] = []

    @dataclass
    class Cfg:
        size: int = 3

    async def init(ic: InitContext) -> None:
        seen.append(ic.config)

    def register(registry: Registry) -> None:
        registry.add(type="berth.x.v1", id="one", init=init, config=Cfg)
        registry.add(type="berth.x.v1", id="two", init=init, config=Cfg)

    reg = Registry()
    reg.register_module(_module("m", register))
    assert set(reg.schemas()) == {"berth.x.v1.one", "berth.x.v1.two"}
    await _init_all(reg, tmp_path, configs={"berth.x.v1.one": Cfg(7)}, disabled=["berth.x.v1.two"])
    assert seen == [Cfg(7)]
    assert reg.state("berth.x.v1.two").status is Status.SKIP
    assert "disabled" in reg.state("berth.x.v1.two").error


def test_registration_is_validated() -> None:
    async def init(ic: InitContext) -> None:
        return None

    def sync_init(ic: InitContext) -> None:
        return None

    reg = Registry()
    with pytest.raises(InvalidArgument, match="must look like berth"):
        reg.add(type="snapshotter", id="x", init=init)
    with pytest.raises(InvalidArgument, match=r"no '\.'"):
        reg.add(type="berth.x.v1", id="a.b", init=init)
    with pytest.raises(InvalidArgument, match="async"):
        reg.add(type="berth.x.v1", id="a", init=sync_init)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="dataclass"):
        reg.add(type="berth.x.v1", id="a", init=init, config=dict)
    reg.add(type="berth.x.v1", id="a", init=init)
    with pytest.raises(AlreadyExists, match="registered twice"):
        reg.add(type="berth.x.v1", id="a", init=init)


def test_broken_modules_are_recorded_not_fatal() -> None:
    def register(registry: Registry) -> None:
        raise ValueError("oops")

    reg = Registry()
    reg.register_module(_module("broken", register))
    reg.register_modules(["no_such_module_berth_test"])
    assert "berth_register failed: ValueError: oops" in reg.load_errors["broken"]
    assert "import failed" in reg.load_errors["no_such_module_berth_test"]


async def test_close_errors_are_collected_and_every_plugin_closed(tmp_path: Path) -> None:
    closed: list[str] = []

    def make(name: str, fail: bool) -> Any:
        async def init(ic: InitContext) -> None:
            async def close() -> None:
                closed.append(name)
                if fail:
                    raise OSError("disk gone")

            ic.on_close(close)

        return init

    def register(registry: Registry) -> None:
        registry.add(type="berth.a.v1", id="a", init=make("a", False))
        registry.add(type="berth.b.v1", id="b", init=make("b", True), requires=["berth.a.v1"])

    reg = Registry()
    reg.register_module(_module("m", register))
    await _init_all(reg, tmp_path)
    errors = await reg.close_all()
    assert closed == ["b", "a"]
    assert [(n, str(e)) for n, e in errors] == [("berth.b.v1.b", "disk gone")]
