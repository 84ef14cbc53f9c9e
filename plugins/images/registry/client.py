"""The registry client: resolve a reference, fetch manifests and blobs, verified (OCI distribution API).

How the pull orchestrator uses it (containerd's resolver/fetcher split)::

    client = RegistryClient.from_config(cfg)            # one per plugin: one aiohttp session
    repo = await client.repository("busybox")            # endpoints and credentials of docker.io
    name, top = await repo.resolve()                     # tag -> descriptor (HEAD, else GET)
    desc, manifest = await repo.manifest_for(top, "linux/amd64")   # index -> platform's manifest
    config = await repo.fetch_bytes(manifest.config)     # small blobs, verified
    async with await repo.fetch_blob(layer) as stream:   # big blobs: a verified stream of chunks
        async for chunk in stream:
            await writer.write(chunk)                    # content store ingest, applier ...
    # the loop ended normally: size and digest are verified, commit now
    await client.close()

Robustness, per request: the endpoints of the registry host (mirrors first,
see :mod:`.hosts`) are tried in order, each once per attempt; connection
errors, timeouts and HTTP 408/429/5xx make another attempt after an
exponential backoff, up to ``RetryPolicy.attempts`` and ``max_elapsed``
seconds; 404 falls through to the next endpoint. A blob download that
breaks off resumes where it stopped with ``Range: bytes=N-`` (a server that
ignores the range is read past the bytes already delivered), and only gives
up after ``attempts`` breaks in a row without progress.

Every byte is verified: manifests against their digest before they are
returned, blobs as they stream (size checked on every chunk, digest at the
end: the stream raises FailedPrecondition ``blob sha256:...: digest
mismatch`` instead of ending). Errors name the image and the host:
Unavailable (registry down, after retries), NotFound, PermissionDenied
(authentication), InvalidArgument (bad reference, unknown media type),
FailedPrecondition (corrupt content, unexpected answers).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Protocol

import aiohttp
import structlog
from yarl import URL

from daemon import __version__
from daemon.errors import (
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from daemon.protocols import Descriptor, RegistryCredentials
from daemon.reference import Reference, check_digest, parse_reference
from plugins.images.registry.auth import Authorizer, TokenUnavailable, parse_www_authenticate, pull_scope
from plugins.images.registry.config import RegistryConfig
from plugins.images.registry.hosts import Endpoint, RegistryHosts, is_loopback
from plugins.images.registry.manifests import (
    ACCEPT,
    GENERIC_TYPES,
    MAX_MANIFEST_SIZE,
    Manifest,
    check_media_type,
    is_index,
    parse,
    sniff_media_type,
)
from plugins.images.registry.platforms import Platform, select_manifest

log = structlog.get_logger("berth.images.registry")

USER_AGENT = f"berth/{__version__}"
CHUNK_SIZE = 256 << 10
#: statuses worth another attempt (the server may recover)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class Hasher(Protocol):
    """A :mod:`hashlib` object."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of retries and timeouts (see :class:`~.config.RegistryConfig` for each)."""

    attempts: int = 5
    initial_delay: float = 0.5
    max_delay: float = 10.0
    max_elapsed: float = 120.0
    connect_timeout: float = 30.0
    read_timeout: float = 60.0

    @classmethod
    def from_config(cls, cfg: RegistryConfig) -> RetryPolicy:
        return cls(
            attempts=cfg.retry_attempts,
            initial_delay=cfg.retry_initial_delay,
            max_delay=cfg.retry_max_delay,
            max_elapsed=cfg.retry_max_elapsed,
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.read_timeout,
        )

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``failures`` failed attempts in a row (with +-20% jitter)."""
        base = min(self.max_delay, self.initial_delay * 2.0 ** max(0, failures - 1))
        if retry_after is not None:
            base = min(self.max_delay, max(base, retry_after))
        return base * random.uniform(0.8, 1.2)


class _Retryable(Exception):
    """A transient failure of one endpoint (connection, timeout, 5xx); the text says which."""


def hasher_for(digest: str) -> Hasher:
    algorithm = digest.partition(":")[0]
    return hashlib.new(algorithm)


def compute_digest(algorithm: str, data: bytes) -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _media_type(resp: aiohttp.ClientResponse) -> str:
    return resp.headers.get("Content-Type", "").partition(";")[0].strip().lower()


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    """The registry's error codes and messages (``{"errors": [...]}``), else the body's start."""
    try:
        body = await resp.content.read(4096)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    try:
        doc = json.loads(body)
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors:
            return "; ".join(
                f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                for e in errors
                if isinstance(e, dict)
            )
    except ValueError:
        pass
    return body[:200].decode(errors="replace").strip()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) and not str(exc):
        text = "timed out"
    return text


class RegistryClient:
    """Pulls from OCI distribution registries; one aiohttp session for all of them.

    Create it inside the event loop that uses it; :meth:`close` when done.
    """

    def __init__(
        self,
        hosts: RegistryHosts | None = None,
        retry: RetryPolicy | None = None,
        *,
        user_agent: str = USER_AGENT,
    ) -> None:
        self.hosts = hosts or RegistryHosts()
        self.retry = retry or RetryPolicy()
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._ssl: dict[tuple[object, ...], ssl.SSLContext] = {}
        self._env_proxies = urllib.request.getproxies_environment()
        self.auth = Authorizer(self._token_http)

    @classmethod
    def from_config(cls, cfg: RegistryConfig, *, user_agent: str = USER_AGENT) -> RegistryClient:
        return cls(
            RegistryHosts(cfg.hosts, cfg.config_path), RetryPolicy.from_config(cfg), user_agent=user_agent
        )

    # -- lifecycle -------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, limit_per_host=16),
                headers={"User-Agent": self.user_agent},
                trust_env=False,  # proxies are chosen per endpoint (_proxy), never for loopback
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- entry points ----------------------------------------------------------

    async def repository(
        self, ref: str | Reference, *, credentials: RegistryCredentials | None = None
    ) -> Repository:
        """The repository of ``ref`` with its endpoints (reads the hosts directory, on a thread).

        ``credentials`` (e.g. from a CRI PullImage request) replace the
        configured ones for the registry's own server; mirrors keep theirs.
        """
        reference = parse_reference(ref) if isinstance(ref, str) else ref
        endpoints = await self.hosts.lookup(reference.domain)
        if credentials:
            last = len(endpoints) - 1
            endpoints = [
                replace(ep, credentials=credentials) if i == last or ep.host == reference.domain else ep
                for i, ep in enumerate(endpoints)
            ]
        return Repository(self, reference, endpoints)

    async def resolve(
        self, ref: str | Reference, *, credentials: RegistryCredentials | None = None
    ) -> tuple[str, Descriptor]:
        """``(normalized reference, descriptor of its manifest or index)``."""
        repo = await self.repository(ref, credentials=credentials)
        return await repo.resolve()

    async def fetch_manifest(
        self, ref: str | Reference, desc: Descriptor, *, credentials: RegistryCredentials | None = None
    ) -> bytes:
        repo = await self.repository(ref, credentials=credentials)
        return await repo.fetch_manifest(desc)

    async def fetch_blob(
        self,
        ref: str | Reference,
        desc: Descriptor,
        offset: int = 0,
        *,
        hasher: Hasher | None = None,
        credentials: RegistryCredentials | None = None,
    ) -> BlobStream:
        repo = await self.repository(ref, credentials=credentials)
        return await repo.fetch_blob(desc, offset, hasher=hasher)

    # -- HTTP ------------------------------------------------------------------

    async def _ssl_for(self, ep: Endpoint) -> ssl.SSLContext | bool:
        if ep.scheme != "https":
            return True
        if ep.skip_verify:
            return False
        if not ep.ca_files and not ep.client_pairs:
            return True
        key = (ep.ca_files, ep.client_pairs)
        ctx = self._ssl.get(key)
        if ctx is None:
            ctx = await asyncio.to_thread(_make_ssl_context, ep)  # reads the PEM files
            self._ssl[key] = ctx
        return ctx

    def _proxy(self, ep: Endpoint, url: URL) -> str | None:
        if ep.proxy:
            return ep.proxy
        host = url.host or ""
        if is_loopback(host) or not self._env_proxies:
            return None
        if urllib.request.proxy_bypass(host):
            return None
        return self._env_proxies.get(url.scheme)

    async def send(
        self,
        ep: Endpoint,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        *,
        auto_decompress: bool = True,
        data: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """One HTTP request to ``ep``; transient failures raise :class:`_Retryable`."""
        timeout = aiohttp.ClientTimeout(
            sock_connect=ep.dial_timeout or self.retry.connect_timeout, sock_read=self.retry.read_timeout
        )
        all_headers = {**dict(ep.header), **headers}
        try:
            return await self.session.request(
                method,
                url,
                headers=all_headers,
                data=data,
                ssl=await self._ssl_for(ep),
                proxy=self._proxy(ep, url),
                timeout=timeout,
                auto_decompress=auto_decompress,
            )
        except aiohttp.ClientSSLError as exc:
            raise Unavailable(
                f"TLS with {ep.host} failed: {exc} (set ca/skip_verify for it in {ep.origin})"
            ) from None
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise _Retryable(_describe(exc)) from None
        except aiohttp.ClientError as exc:
            raise FailedPrecondition(f"request to {ep.host} failed: {_describe(exc)}") from None

    async def _token_http(
        self, method: str, url: str, ep: Endpoint, headers: Mapping[str, str], form: Mapping[str, str] | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        try:
            resp = await self.send(ep, method, URL(url, encoded=True), headers, data=form)
        except _Retryable as exc:
            raise TokenUnavailable(f"token server {url.split('?')[0]} unreachable: {exc}") from None
        async with resp:
            try:
                body = await resp.content.read(1 << 20)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise TokenUnavailable(f"token server {url.split('?')[0]}: {_describe(exc)}") from None
            return resp.status, dict(resp.headers), body


def _make_ssl_context(ep: Endpoint) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    try:
        for ca in ep.ca_files:
            ctx.load_verify_locations(cafile=ca)
        for cert, key in ep.client_pairs:
            ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise FailedPrecondition(f"registry {ep.host}: cannot load TLS files of {ep.origin}: {exc}") from None
    return ctx


class Repository:
    """One repository of one registry host, with the endpoints to reach it; cheap, per pull."""

    def __init__(self, client: RegistryClient, reference: Reference, endpoints: list[Endpoint]) -> None:
        self.client = client
        self.reference = reference
        self.endpoints = endpoints
        self.image = str(reference)
        self.scope = pull_scope(reference.path)
        self._manifests: dict[str, bytes] = {}  # verified small documents (manifests, configs) by digest

    # -- requests ---------------------------------------------------------------

    def url(self, ep: Endpoint, kind: str, obj: str) -> URL:
        """``<api root>/<repository>/<kind>/<obj>``, with ``?ns=<registry>`` on another host (containerd)."""
        url = URL(f"{ep.url}/{self.reference.path}/{kind}/{obj}")
        return url.with_query(ns=self.reference.domain) if ep.mirror else url

    async def _send(
        self, ep: Endpoint, method: str, url: URL, headers: Mapping[str, str], auto_decompress: bool
    ) -> aiohttp.ClientResponse:
        """One request with authentication: on 401, answer the challenge and retry once."""
        auth = self.client.auth
        header = await auth.authorization(ep, self.scope, image=self.image, repository=self.reference.path)
        sent = {**headers, **({"Authorization": header} if header else {})}
        resp = await self.client.send(ep, method, url, sent, auto_decompress=auto_decompress)
        if resp.status != 401:
            return resp
        challenges = parse_www_authenticate(resp.headers.getall("WWW-Authenticate", []))
        resp.release()
        header = await auth.challenged(
            ep, self.scope, challenges, rejected=header, image=self.image, repository=self.reference.path
        )
        resp = await self.client.send(
            ep, method, url, {**headers, "Authorization": header}, auto_decompress=auto_decompress
        )
        if resp.status == 401:
            text = await _error_text(resp)
            resp.release()
            who = f"as {ep.credentials.username!r}" if ep.credentials and ep.credentials.username else ""
            raise PermissionDenied(
                f"{self.image}: registry {ep.host} refused access to repository {self.reference.path} "
                f"{who} even after authenticating (HTTP 401{': ' + text if text else ''})".replace("  ", " ")
            )
        return resp

    async def request(
        self,
        method: str,
        kind: str,
        obj: str,
        *,
        capability: str,
        headers: Mapping[str, str] | None = None,
        auto_decompress: bool = True,
        what: str = "",
    ) -> tuple[aiohttp.ClientResponse, Endpoint]:
        """The first 2xx answer to ``method /v2/<repo>/<kind>/<obj>`` among the endpoints, with retries.

        The caller owns the response (release it). ``what`` names the object
        in NotFound ("manifest sha256:..."). See the module docstring for the
        retry and fallback rules.
        """
        endpoints = [ep for ep in self.endpoints if ep.can(capability)]
        if not endpoints:
            origins = ", ".join(sorted({ep.origin for ep in self.endpoints}))
            raise FailedPrecondition(
                f"{self.image}: no endpoint of registry {self.reference.domain} has the {capability!r} "
                f"capability (configured in {origins})"
            )
        first_failure: float | None = None
        attempt = 0
        while True:
            attempt += 1
            outcomes: list[str] = []
            hard: BerthError | None = None
            retryable = False
            retry_after: float | None = None
            for ep in endpoints:
                url = self.url(ep, kind, obj)
                try:
                    resp = await self._send(ep, method, url, headers or {}, auto_decompress)
                except (_Retryable, TokenUnavailable) as exc:
                    retryable = True
                    outcomes.append(f"{ep.url}: {exc}")
                    continue
                except BerthError as exc:  # this endpoint cannot serve: try the next one
                    hard = hard or exc
                    outcomes.append(f"{ep.url}: {exc}")
                    continue
                if resp.status < 300:
                    return resp, ep
                status = resp.status
                text = await _error_text(resp) if method != "HEAD" else ""
                resp.release()
                detail = f"HTTP {status}{': ' + text if text else ''}"
                outcomes.append(f"{ep.url}: {detail}")
                log.debug("registry.answer", method=method, url=str(url), status=status, detail=text)
                if status == 404:
                    continue
                if status in RETRY_STATUSES:
                    retryable = True
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
                elif status == 403:
                    hard = hard or PermissionDenied(
                        f"{self.image}: registry {ep.host} denied access to repository "
                        f"{self.reference.path} ({detail})"
                    )
                else:
                    hard = hard or FailedPrecondition(
                        f"{self.image}: registry {ep.host} answered {method} {kind}/{obj} with {detail}"
                    )
            if retryable:
                now = time.monotonic()
                first_failure = first_failure if first_failure is not None else now
                delay = self.client.retry.delay(attempt, retry_after)
                if (
                    attempt < self.client.retry.attempts
                    and now - first_failure + delay <= self.client.retry.max_elapsed
                ):
                    log.info(
                        "registry.retry", image=self.image, request=f"{method} {kind}/{obj}", attempt=attempt,
                        delay=round(delay, 3), errors=outcomes,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    continue
                raise Unavailable(
                    f"{self.image}: registry {self.reference.domain} unavailable after {attempt} "
                    f"attempt{'s' if attempt > 1 else ''}: {'; '.join(outcomes)}"
                )
            if hard is not None:
                raise hard
            raise NotFound(f"{self.image}: {what or kind + ' ' + obj} not found ({'; '.join(outcomes)})")

    # -- manifests -------------------------------------------------------------

    async def resolve(self) -> tuple[str, Descriptor]:
        """``(normalized reference, descriptor)`` of the manifest or index the reference names.

        A tag is resolved by endpoints with the ``resolve`` capability, a
        digest by any that can ``pull``. HEAD first; a GET (whose document
        is kept for :meth:`fetch_manifest`) when HEAD does not tell digest,
        size and media type.
        """
        ref = self.reference
        capability = "pull" if ref.digest else "resolve"
        what = f"manifest {ref.object}"
        headers = {"Accept": ACCEPT}
        try:
            resp, ep = await self.request(
                "HEAD", "manifests", ref.object, capability=capability, headers=headers, what=what
            )
        except FailedPrecondition:
            resp = None  # some registries refuse HEAD: GET tells everything
        if resp is not None:
            media_type = _media_type(resp)
            digest = resp.headers.get("Docker-Content-Digest", "")
            size = resp.content_length
            resp.release()
            if ref.digest and digest and digest != ref.digest:
                raise FailedPrecondition(
                    f"{self.image}: registry {ep.host} answered with manifest {digest} for {ref.digest}"
                )
            digest = ref.digest or digest
            if digest and size is not None and media_type not in GENERIC_TYPES:
                check_media_type(media_type, f"{self.image}: manifest {digest}")
                check_digest(digest, f"{self.image}: manifest from {ep.host}")
                return str(ref), Descriptor(media_type, digest, size)
        resp, ep = await self.request(
            "GET", "manifests", ref.object, capability=capability, headers=headers, what=what
        )
        try:
            data = await _read_limited(resp, MAX_MANIFEST_SIZE, f"{self.image}: manifest {ref.object}")
        finally:
            resp.release()
        claimed = resp.headers.get("Docker-Content-Digest", "")
        expected = ref.digest or claimed
        algorithm = expected.partition(":")[0] if expected else "sha256"
        if expected:
            check_digest(expected, f"{self.image}: manifest from {ep.host}")
        actual = compute_digest(algorithm, data)
        if expected and actual != expected:
            raise FailedPrecondition(
                f"manifest {expected}: digest mismatch: expected {expected}, got {actual} "
                f"({self.image}, from {ep.url})"
            )
        media_type = _media_type(resp)
        if media_type in GENERIC_TYPES:
            media_type = sniff_media_type(data)
        check_media_type(media_type, f"{self.image}: manifest {actual}")
        self._manifests[actual] = data
        return str(ref), Descriptor(media_type, actual, len(data))

    async def fetch_manifest(self, desc: Descriptor) -> bytes:
        """The manifest or index ``desc`` names, verified against its size and digest."""
        what = f"manifest {desc.digest}"
        check_digest(desc.digest, f"{self.image}: {what}")
        cached = self._small(desc, what, MAX_MANIFEST_SIZE, "for manifests")
        if cached is not None:
            return cached
        accept = ACCEPT if desc.media_type in GENERIC_TYPES else f"{desc.media_type}, {ACCEPT}"
        try:
            resp, ep = await self.request(
                "GET", "manifests", desc.digest, capability="pull", headers={"Accept": accept}, what=what
            )
        except NotFound:  # as containerd: some registries serve manifests only as blobs
            resp, ep = await self.request("GET", "blobs", desc.digest, capability="pull", what=what)
        try:
            data = await _read_limited(resp, desc.size, f"{self.image}: {what}")
        finally:
            resp.release()
        _verify(data, desc, "manifest", self.image, ep)
        return data

    async def manifest_for(
        self, desc: Descriptor, platform: Platform | str | None = None
    ) -> tuple[Descriptor, Manifest]:
        """The image manifest of ``platform`` (default: the host's) under ``desc``, a manifest or an index.

        A lone manifest is checked against the platform of its config (which
        is fetched, and kept for :meth:`fetch_bytes`). No match: NotFound
        naming the image, the platform and what the image offers.
        """
        data = await self.fetch_manifest(desc)
        doc = parse(data, desc, image=self.image)
        if isinstance(doc, Manifest):
            await self._check_config_platform(desc, doc, platform)
            return desc, doc
        chosen = select_manifest(doc.manifests, platform, image=self.image)
        if is_index(chosen.media_type):
            raise InvalidArgument(
                f"{self.image}: index {desc.digest} points at another index {chosen.digest}: nested indexes "
                "are not supported"
            )
        data = await self.fetch_manifest(chosen)
        child = parse(data, chosen, image=self.image)
        if not isinstance(child, Manifest):
            raise InvalidArgument(f"{self.image}: manifest {chosen.digest} is an index, expected a manifest")
        return chosen, child

    async def _check_config_platform(
        self, desc: Descriptor, manifest: Manifest, want: Platform | str | None
    ) -> None:
        """A lone manifest has no platform but its config's: refuse another platform, as containerd does."""
        try:
            config = json.loads(await self.fetch_bytes(manifest.config))
        except ValueError:
            raise InvalidArgument(
                f"{self.image}: config {manifest.config.digest} is not valid JSON"
            ) from None
        if not isinstance(config, dict) or not config.get("os") or not config.get("architecture"):
            return  # nothing to check against
        select_manifest([(desc, Platform.from_json(config))], want, image=self.image)

    def _small(self, desc: Descriptor, what: str, max_size: int, allowed: str) -> bytes | None:
        """Refuse a document over ``max_size`` (before any request); its bytes if this repository has them."""
        if desc.size > max_size:
            raise InvalidArgument(
                f"{self.image}: {what}: size {desc.size} exceeds the {max_size} bytes allowed {allowed}"
            )
        cached = self._manifests.get(desc.digest)
        return cached if cached is not None and len(cached) == desc.size else None

    # -- blobs -----------------------------------------------------------------

    async def fetch_blob(
        self, desc: Descriptor, offset: int = 0, *, hasher: Hasher | None = None, verify: bool = True
    ) -> BlobStream:
        """A stream of the blob's bytes from ``offset`` on, verified as it goes (see :class:`BlobStream`).

        The first request is made here, so NotFound, PermissionDenied and
        Unavailable are raised by this call. To resume an ingest at
        ``offset`` > 0 with a full digest check, pass ``hasher``: a hashlib
        object already fed with the first ``offset`` bytes; without it only
        the size is checked and the digest is left to the content store's
        commit. ``verify=False``: the caller hashes the bytes itself (a
        content writer does, in its worker thread), so the stream checks the
        size only and spends no hashing on the event loop.
        """
        check_digest(desc.digest, f"{self.image}: blob")
        if not 0 <= offset <= desc.size:
            raise InvalidArgument(f"{self.image}: blob {desc.digest}: offset {offset} outside 0..{desc.size}")
        stream = BlobStream(self, desc, offset, hasher, verify=verify)
        await stream.open()
        return stream

    async def fetch_bytes(self, desc: Descriptor, max_size: int = MAX_MANIFEST_SIZE) -> bytes:
        """A small blob (an image config), whole and verified."""
        cached = self._small(desc, f"blob {desc.digest}", max_size, "here")
        if cached is not None:
            return cached
        async with await self.fetch_blob(desc) as stream:
            data = b"".join([chunk async for chunk in stream])
        self._manifests[desc.digest] = data
        return data


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise FailedPrecondition(f"{what}: {resp.content_length} bytes announced, at most {limit} expected")
    chunks: list[bytes] = []
    total = 0
    try:
        while chunk := await resp.content.read(CHUNK_SIZE):
            total += len(chunk)
            if total > limit:
                raise FailedPrecondition(f"{what}: more than {limit} bytes sent")
            chunks.append(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Unavailable(f"{what}: download failed: {_describe(exc)}") from None
    return b"".join(chunks)


def _verify(data: bytes, desc: Descriptor, kind: str, image: str, ep: Endpoint) -> None:
    if len(data) != desc.size:
        raise FailedPrecondition(
            f"{kind} {desc.digest}: size mismatch: expected {desc.size} bytes, got {len(data)} "
            f"({image}, from {ep.url})"
        )
    actual = compute_digest(desc.digest.partition(":")[0], data)
    if actual != desc.digest:
        raise FailedPrecondition(
            f"{kind} {desc.digest}: digest mismatch: expected {desc.digest}, got {actual} "
            f"({image}, from {ep.url})"
        )


class BlobStream:
    """The bytes of one blob as an async iterator of chunks, verified, resuming after breaks.

    ``descriptor`` is what is expected, ``offset`` where the stream started,
    ``position`` how far it got (``offset`` + bytes delivered). Iteration
    ends normally only after the whole blob arrived with the right size and
    (when it can be computed, see :meth:`Repository.fetch_blob`) digest;
    otherwise the last step raises FailedPrecondition naming the blob, so a
    consumer commits only after its loop ended. Hashing runs on the event
    loop on purpose: it is far faster than the network feeding it.

    Use it as an async context manager (or call :meth:`aclose`) so an
    abandoned download releases its connection.
    """

    def __init__(
        self, repo: Repository, desc: Descriptor, offset: int, hasher: Hasher | None, *, verify: bool = True
    ) -> None:
        self.repository = repo
        self.descriptor = desc
        self.offset = offset
        self.position = offset
        self.resumes = 0  # Range requests made after a break
        self.endpoint: Endpoint | None = None
        self._hasher: Hasher | None = (
            hasher if hasher is not None else (hasher_for(desc.digest) if offset == 0 and verify else None)
        )
        self._resp: aiohttp.ClientResponse | None = None
        self._skip = 0
        self._stalls = 0
        self._stall_position = -1
        self._done = False
        self._verified = False

    @property
    def _what(self) -> str:
        return f"blob {self.descriptor.digest}"

    async def open(self) -> None:
        """(Re)start the download at ``position``."""
        if self.position >= self.descriptor.size:
            return
        headers = {"Accept-Encoding": "identity"}  # bytes as stored: ranges and digests refer to them
        if self.position:
            headers["Range"] = f"bytes={self.position}-"
        resp, ep = await self.repository.request(
            "GET", "blobs", self.descriptor.digest, capability="pull", headers=headers,
            auto_decompress=False, what=self._what,
        )  # fmt: skip
        self.endpoint = ep
        self._skip = 0
        remaining = self.descriptor.size - self.position
        if resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != self.position:
                resp.release()
                raise FailedPrecondition(
                    f"{self._what}: {ep.host} answered a request from byte {self.position} with "
                    f"Content-Range {resp.headers.get('Content-Range')!r} ({self.repository.image})"
                )
        elif self.position:  # 200: the whole blob, the range ignored
            self._skip = self.position
            remaining = self.descriptor.size
        if resp.content_length is not None and resp.content_length != remaining:
            resp.release()
            raise FailedPrecondition(
                f"{self._what}: size mismatch: expected {remaining} more bytes, {ep.host} announced "
                f"{resp.content_length} ({self.repository.image})"
            )
        self._resp = resp

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._done:
                raise StopAsyncIteration
            if self._resp is None:
                if self.position < self.descriptor.size:
                    await self.open()
                if self._resp is None:  # nothing left to fetch
                    self._finish()
                    raise StopAsyncIteration
            resp = self._resp
            try:
                chunk = await resp.content.read(CHUNK_SIZE)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
                await self._broken(_describe(exc))
                continue
            if not chunk:
                resp.release()
                self._resp = None
                if self.position < self.descriptor.size:
                    await self._broken("connection closed early")
                    continue
                self._finish()
                raise StopAsyncIteration
            if self._skip:
                dropped = min(self._skip, len(chunk))
                self._skip -= dropped
                chunk = chunk[dropped:]
                if not chunk:
                    continue
            if self.position + len(chunk) > self.descriptor.size:
                self._close()
                raise FailedPrecondition(
                    f"{self._what}: size mismatch: more than the expected {self.descriptor.size} bytes "
                    f"({self.repository.image}, from {self.endpoint.url if self.endpoint else '?'})"
                )
            if self._hasher is not None:
                self._hasher.update(chunk)
            self.position += len(chunk)
            return chunk

    async def _broken(self, reason: str) -> None:
        """The connection broke at ``position``: wait if it keeps breaking there, then resume."""
        self._close()
        if self.position != self._stall_position:
            self._stalls, self._stall_position = 0, self.position
        self._stalls += 1
        retry = self.repository.client.retry
        host = self.endpoint.host if self.endpoint else self.repository.reference.domain
        if self._stalls > retry.attempts:
            self._done = True
            raise Unavailable(
                f"{self._what}: download from {host} broke off {self._stalls} times at byte "
                f"{self.position} of {self.descriptor.size}: {reason} ({self.repository.image})"
            )
        log.info(
            "registry.blob_resume", image=self.repository.image, digest=self.descriptor.digest, host=host,
            position=self.position, size=self.descriptor.size, reason=reason,
        )  # fmt: skip
        if self._stalls > 1:
            await asyncio.sleep(retry.delay(self._stalls - 1))
        self.resumes += 1
        await self.open()

    def _finish(self) -> None:
        self._done = True
        if self.position != self.descriptor.size:
            raise FailedPrecondition(
                f"{self._what}: size mismatch: expected {self.descriptor.size} bytes, got {self.position} "
                f"({self.repository.image})"
            )
        if self._hasher is None:
            return
        actual = f"{self.descriptor.digest.partition(':')[0]}:{self._hasher.hexdigest()}"
        if actual != self.descriptor.digest:
            raise FailedPrecondition(
                f"{self._what}: digest mismatch: expected {self.descriptor.digest}, got {actual} "
                f"({self.repository.image}, from {self.endpoint.url if self.endpoint else '?'})"
            )
        self._verified = True

    @property
    def verified(self) -> bool:
        """True once the stream ended with its digest checked (False if it could only check the size)."""
        return self._verified

    def _close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    async def aclose(self) -> None:
        self._done = True
        self._close()

    async def __aenter__(self) -> BlobStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
