"""Build one plugin, by full name, exactly as berthd would: for conformance suites and tests.

The plugin (and the plugins it ``requires``, transitively) is found through
the ``berth.plugins`` entry points, configured from a config file or the
defaults, and initialised by a :class:`daemon.registry.Registry` holding only
those plugins, on a root and state directory of the caller's choice. Nothing
else of the daemon starts: no gRPC server, no other plugin.

::

    async with plugin_instance("berth.snapshotter.v1.overlayfs", tmp_path) as sn:
        await sn.prepare("k", "")

A plugin that its init skips (:class:`daemon.registry.PluginSkip`, e.g. the
kernel lacks overlay) raises :class:`PluginSkipped`; one that fails raises
:class:`PluginFailed`, both with the registry's reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from daemon.config import load_config
from daemon.errors import FailedPrecondition, InvalidArgument, NotFound
from daemon.events import EventBus
from daemon.metrics import MetricsRegistry
from daemon.registry import ALL, DaemonPaths, Registration, Registry, Status


class PluginSkipped(FailedPrecondition):
    """The plugin's init declined to run here (the message says why)."""


class PluginFailed(FailedPrecondition):
    """The plugin (or a plugin it requires) failed to initialise."""


def _closure(registrations: list[Registration], full_name: str) -> list[Registration]:
    """``full_name`` and everything it requires, transitively (types expand to every plugin of the type)."""
    by_name = {r.full_name: r for r in registrations}
    if full_name not in by_name:
        known = ", ".join(sorted(by_name)) or "none"
        raise NotFound(f"plugin {full_name}: not registered (registered plugins: {known})")
    wanted: dict[str, Registration] = {}
    pending = [by_name[full_name]]
    while pending:
        reg = pending.pop()
        if reg.full_name in wanted:
            continue
        wanted[reg.full_name] = reg
        for req in reg.requires:
            if req == ALL:
                raise InvalidArgument(
                    f"plugin {reg.full_name}: requires every plugin ('*'); cannot run it alone"
                )
            if req in by_name:
                pending.append(by_name[req])
            else:
                pending.extend(r for r in registrations if r.type == req)
    return [r for r in registrations if r.full_name in wanted]  # registration order


@contextlib.asynccontextmanager
async def plugin_instance(
    full_name: str,
    base: Path,
    *,
    config_path: str | Path | None = None,
    registry: Registry | None = None,
) -> AsyncIterator[Any]:
    """The initialised instance of plugin ``full_name``, with root ``base/root`` and state ``base/state``.

    ``config_path`` is a berthd config.toml (its ``[plugins."..."]`` tables
    apply; None means defaults). ``registry`` is where the registrations come
    from (default: a new one loaded from the entry points). On exit every
    plugin started is closed, in reverse order.
    """
    source = registry
    if source is None:
        source = Registry()
        source.load_entrypoints()
    try:
        wanted = _closure(source.registrations, full_name)
    except NotFound as missing:
        broken = "; ".join(f"{name}: {why}" for name, why in sorted(source.load_errors.items()))
        hint = f"; packages that failed to load: {broken}" if broken else ""
        raise NotFound(missing.message + hint) from None
    reg = Registry()
    for r in wanted:
        reg.add(type=r.type, id=r.id, init=r.init, requires=r.requires, config=r.config)
    config = load_config(
        config_path, source.schemas(), plugin_names=[r.full_name for r in source.registrations]
    )
    paths = DaemonPaths(
        root=Path(base) / "root", state=Path(base) / "state", address=str(Path(base) / "unused.sock")
    )
    bus = EventBus()
    try:
        await reg.init_all(paths=paths, configs=config.plugins, bus=bus, metrics=MetricsRegistry())
        state = reg.state(full_name)
        if state.status is Status.SKIP:
            raise PluginSkipped(f"plugin {full_name} skipped: {state.error}")
        if state.status is not Status.OK:
            raise PluginFailed(f"plugin {full_name} failed: {state.error}")
        yield state.instance
    except BaseException:
        await reg.close_all()  # the first error is the one to report
        bus.close()
        raise
    errors = await reg.close_all()
    bus.close()
    if errors:
        name, exc = errors[0]
        raise PluginFailed(f"closing plugin {name}: {type(exc).__name__}: {exc}") from exc


def plugin_factory(full_name: str, *, config_path: str | Path | None = None) -> Callable[[Path], Any]:
    """A conformance-suite factory: ``root -> async context manager of the plugin's instance``.

    The plugin gets ``<root>/root/<full name>`` as its own root, as in berthd.
    """

    def factory(root: Path) -> contextlib.AbstractAsyncContextManager[Any]:
        return plugin_instance(full_name, root, config_path=config_path)

    return factory
