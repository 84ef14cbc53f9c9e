"""A fake OCI distribution registry with fault knobs, for the pull client's failure paths.

It serves images from memory (``add_image``) over the read half of the
distribution API (``/v2/``, manifests and blobs by tag or digest, HEAD and
GET, ``Range: bytes=N-`` with 206) and can be told to misbehave:

* ``corrupt(digest)``: serve the blob with its last byte flipped (same size,
  wrong digest);
* ``drop_after(digest, n, times)``: send ``n`` bytes of the body, then close
  the connection, for the next ``times`` requests of that blob (a client
  resumes with ``Range``);
* ``fail(match, times, status)``: answer ``status`` (503 by default) to the
  next ``times`` requests whose path contains ``match`` (``/token`` included);
* ``require_basic(user, password)`` / ``require_bearer(user, password)``:
  answer 401 with a ``Basic`` or ``Bearer`` challenge; the bearer realm is this
  server's own ``/token`` endpoint (GET with basic credentials, or the OAuth2
  POST form), which hands out opaque tokens.

``clear_faults()`` repairs it again (corrupt, drop and fail knobs reset;
auth stays).

Every request is recorded (``records``) and counted (``hits``). The server
runs on its own thread (see :mod:`tests.support.aioserver`) on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from tests.support.aioserver import ThreadedApp
from tests.support.oci import Image, sha256_digest

SERVICE = "fake-registry"
_NAME = r"[a-z0-9]+(?:[._/-][a-z0-9]+)*"
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Record:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int


@dataclass
class _Failure:
    match: str
    remaining: int
    status: int


@dataclass
class _Repo:
    tags: dict[str, str] = field(default_factory=dict)
    manifests: set[str] = field(default_factory=set)
    blobs: set[str] = field(default_factory=set)


class FakeRegistry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[Record] = []
        self.hits: Counter[str] = Counter()
        self.token_requests: list[dict[str, str]] = []
        self._content: dict[str, tuple[str, bytes]] = {}  # digest -> (media type, data)
        self._repos: dict[str, _Repo] = {}
        self._corrupt: set[str] = set()
        self._drops: dict[str, list[int]] = {}  # digest -> [after n bytes, times left]
        self._failures: list[_Failure] = []
        self._auth: tuple[Literal["basic", "bearer"], str, str] | None = None
        self._tokens: set[str] = set()
        app = web.Application()
        app.router.add_route("*", "/token", self._token)
        app.router.add_route("*", "/v2/", self._base)
        app.router.add_route("*", "/v2/{name:" + _NAME + "}/manifests/{ref}", self._manifest)
        app.router.add_route("*", "/v2/{name:" + _NAME + "}/blobs/{digest}", self._blob)
        self.server = ThreadedApp(app)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> FakeRegistry:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> FakeRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``127.0.0.1:port``: the registry host of a reference, e.g. ``f"{fake.address}/busybox:1"``."""
        return self.server.address

    @property
    def url(self) -> str:
        return self.server.url

    # -- content -------------------------------------------------------------

    def add_image(self, name: str, tag: str | None, image: Image) -> None:
        """Serve ``image`` as ``name`` (by digest, and by ``tag`` when given)."""
        with self.lock:
            repo = self._repos.setdefault(name, _Repo())
            for digest, blob in image.blobs().items():
                self._content[digest] = (blob.media_type, blob.data)
                is_manifest = digest == image.digest or any(m.digest == digest for m in image.manifests)
                (repo.manifests if is_manifest else repo.blobs).add(digest)
            if tag is not None:
                repo.tags[tag] = image.digest

    def add_blob(self, name: str, data: bytes, media_type: str = "application/octet-stream") -> str:
        digest = sha256_digest(data)
        with self.lock:
            self._content[digest] = (media_type, data)
            self._repos.setdefault(name, _Repo()).blobs.add(digest)
        return digest

    # -- knobs ---------------------------------------------------------------

    def corrupt(self, digest: str) -> None:
        with self.lock:
            self._corrupt.add(digest)

    def drop_after(self, digest: str, nbytes: int, times: int = 1) -> None:
        with self.lock:
            self._drops[digest] = [nbytes, times]

    def fail(self, match: str, times: int, status: int = 503) -> None:
        """The next ``times`` requests whose path contains ``match`` get ``status``."""
        with self.lock:
            self._failures.append(_Failure(match, times, status))

    def clear_faults(self) -> None:
        """Repair the registry: no corrupt blob, dropped connection or injected failure is left.

        Auth requirements stay (they are the registry's policy, not a
        fault), and so do the records and counts.
        """
        with self.lock:
            self._corrupt.clear()
            self._drops.clear()
            self._failures.clear()

    def require_basic(self, username: str, password: str) -> None:
        with self.lock:
            self._auth = ("basic", username, password)

    def require_bearer(self, username: str, password: str) -> None:
        with self.lock:
            self._auth = ("bearer", username, password)

    def count(self, path_contains: str, method: str | None = None) -> int:
        """How many requests (of ``method``, or any) had ``path_contains`` in their path."""
        with self.lock:
            return sum(
                1 for r in self.records if path_contains in r.path and (method is None or r.method == method)
            )

    # -- handlers ------------------------------------------------------------

    def _record(self, request: web.Request, status: int) -> None:
        with self.lock:
            self.records.append(
                Record(
                    request.method,
                    request.path,
                    request.headers.get("Range"),
                    request.headers.get("Authorization"),
                    status,
                )
            )
            self.hits[f"{request.method} {request.path}"] += 1

    def _injected(self, request: web.Request) -> web.Response | None:
        with self.lock:
            for f in self._failures:
                if f.remaining > 0 and f.match in request.path:
                    f.remaining -= 1
                    return web.json_response(
                        {"errors": [{"code": "UNAVAILABLE", "message": "injected failure"}]}, status=f.status
                    )
        return None

    def _check(self, request: web.Request, scope: str) -> web.Response | None:
        """An early answer (injected failure or auth challenge), or None to serve."""
        if (failure := self._injected(request)) is not None:
            return failure
        with self.lock:
            auth = self._auth
            tokens = set(self._tokens)
        if auth is None:
            return None
        kind, user, password = auth
        given = request.headers.get("Authorization", "")
        if kind == "basic":
            if given == _basic(user, password):
                return None
            challenge = f'Basic realm="{SERVICE}"'
        else:
            if given.startswith("Bearer ") and given.removeprefix("Bearer ") in tokens:
                return None
            challenge = f'Bearer realm="{self.url}/token",service="{SERVICE}"'
            if scope:
                challenge += f',scope="{scope}"'
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            status=401,
            headers={"WWW-Authenticate": challenge},
        )

    async def _token(self, request: web.Request) -> web.Response:
        if (failure := self._injected(request)) is not None:
            self._record(request, failure.status)
            return failure
        with self.lock:
            auth = self._auth
        if request.method == "POST":
            form = await request.post()
            params = {k: str(v) for k, v in form.items()}
            ok = auth is not None and (params.get("username"), params.get("password")) == auth[1:]
        else:
            params = {k: ",".join(request.query.getall(k)) for k in request.query}
            ok = auth is not None and request.headers.get("Authorization") == _basic(auth[1], auth[2])
        with self.lock:
            self.token_requests.append({"method": request.method, **params})
        if not ok or params.get("service") != SERVICE:
            self._record(request, 401)
            return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
        token = secrets.token_hex(16)
        with self.lock:
            self._tokens.add(token)
        self._record(request, 200)
        return web.json_response({"token": token, "access_token": token, "expires_in": 300})

    async def _base(self, request: web.Request) -> web.Response:
        early = self._check(request, "")
        resp = early or web.json_response({}, headers={"Docker-Distribution-Api-Version": "registry/2.0"})
        self._record(request, resp.status)
        return resp

    def _lookup(self, name: str, ref: str, manifest: bool) -> tuple[str, str, bytes] | None:
        with self.lock:
            repo = self._repos.get(name)
            if repo is None:
                return None
            digest = repo.tags.get(ref, ref) if manifest else ref
            if digest not in (repo.manifests if manifest else repo.blobs):
                return None
            media_type, data = self._content[digest]
        return digest, media_type, data

    def _find(self, request: web.Request, manifest: bool) -> tuple[str, str, bytes] | web.Response:
        """The digest, media type and bytes a GET or HEAD names, or the answer to send instead.

        Auth and fault checks come first (``_check``); every early answer is recorded here.
        """
        name = request.match_info["name"]
        ref = request.match_info["ref" if manifest else "digest"]
        early = self._check(request, f"repository:{name}:pull")
        if early is not None:
            self._record(request, early.status)
            return early
        found = self._lookup(name, ref, manifest) if request.method in ("GET", "HEAD") else None
        if found is None:
            self._record(request, 404)
            if manifest:
                return _not_found("MANIFEST_UNKNOWN", f"{name}:{ref}")
            return _not_found("BLOB_UNKNOWN", ref)
        return found

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        found = self._find(request, manifest=True)
        if isinstance(found, web.Response):
            return found
        digest, media_type, data = found
        headers = {"Docker-Content-Digest": digest, "Content-Type": media_type}
        self._record(request, 200)
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(data))})
        return web.Response(body=data, headers=headers)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        found = self._find(request, manifest=False)
        if isinstance(found, web.Response):
            return found
        digest, _, data = found
        with self.lock:
            if digest in self._corrupt and data:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
        total = len(data)
        headers = {
            "Docker-Content-Digest": digest,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        start, end, status = 0, total - 1, 200
        if (range_header := request.headers.get("Range")) is not None:
            m = _RANGE.match(range_header.strip())
            if m is None or int(m.group(1)) >= total:
                self._record(request, 416)
                return web.Response(status=416, headers={"Content-Range": f"bytes */{total}"})
            start = int(m.group(1))
            end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        body = data[start : end + 1]
        headers["Content-Length"] = str(len(body))
        self._record(request, status)
        if request.method == "HEAD":
            return web.Response(status=status, headers=headers)
        drop: int | None = None
        with self.lock:
            plan = self._drops.get(digest)
            if plan is not None and plan[1] > 0:
                plan[1] -= 1
                drop = plan[0]
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if drop is not None and drop < len(body):
            await resp.write(body[:drop])
            if request.transport is not None:
                request.transport.close()  # flushes the n bytes, then the client sees a short body
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _not_found(code: str, what: str) -> web.Response:
    return web.Response(
        status=404,
        text=json.dumps({"errors": [{"code": code, "message": f"unknown: {what}"}]}),
        content_type="application/json",
    )
