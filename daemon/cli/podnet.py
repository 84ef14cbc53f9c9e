"""The isolated pod network the demo, the benches and the tests write as a CNI conf list.

A Linux bridge with host-local addresses and nothing else: no gateway on the
bridge, no masquerade, no routes in the IPAM result, so pods reach each other
and nothing off the machine (the network-safety rule of the project).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def bridge_plugin(bridge: str, subnet: str, ipam_dir: Path) -> dict[str, Any]:
    """The ``bridge`` plugin entry; ``ipam_dir`` holds host-local's leases."""
    return {
        "type": "bridge",
        "bridge": bridge,
        "isGateway": False,
        "isDefaultGateway": False,
        "ipMasq": False,
        "hairpinMode": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": str(ipam_dir)},
    }


def conflist(name: str, bridge: str, subnet: str, ipam_dir: Path, *, portmap: bool = False) -> dict[str, Any]:
    """A CNI 1.0.0 conf list: :func:`bridge_plugin`, then ``portmap`` (hostPort, no SNAT) if asked."""
    plugins = [bridge_plugin(bridge, subnet, ipam_dir)]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": "1.0.0", "name": name, "plugins": plugins}
