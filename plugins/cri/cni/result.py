"""What a CNI ADD returns, parsed: interfaces, IPs, routes and DNS.

Results of spec 0.3.0 up to 1.x share one shape (0.3/0.4 add a ``version``
per IP, which is ignored); 0.1/0.2 results (``ip4``/``ip6``) are converted.
The raw JSON is kept as well: it is the ``prevResult`` the next plugin of a
chain gets, and what the cache stores for DEL and CHECK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from plugins.cri.cni.invoke import CniPluginError


@dataclass(frozen=True)
class Interface:
    """A link the plugins made; ``sandbox`` is the netns path when it lives in the pod."""

    name: str
    mac: str = ""
    sandbox: str = ""


@dataclass(frozen=True)
class IPConfig:
    """One address in CIDR form; ``interface`` indexes :attr:`CniResult.interfaces`."""

    address: str
    gateway: str = ""
    interface: int | None = None

    @property
    def ip(self) -> str:
        """The address without its prefix length."""
        return self.address.split("/", 1)[0]


@dataclass(frozen=True)
class Route:
    dst: str
    gw: str = ""


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class CniResult:
    """A network's ADD result; :attr:`pod_ip` is what CRI reports for the sandbox."""

    cni_version: str
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = DNS()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def pod_ips(self) -> list[str]:
        """The IPs on interfaces inside the sandbox, in result order.

        IPs that name no interface count too (plugins of old spec versions do
        not say), but only when no IP names a sandbox interface.
        """
        inside = [
            ip.ip
            for ip in self.ips
            if ip.interface is not None
            and 0 <= ip.interface < len(self.interfaces)
            and self.interfaces[ip.interface].sandbox
        ]
        return inside or [ip.ip for ip in self.ips if ip.interface is None]

    @property
    def pod_ip(self) -> str | None:
        """The first IP on an interface inside the sandbox; None if the network gave none."""
        ips = self.pod_ips
        return ips[0] if ips else None


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _legacy_ips(doc: dict[str, Any]) -> list[dict[str, Any]]:
    # 0.1.0/0.2.0: {"ip4": {"ip": "10.0.0.2/24", "gateway": ..., "routes": [...]}, "ip6": {...}}
    out: list[dict[str, Any]] = []
    for key in ("ip4", "ip6"):
        block = doc.get(key)
        if isinstance(block, dict) and isinstance(block.get("ip"), str):
            out.append({"address": block["ip"], "gateway": block.get("gateway", "")})
    return out


def parse_result(doc: Any, plugin: str) -> CniResult:
    """A :class:`CniResult` from a plugin's JSON output; CniPluginError naming ``plugin`` if malformed."""
    if not isinstance(doc, dict):
        raise CniPluginError(f"CNI plugin {plugin}: result is not a JSON object")
    try:
        interfaces = tuple(
            Interface(str(i["name"]), str(i.get("mac", "")), str(i.get("sandbox", "")))
            for i in doc.get("interfaces") or []
        )
        raw_ips = doc.get("ips")
        if raw_ips is None:
            raw_ips = _legacy_ips(doc)
        ips = tuple(
            IPConfig(
                str(ip["address"]),
                str(ip.get("gateway", "")),
                ip["interface"] if isinstance(ip.get("interface"), int) else None,
            )
            for ip in raw_ips
        )
        routes = tuple(Route(str(r["dst"]), str(r.get("gw", ""))) for r in doc.get("routes") or [])
        dns_doc = doc.get("dns") or {}
        dns = DNS(
            _strs(dns_doc.get("nameservers")),
            str(dns_doc.get("domain", "")),
            _strs(dns_doc.get("search")),
            _strs(dns_doc.get("options")),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise CniPluginError(f"CNI plugin {plugin}: malformed result: {exc!r}") from None
    return CniResult(str(doc.get("cniVersion", "")), interfaces, ips, routes, dns, doc)
