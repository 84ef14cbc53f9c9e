"""The registry part of the images plugin's config.toml table.

The images plugin's config dataclass extends :class:`RegistryConfig` (every
field has a default; a subclass that defines ``validate`` calls
``super().validate()``), so these keys sit directly in its table::

    [plugins."berth.images.v1.default"]
    config_path = "/etc/containerd/certs.d"     # containerd's hosts.toml directory

    [plugins."berth.images.v1.default".hosts."registry.example.com"]
    mirrors = ["https://mirror.example.com"]
    ca_file = "/etc/berth/certs/example-ca.pem"
    username = "puller"
    password = "..."

    [plugins."berth.images.v1.default".hosts."10.0.0.5:5000"]
    plain_http = true

How a registry host's endpoints are found (see :mod:`.hosts`): an entry here
that sets an endpoint key (server, mirrors, plain_http, skip_verify,
ca_file, client_cert, header) decides; else ``<config_path>/<host>/hosts.toml``
or ``<config_path>/_default/hosts.toml``; else the defaults (HTTPS, plain
HTTP on loopback, ``registry-1.docker.io`` for ``docker.io``). Credentials
are always taken from here, by the host an endpoint points at, so they
combine with a hosts.toml.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from daemon.config import doc

CAPABILITIES = ("pull", "resolve", "push")
_HOST_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?\Z"
)


def is_registry_host(host: str) -> bool:
    """``host[:port]`` as the first component of an image reference spells it."""
    if not _HOST_RE.match(host):
        return False
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1 : host.index("]")])
        except ValueError:
            return False
    return True


def url_problem(url: str, *, scheme_optional: bool = True) -> str:
    """Why ``url`` is not a usable registry endpoint URL ("" when it is)."""
    text = url if "://" in url or not scheme_optional else "https://" + url
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"invalid URL {url!r}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"invalid URL {url!r}: the scheme must be http or https"
    if not parts.netloc or not is_registry_host(parts.netloc):
        return f"invalid URL {url!r}: expected scheme://host[:port][/path]"
    if parts.query or parts.fragment:
        return f"invalid URL {url!r}: no query or fragment allowed"
    return ""


@dataclass
class HostConfig:
    """One registry host: where its images come from, how to connect, which credentials."""

    server: str = field(
        default="",
        metadata=doc(
            "URL of the registry itself (scheme://host[:port][/path]); empty: https://<host>, plain "
            "http for loopback hosts, https://registry-1.docker.io for docker.io."
        ),
    )
    mirrors: list[str] = field(
        default_factory=list,
        metadata=doc(
            "Mirror URLs tried in order before the server; a URL without scheme is https (http if "
            "plain_http is set or the mirror is on loopback)."
        ),
    )
    capabilities: list[str] = field(
        default_factory=lambda: ["pull", "resolve"],
        metadata=doc(
            'What the mirrors are trusted with: "pull" fetches content by digest, "resolve" also '
            'turns tags into digests (grant it only to mirrors trusted like the registry), "push".'
        ),
    )
    plain_http: bool | None = field(
        default=None,
        metadata=doc(
            "Talk plain HTTP to the server (and to scheme-less mirrors). Unset: HTTP for loopback "
            "hosts (localhost, 127.0.0.0/8, ::1), HTTPS otherwise."
        ),
    )
    skip_verify: bool = field(
        default=False, metadata=doc("Do not verify the TLS certificates of this host's endpoints.")
    )
    ca_file: str = field(
        default="",
        metadata=doc("PEM file of CA certificates trusted for this host's endpoints, besides the system's."),
    )
    client_cert: str = field(
        default="", metadata=doc("PEM client certificate for TLS client authentication (with client_key).")
    )
    client_key: str = field(
        default="", metadata=doc("PEM private key of client_cert; empty if client_cert holds it too.")
    )
    header: dict[str, str] = field(
        default_factory=dict, metadata=doc("Extra HTTP headers sent with every request to this host.")
    )
    username: str = field(default="", metadata=doc("User name for basic auth or for the token server."))
    password: str = field(default="", metadata=doc("Password (or access token) of username."))
    auth: str = field(
        default="",
        metadata=doc('base64 of "username:password", as in docker\'s config.json; instead of both.'),
    )
    identity_token: str = field(
        default="",
        metadata=doc(
            "OAuth2 refresh token exchanged at the registry's token server (docker's identitytoken)."
        ),
    )
    registry_token: str = field(
        default="", metadata=doc("Bearer token sent as is with every request (docker's registrytoken).")
    )

    def defines_endpoints(self) -> bool:
        """True if this entry, not a hosts.toml, decides the host's endpoints."""
        return bool(
            self.server
            or self.mirrors
            or self.plain_http is not None
            or self.skip_verify
            or self.ca_file
            or self.client_cert
            or self.header
        )

    def validate(self) -> None:
        if self.server and (problem := url_problem(self.server)):
            raise ValueError(f"server: {problem}")
        for mirror in self.mirrors:
            if problem := url_problem(mirror):
                raise ValueError(f"mirrors: {problem}")
        for cap in self.capabilities:
            if cap not in CAPABILITIES:
                raise ValueError(
                    f"capabilities: unknown capability {cap!r} (expected {', '.join(CAPABILITIES)})"
                )
        if self.client_key and not self.client_cert:
            raise ValueError("client_key: set client_cert too")
        if self.password and not self.username:
            raise ValueError("password: set username too")
        if self.auth:
            if self.username or self.password:
                raise ValueError("auth: set either auth or username and password, not both")
            try:
                decoded = base64.b64decode(self.auth, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                decoded = ""
            if ":" not in decoded:
                raise ValueError('auth: expected base64 of "username:password"')


@dataclass
class RegistryConfig:
    """Registry hosts, credentials and retries of image pulls."""

    config_path: str = field(
        default="",
        metadata=doc(
            "Directory of containerd-style registry host configs: <config_path>/<host>/hosts.toml "
            "(host:port also as host_port_), <config_path>/_default/hosts.toml as the fallback; read "
            'at every pull. Reuse containerd\'s with "/etc/containerd/certs.d". Empty: none.'
        ),
    )
    hosts: dict[str, HostConfig] = field(
        default_factory=dict,
        metadata=doc(
            'Per registry host (as images name it, e.g. "127.0.0.1:5000"): endpoints and credentials.'
        ),
    )
    retry_attempts: int = field(
        default=5,
        metadata=doc(
            "Attempts per request on connection errors, timeouts and HTTP 429/5xx (every endpoint "
            "of the host is tried in each attempt); a dropped blob download resumes with a Range "
            "request, and gives up after this many drops in a row without progress."
        ),
    )
    retry_initial_delay: float = field(
        default=0.5, metadata=doc("Seconds before the second attempt; doubled for each further one.")
    )
    retry_max_delay: float = field(default=10.0, metadata=doc("Upper bound of the delay between attempts."))
    retry_max_elapsed: float = field(
        default=120.0,
        metadata=doc("Seconds after the first failure of a request beyond which it is not retried."),
    )
    connect_timeout: float = field(
        default=30.0,
        metadata=doc("Seconds to establish a connection (per endpoint; hosts.toml dial_timeout wins)."),
    )
    read_timeout: float = field(
        default=60.0,
        metadata=doc("Seconds without receiving a byte before a request is abandoned (and retried)."),
    )

    def validate(self) -> None:
        for host in self.hosts:
            if not is_registry_host(host):
                raise ValueError(f"hosts: {host!r} is not a registry host (host[:port], as in image names)")
        if self.retry_attempts < 1:
            raise ValueError(f"retry_attempts: expected at least 1, got {self.retry_attempts}")
        for name in ("retry_initial_delay", "retry_max_delay", "retry_max_elapsed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)}")
        for name in ("connect_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)}")
