"""Keep a shim process lean: what the shim never uses is never imported.

Every shim is resident for its pod's lifetime, and a forked shim's RSS is the
zygote's heap, so each module the zygote imports costs every pod. Three
libraries come along uninvited and are kept out here, in shim processes only
(the zygote, an exec'd shim, the ``delete`` bootstrap), never in berthd:

* ``ssl`` (and ``_hashlib``): asyncio imports ssl when it can, main.py's
  hashlib prefers OpenSSL; together they map libssl and libcrypto (~2 MB
  private, ~4 MB of library pages). A shim speaks ttrpc on unix sockets only
  and hashes a few bytes with sha256, which hashlib then takes from its builtin
  implementation (same digests). Blocked by a ``None`` entry in sys.modules,
  which makes ``import ssl`` raise ImportError: asyncio copes (``ssl = None``).
* ``importlib.metadata`` (with email, zipfile, csv): betterproto's
  ``_version`` calls ``metadata.version("betterproto")`` at import. The same
  version is read from the name of betterproto's ``.dist-info`` directory.
* ``dateutil`` (with decimal, dateutil.tz): betterproto binds
  ``dateutil.parser.isoparse`` at import, for parsing JSON timestamps
  (``from_dict``), which the shim never does. betterproto gets a stand-in that
  imports the real function on first call; the stand-in module is removed from
  sys.modules right after betterproto's import, so a later ``import
  dateutil.parser`` gets the real package.

Call :func:`trim` first thing in a process that is only a shim, before
asyncio, hashlib or betterproto are imported (it does nothing to modules
already imported). ``python -m plugins.runtime.runc_v2.shim.lean zygote ARGS``
trims, then runs the zygote server.
"""

from __future__ import annotations

import os
import sys
import types
from datetime import datetime

#: Modules a shim never needs, kept out by a ``None`` entry in sys.modules.
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
    """betterproto's version from its ``.dist-info`` directory name (what importlib.metadata reads).

    Looked up beside the first ``betterproto`` package on sys.path, the one ``import`` finds.
    """
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
    """Import betterproto without importlib.metadata and dateutil (see the module's docstring)."""
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


def trim() -> None:
    """:func:`block_unused`, then :func:`import_betterproto`."""
    block_unused()
    import_betterproto()


def main(argv: list[str] | None = None) -> None:
    """``zygote ARGS...``: trim, then serve as the shim zygote."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "zygote":
        sys.exit("usage: python -m plugins.runtime.runc_v2.shim.lean zygote ARGS...")
    trim()
    from plugins.runtime.runc_v2.shim.zygote import server_main

    server_main(args[1:])


if __name__ == "__main__":
    main()
