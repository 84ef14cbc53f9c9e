"""Where a registry host's content is fetched from: its endpoints, in order.

containerd's model (``remotes/docker/config``): a registry host such as
``docker.io`` or ``127.0.0.1:5000`` (the first component of an image name)
maps to an ordered list of :class:`Endpoint` s, mirrors first and the
registry's own server last, each with the capabilities it is trusted with
(``pull``, ``resolve``, ``push``) and its own TLS settings. A request is
tried on each endpoint with the needed capability, in order.

The list comes from, first match wins:

1. the images plugin's ``hosts."<host>"`` table in config.toml, if it sets an
   endpoint key (:meth:`HostConfig.defines_endpoints`);
2. containerd's hosts directory (``config_path``):
   ``<dir>/<host>_<port>_/hosts.toml``, ``<dir>/<host>:<port>/hosts.toml``,
   then ``<dir>/_default/hosts.toml``; a host directory without hosts.toml
   falls back to docker's certs.d files (``*.crt`` CAs, ``*.cert`` + ``*.key``
   client pairs);
3. the default: ``https://<host>/v2``, plain HTTP for loopback hosts
   (``localhost``, 127.0.0.0/8, ``::1``, as containerd does), and
   ``https://registry-1.docker.io/v2`` for ``docker.io``.

A hosts.toml is checked strictly: an unknown key or a wrong type is an
InvalidArgument naming the file, the key and its line (containerd would log
it and ignore the file, which hides the mistake). Credentials are never in
hosts.toml; they come from config.toml by the host an endpoint points at.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from daemon.configschema import INVALID, Problem, build
from daemon.errors import InvalidArgument
from daemon.protocols import RegistryCredentials
from daemon.tomlsource import format_path, key_lines
from plugins.images.registry.config import CAPABILITIES, HostConfig, is_registry_host, url_problem

log = structlog.get_logger("berth.images.registry")

DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "registry-1.docker.io"
HOSTS_FILE = "hosts.toml"
DEFAULT_DIR = "_default"
ALL_CAPABILITIES = frozenset(CAPABILITIES)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


@dataclass(frozen=True)
class Credentials(RegistryCredentials):
    """Registry credentials (the core's shape), read from the hosts configuration here."""

    @classmethod
    def from_host_config(cls, entry: HostConfig) -> Credentials | None:
        username, password = entry.username, entry.password
        if entry.auth:
            username, _, password = base64.b64decode(entry.auth).decode().partition(":")
        creds = cls(username, password, entry.identity_token, entry.registry_token)
        return creds or None


@dataclass(frozen=True)
class Endpoint:
    """One place to send requests for a registry host's repositories."""

    scheme: str
    host: str
    path: str = "/v2"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    skip_verify: bool = False
    ca_files: tuple[str, ...] = ()
    #: (certificate, key) PEM files; an empty key means the certificate file holds it
    client_pairs: tuple[tuple[str, str], ...] = ()
    header: tuple[tuple[str, str], ...] = ()
    proxy: str = ""
    dial_timeout: float | None = None
    #: another host than the registry's: requests carry ``?ns=<registry host>``
    mirror: bool = False
    credentials: RegistryCredentials | None = None
    #: where this endpoint was configured, for messages
    origin: str = "default"

    @property
    def url(self) -> str:
        """The API root, e.g. ``https://mirror.example.com/v2``."""
        return f"{self.scheme}://{self.host}{self.path}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ``::1``, with or without a port."""
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_mirror(endpoint_host: str, registry_host: str) -> bool:
    """Whether requests to ``endpoint_host`` must name the registry (containerd's ``?ns=``)."""
    if registry_host == DOCKER_HUB and endpoint_host == DOCKER_HUB_SERVER:
        return False
    return endpoint_host != registry_host


def default_server(registry_host: str) -> Endpoint:
    """The registry's own endpoint when nothing configures it."""
    if registry_host == DOCKER_HUB:
        return Endpoint("https", DOCKER_HUB_SERVER)
    return Endpoint("http" if is_loopback(registry_host) else "https", registry_host)


def parse_duration(text: str) -> float:
    """A Go duration (``"1s"``, ``"1m30s"``, ``"500ms"``) in seconds; ValueError if it is none."""
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f'invalid duration {text!r} (expected e.g. "1s", "500ms", "1m30s")')
    return total


# -- hosts.toml -----------------------------------------------------------------------


@dataclass
class _HostSection:
    """The keys of a ``[host."..."]`` table (and of the file's top level)."""

    capabilities: list[str] = field(default_factory=list)
    ca: str | list[str] = ""
    client: str | list[str | list[str]] = ""
    skip_verify: bool | None = None
    header: dict[str, str | list[str]] = field(default_factory=dict)
    override_path: bool = False
    dial_timeout: str = ""
    proxy: str = ""


@dataclass
class _HostsFile(_HostSection):
    server: str = ""
    host: dict[str, _HostSection] = field(default_factory=dict)


class _FileProblems:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = key_lines(text)
        self.found: list[str] = []

    def add(self, key: tuple[str | int, ...], message: str) -> None:
        line = 0
        for size in range(len(key), 0, -1):
            line = self.lines.get(key[:size], 0)
            if line:
                break
        where = f"{self.path}:{line}" if line else str(self.path)
        self.found.append(f"{format_path(key)}: {message} ({where})" if key else f"{message} ({where})")

    def raise_if_any(self) -> None:
        if self.found:
            raise InvalidArgument("invalid hosts.toml: " + "; ".join(self.found))


def parse_hosts_file(text: str, path: Path, registry_host: str) -> list[Endpoint]:
    """The endpoints a hosts.toml gives ``registry_host``: its ``[host]`` tables in order, then the server.

    Relative paths (``ca``, ``client``) are relative to the file's directory.
    Raises InvalidArgument naming the file, the key and the line of every problem.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"invalid hosts.toml: {exc} ({path})") from None
    problems = _FileProblems(path, text)
    found: list[Problem] = []
    parsed = build(_HostsFile, data, (), found)
    for p in found:
        problems.add(p.path, p.message)
    problems.raise_if_any()
    assert parsed is not INVALID
    base = path.parent
    endpoints = [
        _section_endpoint(url, section, ("host", url), ("host", url), problems, registry_host, base)
        for url, section in parsed.host.items()
    ]
    # the registry's own server last, with the file's top-level settings
    server = _section_endpoint(parsed.server, parsed, ("server",), (), problems, registry_host, base)
    problems.raise_if_any()
    return [*endpoints, server]


def _section_endpoint(
    url: str,
    section: _HostSection,
    url_key: tuple[str, ...],
    key: tuple[str, ...],
    problems: _FileProblems,
    registry_host: str,
    base: Path,
) -> Endpoint:
    """One endpoint of a hosts.toml; ``url`` "" is the registry's default server."""
    if not url:
        default = default_server(registry_host)
        scheme, host, api_path = default.scheme, default.host, default.path
    else:
        # as containerd: a URL without scheme is an https one
        full = url if "://" in url else "https://" + url
        problem = url_problem(full, scheme_optional=False)
        if problem:
            problems.add(url_key, problem)
            return Endpoint("https", registry_host)
        parts = urlsplit(full)
        scheme, host = parts.scheme, parts.netloc
        api_path = os.path.normpath(parts.path) if parts.path not in ("", "/") else ""
        if not section.override_path and not api_path.endswith("/v2"):
            api_path += "/v2"
    caps: set[str] = set()
    for i, cap in enumerate(section.capabilities):
        if cap.lower() not in CAPABILITIES:
            problems.add(
                (*key, "capabilities", i), f"unknown capability {cap!r} (expected {', '.join(CAPABILITIES)})"
            )
        caps.add(cap.lower())
    ca = [section.ca] if isinstance(section.ca, str) else list(section.ca)
    clients: list[tuple[str, str]] = []
    for i, item in enumerate([section.client] if isinstance(section.client, str) else section.client):
        if isinstance(item, str):
            clients.append((item, ""))
        elif len(item) == 2:
            clients.append((item[0], item[1]))
        else:
            problems.add((*key, "client", i), "expected a [certificate, key] pair of paths")
    header = tuple(
        (name, value)
        for name, values in section.header.items()
        for value in ([values] if isinstance(values, str) else values)
    )
    dial: float | None = None
    if section.dial_timeout:
        try:
            dial = parse_duration(section.dial_timeout)
        except ValueError as exc:
            problems.add((*key, "dial_timeout"), str(exc))
    if section.proxy and (problem := url_problem(section.proxy, scheme_optional=False)):
        problems.add((*key, "proxy"), problem)
    return Endpoint(
        scheme=scheme,
        host=host,
        path=api_path,
        capabilities=frozenset(caps) if caps else ALL_CAPABILITIES,
        skip_verify=bool(section.skip_verify),
        ca_files=tuple(_abs(p, base) for p in ca if p),
        client_pairs=tuple((_abs(c, base), _abs(k, base) if k else "") for c, k in clients if c),
        header=header,
        proxy=section.proxy,
        dial_timeout=dial,
        mirror=is_mirror(host, registry_host),
        origin=str(base / HOSTS_FILE),
    )


def _abs(path: str, base: Path) -> str:
    return path if os.path.isabs(path) else str(base / path)


def host_dirs(root: Path, registry_host: str) -> list[Path]:
    """Where containerd looks for ``registry_host``'s directory, in order (``_default`` last)."""
    out: list[Path] = []
    colon = registry_host.rfind(":")
    if colon > 0 and not registry_host.endswith("]"):
        out.append(root / f"{registry_host[:colon]}_{registry_host[colon + 1 :]}_")
    out += [root / registry_host, root / DEFAULT_DIR]
    return out


def load_host_dir(directory: Path, registry_host: str) -> list[Endpoint]:
    """The endpoints of one host directory: its hosts.toml, else docker's certs.d files."""
    hosts_file = directory / HOSTS_FILE
    try:
        text = hosts_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read {hosts_file}: {exc}") from None
    if text.strip():
        return parse_hosts_file(text, hosts_file, registry_host)
    return [_certs_endpoint(directory, registry_host)]


def _certs_endpoint(directory: Path, registry_host: str) -> Endpoint:
    """docker's certs.d layout: ``*.crt`` are CAs, ``x.cert`` with ``x.key`` a client pair."""
    names = sorted(os.listdir(directory))
    cas = tuple(str(directory / n) for n in names if n.endswith(".crt"))
    pairs = tuple(
        (str(directory / n), str(directory / (n[: -len(".cert")] + ".key")))
        for n in names
        if n.endswith(".cert") and n[: -len(".cert")] + ".key" in names
    )
    base = default_server(registry_host)
    return Endpoint(
        base.scheme, base.host, base.path, ca_files=cas, client_pairs=pairs, origin=str(directory)
    )


# -- the resolver ---------------------------------------------------------------------


class RegistryHosts:
    """Endpoints and credentials per registry host, from config.toml and the hosts directory.

    :meth:`endpoints` reads the hosts directory on every call (operators may
    edit it without restarting berthd, as with containerd); it blocks, so
    async callers use :meth:`lookup`, which runs it on a thread.
    """

    def __init__(self, hosts: Mapping[str, HostConfig] | None = None, config_path: str = "") -> None:
        self.hosts = dict(hosts or {})
        self.config_path = config_path
        for name, entry in self.hosts.items():
            try:
                entry.validate()
            except ValueError as exc:
                raise InvalidArgument(f"hosts.{name}.{exc}") from None

    async def lookup(self, registry_host: str) -> list[Endpoint]:
        if self.config_path and not self._from_config(registry_host):
            return await asyncio.to_thread(self.endpoints, registry_host)
        return self.endpoints(registry_host)

    def _from_config(self, registry_host: str) -> bool:
        entry = self.hosts.get(registry_host)
        return entry is not None and entry.defines_endpoints()

    def endpoints(self, registry_host: str) -> list[Endpoint]:
        """The ordered endpoints of ``registry_host`` (never empty)."""
        if not is_registry_host(registry_host):
            raise InvalidArgument(f"registry host {registry_host!r}: expected host[:port]")
        entry = self.hosts.get(registry_host)
        if entry is not None and entry.defines_endpoints():
            found = self._config_endpoints(registry_host, entry)
        else:
            found = self._dir_endpoints(registry_host) or [default_server(registry_host)]
        last = len(found) - 1
        return [self._with_credentials(ep, registry_host, server=i == last) for i, ep in enumerate(found)]

    def credentials(self, host: str) -> Credentials | None:
        entry = self.hosts.get(host)
        return Credentials.from_host_config(entry) if entry is not None else None

    def _with_credentials(self, ep: Endpoint, registry_host: str, *, server: bool) -> Endpoint:
        """Credentials by the endpoint's host; the server (last) falls back to the registry host's."""
        creds = self.credentials(ep.host)
        if creds is None and server:
            creds = self.credentials(registry_host)
        if creds is None:
            return ep
        return replace(ep, credentials=creds)

    def _dir_endpoints(self, registry_host: str) -> list[Endpoint]:
        if not self.config_path:
            return []
        for directory in host_dirs(Path(self.config_path), registry_host):
            if directory.is_dir():
                log.debug("registry.hosts_dir", host=registry_host, dir=str(directory))
                return load_host_dir(directory, registry_host)
        return []

    def _config_endpoints(self, registry_host: str, entry: HostConfig) -> list[Endpoint]:
        # TLS settings and headers of the entry apply to all of its endpoints
        settings = Endpoint(
            "https",
            registry_host,
            skip_verify=entry.skip_verify,
            ca_files=(entry.ca_file,) if entry.ca_file else (),
            client_pairs=((entry.client_cert, entry.client_key),) if entry.client_cert else (),
            header=tuple(entry.header.items()),
            origin=f'config.toml hosts."{registry_host}"',
        )
        out: list[Endpoint] = []
        for url in entry.mirrors:
            scheme, host, path = _split_url(url, _scheme_for(host_of(url), entry.plain_http))
            caps = frozenset(entry.capabilities)
            mirror = is_mirror(host, registry_host)
            out.append(
                replace(settings, scheme=scheme, host=host, path=path, capabilities=caps, mirror=mirror)
            )
        if entry.server:
            scheme, host, path = _split_url(
                entry.server, _scheme_for(host_of(entry.server), entry.plain_http)
            )
        else:
            default = default_server(registry_host)
            scheme, host, path = default.scheme, default.host, default.path
            if entry.plain_http is not None:
                scheme = "http" if entry.plain_http else "https"
        out.append(
            replace(settings, scheme=scheme, host=host, path=path, mirror=is_mirror(host, registry_host))
        )
        return out


def host_of(url: str) -> str:
    return urlsplit(url if "://" in url else "https://" + url).netloc


def _scheme_for(host: str, plain_http: bool | None) -> str:
    if plain_http is not None:
        return "http" if plain_http else "https"
    return "http" if is_loopback(host) else "https"


def _split_url(url: str, default_scheme: str) -> tuple[str, str, str]:
    """(scheme, host, API root path) of a config.toml URL; ``/v2`` appended unless present."""
    parts = urlsplit(url if "://" in url else f"{default_scheme}://{url}")
    path = os.path.normpath(parts.path) if parts.path not in ("", "/") else ""
    if not path.endswith("/v2"):
        path += "/v2"
    return parts.scheme, parts.netloc, path


def describe(endpoints: Sequence[Endpoint]) -> str:
    """``https://a/v2, http://b/v2`` for messages."""
    return ", ".join(ep.url for ep in endpoints)
