"""Registry authentication: the ``WWW-Authenticate`` challenge flow, as docker and containerd do it.

A request goes out without credentials (or with what worked before for the
host). A ``401`` names how to authenticate:

* ``Basic realm="..."``: send the configured user name and password;
* ``Bearer realm="https://auth/token",service="registry",scope="repository:x:pull"``:
  get a token from the realm (``GET realm?service=..&scope=..``, with basic
  credentials when configured, anonymously otherwise; or the OAuth2
  ``POST`` with ``grant_type=refresh_token`` for an identity token), then
  send ``Authorization: Bearer <token>``.

The request is retried once with the new header; a second ``401`` means the
credentials are not good enough. Tokens are cached per (host, credentials,
scope) until shortly before they expire, and the scheme that worked is
remembered per host, so later requests (parallel layer downloads) send the
right header at once instead of collecting a 401 each. Concurrent requests
needing the same token wait for one fetch.

Failures are :class:`~daemon.errors.PermissionDenied` naming the image, the
registry and the repository; a token server that cannot be reached is
:class:`TokenUnavailable` (retried like the registry itself).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import structlog

from daemon.errors import FailedPrecondition, PermissionDenied, Unavailable
from plugins.images.registry.hosts import Credentials, Endpoint

log = structlog.get_logger("berth.images.registry")

#: a token server that does not say how long a token lives: the distribution spec's default
DEFAULT_TOKEN_TTL = 60
#: refresh a token this long before it expires (capped at a tenth of its lifetime)
EXPIRY_MARGIN = 10.0
CLIENT_ID = "berth"
MAX_TOKEN_RESPONSE = 1 << 20

#: (method, url, endpoint, headers, form) -> (status, headers, body); the client's HTTP, for token servers
HttpCall = Callable[
    [str, str, Endpoint, Mapping[str, str], Mapping[str, str] | None],
    Awaitable[tuple[int, Mapping[str, str], bytes]],
]


class TokenUnavailable(Unavailable):
    """The token server could not be reached or failed (5xx): worth retrying."""


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header; scheme and parameter names lowercased."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        inner = ",".join(f'{k}="{v}"' for k, v in self.params.items())
        return f"{self.scheme.capitalize()} {inner}".strip()


def parse_www_authenticate(headers: str | Iterable[str]) -> list[Challenge]:
    """Every challenge in one or more ``WWW-Authenticate`` values (RFC 7235).

    ``Bearer realm="https://a/token",service="reg",scope="repository:x:pull,push"``
    gives ``Challenge("bearer", {"realm": ..., "service": ..., "scope": ...})``;
    quoted values may hold commas and backslash escapes; several challenges
    may share one header value. Malformed parts are skipped, not raised.
    """
    values = [headers] if isinstance(headers, str) else list(headers)
    out: list[Challenge] = []
    for value in values:
        out += _Parser(value).challenges()
    return out


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def _token(self) -> str:
        start = self.i
        while self.i < len(self.s) and self.s[self.i] in _TOKEN_CHARS:
            self.i += 1
        return self.s[start : self.i]

    def _peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def _quoted(self) -> str:
        self.i += 1  # opening quote
        out = []
        while self.i < len(self.s):
            c = self.s[self.i]
            self.i += 1
            if c == "\\" and self.i < len(self.s):
                out.append(self.s[self.i])
                self.i += 1
            elif c == '"':
                break
            else:
                out.append(c)
        return "".join(out)

    def challenges(self) -> list[Challenge]:
        out: list[Challenge] = []
        while self.i < len(self.s):
            while self._peek() in (" ", "\t", ","):
                self.i += 1
            if self.i >= len(self.s):
                break
            scheme = self._token()
            if not scheme:
                self.i += 1  # not a token: skip the character
                continue
            out.append(Challenge(scheme.lower(), self._params()))
        return out

    def _params(self) -> dict[str, str]:
        params: dict[str, str] = {}
        while True:
            self._ws()
            start = self.i
            name = self._token()
            self._ws()
            if not name or self._peek() != "=":
                self.i = start  # the next challenge's scheme (or token68, which registries do not use)
                if name and not params:
                    self._skip_token68()
                return params
            if not params and self._is_token68():
                self.i = start
                self._skip_token68()
                return params
            self.i += 1
            self._ws()
            value = self._quoted() if self._peek() == '"' else self._token()
            params[name.lower()] = value
            self._ws()
            if self._peek() == ",":
                self.i += 1
            else:
                return params

    def _is_token68(self) -> bool:
        """At the ``=`` after a name: only more ``=`` then the end or a comma follow (``abc==``)."""
        k = self.i
        while k < len(self.s) and self.s[k] == "=":
            k += 1
        rest = self.s[k:].lstrip(" \t")
        return not rest or rest.startswith(",")

    def _skip_token68(self) -> None:
        save = self.i
        self._token()
        while self._peek() == "=":
            self.i += 1
        self._ws()
        if self._peek() not in ("", ","):
            self.i = save


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


@dataclass
class _Token:
    header: str
    expires_at: float


class Authorizer:
    """Authorization headers per endpoint and scope; one per client, safe for concurrent use."""

    def __init__(self, http: HttpCall, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._http = http
        self._clock = clock
        self._schemes: dict[tuple[str, str], Challenge] = {}
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    @staticmethod
    def _creds_key(ep: Endpoint) -> str:
        return ep.credentials.key if ep.credentials else ""

    async def authorization(self, ep: Endpoint, scope: str, *, image: str, repository: str) -> str | None:
        """The header to send before any challenge: a static token, or what worked before for the host."""
        creds = ep.credentials
        if creds and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        known = self._schemes.get((ep.host, self._creds_key(ep)))
        if known is None:
            return None
        if known.scheme == "basic":
            assert creds is not None  # remembered only when credentials were there
            return basic_header(creds.username, creds.password)
        return await self._bearer(ep, known, scope, image=image, repository=repository)

    async def challenged(
        self,
        ep: Endpoint,
        scope: str,
        challenges: list[Challenge],
        *,
        rejected: str | None,
        image: str,
        repository: str,
    ) -> str:
        """The header to retry with after a 401 carrying ``challenges``; PermissionDenied if there is none.

        ``rejected`` is the header the 401 answered (None if there was none):
        a cached token it held is dropped, so a fresh one is fetched.
        """
        where = f"{image}: registry {ep.host}, repository {repository}"
        creds = ep.credentials
        by_scheme = {c.scheme: c for c in challenges}
        bearer, basic = by_scheme.get("bearer"), by_scheme.get("basic")
        if bearer is not None:
            self._schemes[(ep.host, self._creds_key(ep))] = bearer
            self._forget(ep, scope, rejected)
            return await self._bearer(ep, bearer, scope, image=image, repository=repository)
        if basic is not None:
            if not creds or not creds.username:
                raise PermissionDenied(
                    f"{where}: authentication required ({basic}) and no credentials are configured for "
                    f"{ep.host}"
                )
            self._schemes[(ep.host, self._creds_key(ep))] = basic
            return basic_header(creds.username, creds.password)
        offered = ", ".join(str(c) for c in challenges) or "no WWW-Authenticate challenge"
        raise PermissionDenied(f"{where}: unauthorized (HTTP 401) and no supported challenge: {offered}")

    def _forget(self, ep: Endpoint, scope: str, rejected: str | None) -> None:
        key = (ep.host, self._creds_key(ep), scope)
        token = self._tokens.get(key)
        if token is not None and token.header == rejected:
            del self._tokens[key]

    async def _bearer(
        self, ep: Endpoint, challenge: Challenge, scope: str, *, image: str, repository: str
    ) -> str:
        key = (ep.host, self._creds_key(ep), scope)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            # after a 401, _forget dropped the rejected token: one found here was
            # fetched by a concurrent request meanwhile, and is good to use
            if cached is not None and self._clock() < cached.expires_at:
                return cached.header
            token = await self._fetch_token(ep, challenge, scope, image=image, repository=repository)
            self._tokens[key] = token
            return token.header

    async def _fetch_token(
        self, ep: Endpoint, challenge: Challenge, scope: str, *, image: str, repository: str
    ) -> _Token:
        where = f"{image}: registry {ep.host}, repository {repository}"
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise PermissionDenied(f"{where}: bearer challenge has no usable realm: {challenge}")
        service = challenge.params.get("service", "")
        scopes = [scope]
        extra = challenge.params.get("scope", "")
        for s in extra.split(" "):
            if s and s not in scopes:
                scopes.append(s)
        creds = ep.credentials or Credentials()
        headers: dict[str, str] = {}
        form: dict[str, str] | None = None
        if creds.identity_token:
            method, url = "POST", realm
            form = {
                "grant_type": "refresh_token",
                "refresh_token": creds.identity_token,
                "service": service,
                "scope": " ".join(scopes),
                "client_id": CLIENT_ID,
            }
        else:
            query: list[tuple[str, str]] = [("service", service)] if service else []
            query += [("scope", s) for s in scopes]
            if creds.username:
                query.append(("account", creds.username))
                headers["Authorization"] = basic_header(creds.username, creds.password)
            sep = "&" if parts.query else "?"
            method, url = "GET", realm + (sep + urlencode(query) if query else "")
        log.debug("registry.token_fetch", host=ep.host, realm=realm, scope=scopes, user=creds.username)
        status, _, body = await self._http(method, url, ep, headers, form)
        if status in (401, 403):
            if creds:
                who = f"the credentials of {creds.username!r}" if creds.username else "the identity token"
                raise PermissionDenied(f"{where}: token server {realm} rejected {who} (HTTP {status})")
            raise PermissionDenied(
                f"{where}: authentication required: token server {realm} refused anonymous access "
                f"(HTTP {status}) and no credentials are configured for {ep.host}"
            )
        if status >= 500 or status == 429:
            raise TokenUnavailable(f"{where}: token server {realm} answered HTTP {status}")
        if status != 200:
            raise FailedPrecondition(f"{where}: token server {realm} answered HTTP {status}: {body[:200]!r}")
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        token = ""
        ttl: object = DEFAULT_TOKEN_TTL
        if isinstance(doc, dict):
            token = str(doc.get("access_token") or doc.get("token") or "")
            ttl = doc.get("expires_in", DEFAULT_TOKEN_TTL)
        if not token:
            raise FailedPrecondition(f"{where}: token server {realm} sent no token")
        lifetime = (
            float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0 else 60.0
        )
        margin = min(EXPIRY_MARGIN, lifetime / 10)
        return _Token(f"Bearer {token}", self._clock() + lifetime - margin)
