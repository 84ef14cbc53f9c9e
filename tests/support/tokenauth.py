"""A token server for Debian's docker-registry in ``auth: token`` mode.

The registry answers 401 with ``WWW-Authenticate: Bearer realm=...,
service=..., scope=...``; the client asks the realm for a token (basic
credentials, or anonymously) and retries with ``Authorization: Bearer``. The
registry verifies the token offline: an RS256 JWT whose ``x5c`` header holds a
certificate found in its ``rootcertbundle``, with ``iss``/``aud`` matching its
config and an ``access`` claim granting the repository actions.

Nothing beyond the standard library and the ``openssl`` CLI is needed: openssl
makes the key and the self-signed certificate once, and the RS256 signature
(RSASSA-PKCS1-v1_5 with SHA-256) is computed here from the key's numbers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.aioserver import ThreadedApp

SERVICE = "berth-test-registry"
ISSUER = "berth-test-issuer"
TOKEN_TTL = 300
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _der(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``."""
    tag, length = data[pos], data[pos + 1]
    start = pos + 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[start : start + n], "big")
        start += n
    return tag, start, start + length


def _der_children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    pos = start
    while pos < end:
        tag, s, e = _der(data, pos)
        out.append((tag, s, e))
        pos = e
    return out


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and its self-signed certificate (the registry's ``rootcertbundle``)."""

    key_path: Path
    cert_path: Path
    n: int
    d: int
    cert_der: bytes

    @classmethod
    def generate(cls, directory: Path, common_name: str = "berth-test-token") -> SigningKey:
        directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = directory / "token.key", directory / "token.crt"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                "-keyout", str(key_path), "-out", str(cert_path),
                "-subj", f"/CN={common_name}", "-days", "2",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        key_der = subprocess.run(
            ["openssl", "rsa", "-in", str(key_path), "-traditional", "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        # RSAPrivateKey ::= SEQUENCE { version, n, e, d, p, q, dp, dq, qinv }
        _, s, e = _der(key_der, 0)
        ints = [int.from_bytes(key_der[cs:ce], "big") for _, cs, ce in _der_children(key_der, s, e)]
        pem = cert_path.read_text()
        body = pem.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
        return cls(
            key_path, cert_path, n=ints[1], d=ints[3], cert_der=base64.b64decode("".join(body.split()))
        )

    def sign_rs256(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 over SHA-256 (JWS ``RS256``)."""
        k = (self.n.bit_length() + 7) // 8
        t = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
        return pow(int.from_bytes(em, "big"), self.d, self.n).to_bytes(k, "big")

    def jwt(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(dict(claims)).encode())}"
        return f"{signing_input}.{b64url(self.sign_rs256(signing_input.encode()))}"


def parse_scope(scope: str) -> tuple[str, str, list[str]]:
    """``repository:library/busybox:pull,push`` -> ("repository", "library/busybox", ["pull", "push"])."""
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """``GET /token?service=..&scope=..`` (basic credentials or none) and the OAuth2 ``POST /token`` form.

    Known users get every action they ask for; without credentials a client
    gets ``pull`` only, and only when ``anonymous_pull`` is set; wrong
    credentials get 401. Each request is recorded in ``requests``.
    """

    def __init__(
        self,
        key: SigningKey,
        users: Mapping[str, str],
        *,
        service: str = SERVICE,
        issuer: str = ISSUER,
        anonymous_pull: bool = False,
    ) -> None:
        self.key = key
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.anonymous_pull = anonymous_pull
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_route("*", "/token", self._token)
        self.server = ThreadedApp(app)

    def start(self) -> TokenServer:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def realm(self) -> str:
        return f"{self.server.url}/token"

    def issue(self, subject: str, scopes: list[str], anonymous: bool) -> str:
        access = []
        for scope in scopes:
            kind, name, actions = parse_scope(scope)
            granted = [a for a in actions if a == "pull"] if anonymous else actions
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + TOKEN_TTL,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        return self.key.jwt(claims)

    async def _token(self, request: web.Request) -> web.Response:
        user: str | None = None
        password: str | None = None
        if request.method == "POST":
            form = await request.post()
            service = str(form.get("service", ""))
            scopes = str(form.get("scope", "")).split()
            if form.get("grant_type") != "password":
                return web.json_response({"error": "unsupported_grant_type"}, status=400)
            user, password = str(form.get("username", "")), str(form.get("password", ""))
        else:
            service = request.query.get("service", "")
            scopes = [s for value in request.query.getall("scope", []) for s in value.split()]
            auth = request.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        with self.lock:
            self.requests.append(
                {"method": request.method, "service": service, "scopes": scopes, "user": user}
            )
        if service != self.service:
            return web.json_response({"error": f"unknown service {service!r}"}, status=400)
        if user is not None and self.users.get(user) != password:
            return web.json_response({"error": "invalid credentials"}, status=401)
        if user is None and not self.anonymous_pull:
            return web.json_response(
                {"error": "credentials required"},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="berth-test-token"'},
            )
        token = self.issue(user or "", scopes, anonymous=user is None)
        return web.json_response(
            {"token": token, "access_token": token, "expires_in": TOKEN_TTL, "issued_at": _now_iso()}
        )


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
