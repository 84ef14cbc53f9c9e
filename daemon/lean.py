"""Processes that never need some of what asyncio and betterproto drag in, kept lean.

Two kinds of berth processes pay for every module they import: a ``berth``
command (a fresh interpreter each time: ``berth run`` end to end is mostly
Python start-up) and a shim (resident for its pod's life; a forked shim's RSS
is the zygote's heap). Libraries that come along uninvited are kept out here,
in those processes only, never in berthd:

* ``ssl`` (with ``_ssl``, ``_hashlib``): asyncio imports it when it can, but
  berth speaks to berthd over a unix socket only. Blocked with a ``None``
  entry in sys.modules (``import ssl`` raises ImportError; asyncio and grpclib
  cope, hashlib falls back to its builtin sha256, same digests). Not for
  commands that may reach beyond the daemon's socket (``berth cri``'s
  streaming verbs speak HTTP to the streaming server).
* ``importlib.metadata`` and ``dateutil``: betterproto's ``_version`` calls
  ``metadata.version("betterproto")`` at import and betterproto binds
  ``dateutil.parser.isoparse`` for JSON timestamps. The version is read from
  the name of betterproto's ``.dist-info`` directory instead, and betterproto
  gets a stand-in ``isoparse`` that imports dateutil on its first call; the
  stand-in module leaves sys.modules right after, so a later ``import
  dateutil.parser`` gets the real package.

The shim's entry point (``plugins.runtime.runc_v2.shim.lean``) uses the same
functions. Nothing here changes a module already imported: call :func:`trim`
before asyncio, hashlib or betterproto are imported.
"""

from __future__ import annotations

import os
import sys
import types
from datetime import datetime

#: What a process speaking only to unix sockets never needs (hashlib falls back to its builtin sha256).
BLOCKED = ("ssl", "_ssl", "_hashlib")


def block_unused() -> None:
    """Make ``import`` of :data:`BLOCKED` raise ImportError in this process (unless already imported)."""
    for name in BLOCKED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def _isoparse(value: str) -> datetime:
    """betterproto's ``isoparse``: dateutil's, imported on the first call."""
    from dateutil.parser import isoparse  # type: ignore[import-untyped]

    parsed: datetime = isoparse(value)
    return parsed


def _betterproto_version() -> str | None:
    """betterproto's version from its ``.dist-info`` directory name, beside the package ``import`` finds."""
    for entry in sys.path:
        site = entry or os.curdir
        if not os.path.isdir(os.path.join(site, "betterproto")):
            continue
        try:
            names = os.listdir(site)
        except OSError:
            return None
        for name in sorted(names):
            if name.startswith("betterproto-") and name.endswith(".dist-info"):
                return name[len("betterproto-") : -len(".dist-info")]
        return None
    return None


def import_betterproto() -> None:
    """Import betterproto without importlib.metadata and dateutil (see the module docstring)."""
    if "betterproto" in sys.modules:
        return
    added: list[str] = []
    version = _betterproto_version()
    if version is not None and "betterproto._version" not in sys.modules:
        module = types.ModuleType("betterproto._version")
        module.__version__ = version  # type: ignore[attr-defined]
        sys.modules["betterproto._version"] = module  # stays: it is what betterproto would have built
    if "dateutil.parser" not in sys.modules:
        stand_in = types.ModuleType("dateutil.parser")
        stand_in.isoparse = _isoparse  # type: ignore[attr-defined]
        sys.modules["dateutil.parser"] = stand_in
        added.append("dateutil.parser")
    try:
        import betterproto  # noqa: F401
    finally:
        for name in added:
            del sys.modules[name]


def trim(*, block_ssl: bool = True) -> None:
    """Keep ssl out (unless ``block_ssl`` is False), then import betterproto lean."""
    if block_ssl:
        block_unused()
    import_betterproto()


__all__ = ["BLOCKED", "block_unused", "import_betterproto", "trim"]
