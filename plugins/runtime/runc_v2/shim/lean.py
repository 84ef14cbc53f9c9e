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

The functions are :mod:`daemon.lean`'s (the ``berth`` CLI uses them too).
Call :func:`trim` first thing in a process that is only a shim, before
asyncio, hashlib or betterproto are imported (it does nothing to modules
already imported). ``python -m plugins.runtime.runc_v2.shim.lean zygote ARGS``
trims, then runs the zygote server.
"""

from __future__ import annotations

import sys

from daemon.lean import BLOCKED, block_unused, import_betterproto


def trim() -> None:
    """:func:`~daemon.lean.block_unused`, then :func:`~daemon.lean.import_betterproto`."""
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

__all__ = ["BLOCKED", "block_unused", "import_betterproto", "main", "trim"]
