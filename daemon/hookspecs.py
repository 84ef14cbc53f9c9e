"""The plugin contract of berth: pluggy hook specifications.

A berth plugin is any importable module (or object) that implements one or
more of the hooks below with ``@hookimpl``. It is found through the
entry-point group ``berth.plugins``; built-in plugins are found exactly the
same way, so whatever a built-in can do, a third-party package can too.

A minimal third-party snapshotter package declares in its ``pyproject.toml``::

    [project.entry-points."berth.plugins"]
    mysnap = "mysnap.plugin"

and ``mysnap/plugin.py`` holds::

    from dataclasses import dataclass, field
    from daemon.hookspecs import hookimpl
    from daemon.registry import InitContext, Registry

    @dataclass
    class MySnapConfig:
        root_path: str = field(default="", metadata={"doc": "where layers live"})

    async def init(ic: InitContext) -> "MySnapshotter":
        return MySnapshotter(ic.root, ic.config)

    @hookimpl
    def berth_register(registry: Registry) -> None:
        registry.add(
            type="berth.snapshotter.v1",
            id="mysnap",
            config=MySnapConfig,
            init=init,
        )

Its configuration lives in ``[plugins."berth.snapshotter.v1.mysnap"]`` of
config.toml and is validated against ``MySnapConfig`` before any plugin
starts. See :class:`daemon.registry.InitContext` for what ``init`` receives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from daemon.registry import Registry

PROJECT = "berth"
ENTRY_POINT_GROUP = "berth.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def berth_register(registry: Registry) -> None:
    """Declare the plugins this module provides.

    Called once per module at daemon start, before the configuration is
    validated (the registry needs every plugin's config dataclass to check
    config.toml). Call ``registry.add(...)`` once per plugin. Do no work here:
    no I/O, no threads, no event loop. Real work belongs in the ``init``
    coroutine passed to ``registry.add``, which runs later, in dependency
    order, with the validated config.

    ``registry.add`` arguments:

    * ``type``: a versioned plugin type such as ``berth.snapshotter.v1``.
    * ``id``: unique within the type; the plugin's full name is ``type.id``.
    * ``requires``: types (``berth.metadata.v1``) or full names
      (``berth.snapshotter.v1.overlayfs``) this plugin needs; ``"*"`` means
      every other plugin (used by the gRPC server). A missing requirement
      skips the plugin with a reason shown by ``berth plugins ls``.
    * ``config``: a dataclass whose fields (with ``metadata={"doc": ...}``)
      are the keys of the plugin's config table; ``None`` for no config.
    * ``init``: ``async def init(ic: InitContext) -> object``; the returned
      object is the plugin instance that dependents get from ``ic.get``.
      Raising :class:`daemon.registry.PluginSkip` marks the plugin skipped
      (not failed), e.g. when the host lacks a kernel feature.
    """
