"""Push test images to a registry and read them back, with aiohttp (and skopeo to cross-check).

:class:`RegistryClient` speaks just enough of the OCI distribution API for
tests: HEAD a blob, monolithic upload (``POST /v2/<name>/blobs/uploads/``
then ``PUT <location>&digest=``), ``PUT`` a manifest with its media type,
``GET`` manifests, blobs and tags. It follows the ``WWW-Authenticate``
challenge flow: ``Basic`` (send the credentials) and ``Bearer`` (fetch a
token from the realm for the challenged scope, then retry).

:func:`push_image` pushes a built :class:`~tests.support.oci.Image`: all
blobs first, then child manifests by digest, then the top (manifest or
index) by tag, so the registry never sees a reference to missing content.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from tests.support.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
)

MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(RuntimeError):
    def __init__(self, what: str, status: int, body: bytes) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:300]!r}")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="r",service="s",scope="x"`` -> ("bearer", {"realm": "r", ...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


class RegistryClient:
    """A session against one registry (``http://127.0.0.1:port``); use ``async with``."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.username = username
        self.password = password
        self._session: aiohttp.ClientSession | None = None
        self._basic = False
        self._tokens: dict[str, str] = {}
        self.token_fetches = 0

    async def __aenter__(self) -> RegistryClient:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("RegistryClient: use it as `async with RegistryClient(...)`")
        return self._session

    def _basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def _auth(self, scope: str) -> dict[str, str]:
        if scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self._basic and self.username is not None:
            return {"Authorization": self._basic_header()}
        return {}

    async def _fetch_token(self, params: Mapping[str, str], scope: str) -> None:
        # Ask for what this request needs (a HEAD before an upload is challenged for
        # pull only, but the token is cached for the upload that follows).
        query = {"service": params.get("service", "")}
        if scope or params.get("scope"):
            query["scope"] = scope or params["scope"]
        headers = {"Authorization": self._basic_header()} if self.username is not None else {}
        async with self.session.get(params["realm"], params=query, headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RegistryError(f"token from {params['realm']}", resp.status, body)
        self.token_fetches += 1
        value = json.loads(body)
        self._tokens[scope] = value.get("token") or value["access_token"]

    async def request(
        self,
        method: str,
        path: str,
        *,
        scope: str = "",
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        """One request (``path`` under the registry, or an absolute URL), answering one auth challenge."""
        url = URL(path, encoded=True) if "://" in path else URL(self.url + path, encoded=True)
        for attempt in range(2):
            async with self.session.request(
                method, url, headers={**(headers or {}), **self._auth(scope)}, data=data
            ) as resp:
                reply = Reply(resp.status, dict(resp.headers), await resp.read())
            if reply.status != 401 or attempt == 1:
                return reply
            scheme, params = parse_challenge(reply.headers.get("WWW-Authenticate", ""))
            if scheme == "basic" and self.username is not None and not self._basic:
                self._basic = True
            elif scheme == "bearer" and "realm" in params:
                await self._fetch_token(params, scope)
            else:
                return reply
        raise AssertionError("unreachable")

    # -- push ----------------------------------------------------------------

    async def push_blob(self, name: str, digest: str, data: bytes) -> bool:
        """Upload unless the registry has it; True when uploaded."""
        scope = f"repository:{name}:pull,push"
        head = await self.request("HEAD", f"/v2/{name}/blobs/{digest}", scope=scope)
        if head.status == 200:
            return False
        start = await self.request("POST", f"/v2/{name}/blobs/uploads/", scope=scope)
        if start.status != 202:
            raise RegistryError(f"start upload of {digest} to {name}", start.status, start.body)
        location = str(URL(self.url).join(URL(start.headers["Location"], encoded=True)))
        sep = "&" if "?" in location else "?"
        put = await self.request(
            "PUT",
            f"{location}{sep}digest={quote(digest, safe='')}",
            scope=scope,
            headers={"Content-Type": "application/octet-stream"},
            data=data,
        )
        if put.status != 201:
            raise RegistryError(f"upload of {digest} to {name}", put.status, put.body)
        return True

    async def push_manifest(self, name: str, ref: str, media_type: str, data: bytes) -> str:
        """PUT a manifest or index under ``ref`` (tag or digest); returns the registry's digest."""
        reply = await self.request(
            "PUT",
            f"/v2/{name}/manifests/{ref}",
            scope=f"repository:{name}:pull,push",
            headers={"Content-Type": media_type},
            data=data,
        )
        if reply.status != 201:
            raise RegistryError(f"manifest {name}:{ref}", reply.status, reply.body)
        return reply.headers.get("Docker-Content-Digest", "")

    async def push_image(self, name: str, tag: str, image: Image) -> str:
        """Push every blob, child manifests by digest, then ``image.top`` as ``name:tag``."""
        for m in image.manifests:
            for digest, blob in m.blobs().items():
                await self.push_blob(name, digest, blob.data)
        if image.is_index:
            for m in image.manifests:
                await self.push_manifest(name, m.digest, m.media_type, m.manifest.data)
        return await self.push_manifest(name, tag, image.media_type, image.top.data)

    # -- read ----------------------------------------------------------------

    async def get_manifest(self, name: str, ref: str, accept: str = MANIFEST_ACCEPT) -> Reply:
        reply = await self.request(
            "GET", f"/v2/{name}/manifests/{ref}", scope=f"repository:{name}:pull", headers={"Accept": accept}
        )
        if reply.status != 200:
            raise RegistryError(f"manifest {name}:{ref}", reply.status, reply.body)
        return reply

    async def get_blob(self, name: str, digest: str) -> bytes:
        reply = await self.request("GET", f"/v2/{name}/blobs/{digest}", scope=f"repository:{name}:pull")
        if reply.status != 200:
            raise RegistryError(f"blob {name}@{digest}", reply.status, reply.body)
        return reply.body

    async def tags(self, name: str) -> list[str]:
        reply = await self.request("GET", f"/v2/{name}/tags/list", scope=f"repository:{name}:pull")
        if reply.status != 200:
            raise RegistryError(f"tags of {name}", reply.status, reply.body)
        return list(reply.json().get("tags") or [])


async def push_image(
    url: str, name: str, tag: str, image: Image, username: str | None = None, password: str | None = None
) -> str:
    """Push ``image`` as ``name:tag`` to the registry at ``url``; returns the top digest."""
    async with RegistryClient(url, username, password) as client:
        return await client.push_image(name, tag, image)


def push_image_sync(
    url: str, name: str, tag: str, image: Image, username: str | None = None, password: str | None = None
) -> str:
    """:func:`push_image` for synchronous code; its own loop on a thread, so it works inside a loop too."""
    result: list[str] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(push_image(url, name, tag, image, username, password)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            error.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


# -- skopeo ----------------------------------------------------------------------


def skopeo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run Debian's skopeo; raises with its stderr when it fails."""
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _creds(username: str | None, password: str | None) -> list[str]:
    return ["--creds", f"{username}:{password}"] if username is not None else ["--no-creds"]


def skopeo_inspect(
    ref: str, raw: bool = False, username: str | None = None, password: str | None = None
) -> Any:
    """``skopeo inspect`` (``docker://host/name:tag``, ``oci:dir:ref``, ``oci-archive:path:ref``), parsed."""
    args = ["inspect"]
    if ref.startswith("docker://"):
        args += ["--tls-verify=false", *_creds(username, password)]
    if raw:
        args.append("--raw")
    return json.loads(skopeo(*args, ref).stdout)


def skopeo_copy(
    src: str, dest: str, username: str | None = None, password: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy --all`` (every platform, blobs as they are) between any two transports."""
    args = ["copy", "--all", "--preserve-digests", "--quiet"]
    if src.startswith("docker://"):
        args += ["--src-tls-verify=false"]
    if dest.startswith("docker://"):
        args += ["--dest-tls-verify=false", *(["--dest-creds", f"{username}:{password}"] if username else [])]
    return skopeo(*args, src, dest)
