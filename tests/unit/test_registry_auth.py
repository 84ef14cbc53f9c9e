"""WWW-Authenticate parsing and the token flow of the registry client, against a scripted token server."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from urllib.parse import parse_qs, urlsplit

import pytest

from daemon.errors import FailedPrecondition, PermissionDenied
from plugins.images.registry.auth import Authorizer, Challenge, TokenUnavailable, parse_www_authenticate
from plugins.images.registry.hosts import Credentials, Endpoint

# -- parsing ------------------------------------------------------------------------


def test_docker_hub_bearer_challenge() -> None:
    header = (
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert parse_www_authenticate(header) == [
        Challenge(
            "bearer",
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/busybox:pull",
            },
        )
    ]


def test_basic_and_case_and_spacing() -> None:
    assert parse_www_authenticate('BASIC  Realm = "Registry Realm"') == [
        Challenge("basic", {"realm": "Registry Realm"})
    ]
    assert parse_www_authenticate("Basic realm=plain") == [Challenge("basic", {"realm": "plain"})]


def test_commas_and_escapes_in_quoted_values() -> None:
    header = r'Bearer realm="https://a/token",scope="repository:a:pull,push",error="say \"hi\", ok"'
    (challenge,) = parse_www_authenticate(header)
    assert challenge.params == {
        "realm": "https://a/token",
        "scope": "repository:a:pull,push",
        "error": 'say "hi", ok',
    }


def test_several_challenges_in_one_value_and_across_values() -> None:
    found = parse_www_authenticate(
        ['Basic realm="r1", Bearer realm="https://t/x",service="s"', "Negotiate abc=="]
    )
    assert [c.scheme for c in found] == ["basic", "bearer", "negotiate"]
    assert found[1].params == {"realm": "https://t/x", "service": "s"}
    assert found[2].params == {}


@pytest.mark.parametrize(
    "junk", ["", ",,,", "=", '"', "Bearer", "Bearer realm", 'Bearer realm="unterminated']
)
def test_malformed_headers_do_not_raise(junk: str) -> None:
    for challenge in parse_www_authenticate(junk):
        assert isinstance(challenge.scheme, str)


def test_challenge_str() -> None:
    assert str(Challenge("basic", {"realm": "x"})) == 'Basic realm="x"'


# -- the flow -----------------------------------------------------------------------

REALM = "https://auth.example/token"
BEARER = [Challenge("bearer", {"realm": REALM, "service": "reg", "scope": "repository:app:pull"})]


class TokenServer:
    """Scripted answers of a token endpoint; records what it was asked."""

    def __init__(self, status: int = 200, body: object = None) -> None:
        self.status = status
        self.body = body
        self.calls: list[tuple[str, str, dict[str, str], dict[str, str] | None]] = []
        self.counter = 0
        self.gate: asyncio.Event | None = None

    async def __call__(
        self, method: str, url: str, ep: Endpoint, headers: Mapping[str, str], form: Mapping[str, str] | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        self.calls.append((method, url, dict(headers), dict(form) if form is not None else None))
        if self.gate is not None:
            await self.gate.wait()
        self.counter += 1
        body = self.body if self.body is not None else {"token": f"t{self.counter}", "expires_in": 300}
        return self.status, {}, json.dumps(body).encode() if not isinstance(body, bytes) else body


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoint(creds: Credentials | None = None) -> Endpoint:
    return Endpoint("https", "reg.example", credentials=creds)


async def challenged(
    auth: Authorizer,
    ep: Endpoint,
    scope: str = "repository:app:pull",
    *,
    challenges: list[Challenge] | None = None,
    rejected: str | None = None,
) -> str:
    return await auth.challenged(
        ep,
        scope,
        BEARER if challenges is None else challenges,
        rejected=rejected,
        image="reg.example/app:1",
        repository="app",
    )


async def test_anonymous_bearer_token_is_fetched_cached_and_reused() -> None:
    server = TokenServer()
    auth = Authorizer(server)
    ep = endpoint()
    assert await auth.authorization(ep, "repository:app:pull", image="i", repository="app") is None
    assert await challenged(auth, ep) == "Bearer t1"
    method, url, headers, form = server.calls[0]
    assert method == "GET" and form is None and "Authorization" not in headers
    assert parse_qs(urlsplit(url).query) == {"service": ["reg"], "scope": ["repository:app:pull"]}
    # later requests send the token at once; another scope gets its own
    assert await auth.authorization(ep, "repository:app:pull", image="i", repository="app") == "Bearer t1"
    assert await auth.authorization(ep, "repository:other:pull", image="i", repository="other") == "Bearer t2"
    assert len(server.calls) == 2


async def test_credentials_go_to_the_token_server_with_basic_auth() -> None:
    server = TokenServer(body={"access_token": "oauth-style"})
    auth = Authorizer(server)
    ep = endpoint(Credentials("me", "pw"))
    assert await challenged(auth, ep, scope="repository:team/app:pull") == "Bearer oauth-style"
    _, url, headers, _ = server.calls[0]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"me:pw").decode()
    query = parse_qs(urlsplit(url).query)
    assert query["scope"] == ["repository:team/app:pull", "repository:app:pull"]  # ours, then the challenge's
    assert query["account"] == ["me"]


async def test_identity_token_uses_the_oauth2_refresh_grant() -> None:
    server = TokenServer(body={"access_token": "a1", "expires_in": 60})
    auth = Authorizer(server)
    assert await challenged(auth, endpoint(Credentials(identity_token="refresh-me"))) == "Bearer a1"
    method, url, _, form = server.calls[0]
    assert (method, url) == ("POST", REALM)
    assert form == {
        "grant_type": "refresh_token",
        "refresh_token": "refresh-me",
        "service": "reg",
        "scope": "repository:app:pull",
        "client_id": "berth",
    }


async def test_tokens_expire() -> None:
    clock = Clock()
    server = TokenServer(body=None)
    server.body = {"token": "short", "expires_in": 100}
    auth = Authorizer(server, clock=clock)
    ep = endpoint()
    await challenged(auth, ep)
    clock.now += 85  # before expiry minus the margin (10 s)
    assert await auth.authorization(ep, "repository:app:pull", image="i", repository="app") == "Bearer short"
    clock.now += 10
    server.body = {"token": "fresh", "expires_in": 100}
    assert await auth.authorization(ep, "repository:app:pull", image="i", repository="app") == "Bearer fresh"


async def test_a_rejected_token_is_replaced() -> None:
    server = TokenServer()
    auth = Authorizer(server)
    ep = endpoint()
    first = await challenged(auth, ep)
    assert await challenged(auth, ep, rejected=first) == "Bearer t2"


async def test_concurrent_requests_share_one_token_fetch() -> None:
    server = TokenServer()
    server.gate = asyncio.Event()
    auth = Authorizer(server)
    ep = endpoint()
    tasks = [asyncio.create_task(challenged(auth, ep)) for _ in range(5)]
    await asyncio.sleep(0)
    server.gate.set()
    assert set(await asyncio.gather(*tasks)) == {"Bearer t1"}
    assert len(server.calls) == 1


async def test_basic_challenge() -> None:
    auth = Authorizer(TokenServer())
    ep = endpoint(Credentials("me", "pw"))
    basic = [Challenge("basic", {"realm": "r"})]
    header = await challenged(auth, ep, challenges=basic)
    assert header == "Basic " + base64.b64encode(b"me:pw").decode()
    assert await auth.authorization(ep, "repository:x:pull", image="i", repository="x") == header
    with pytest.raises(PermissionDenied) as err:
        await challenged(auth, endpoint(), challenges=basic)
    assert str(err.value) == (
        'reg.example/app:1: registry reg.example, repository app: authentication required (Basic realm="r") '
        "and no credentials are configured for reg.example"
    )


async def test_static_registry_token_needs_no_challenge() -> None:
    auth = Authorizer(TokenServer())
    ep = endpoint(Credentials(registry_token="static"))
    assert await auth.authorization(ep, "repository:app:pull", image="i", repository="app") == "Bearer static"


async def test_token_server_refusals() -> None:
    with pytest.raises(PermissionDenied, match=r"refused anonymous access \(HTTP 401\) and no credentials"):
        await challenged(Authorizer(TokenServer(status=401)), endpoint())
    with pytest.raises(
        PermissionDenied, match=r"registry reg.example, repository app: .* rejected the credentials of 'me'"
    ):
        await challenged(Authorizer(TokenServer(status=401)), endpoint(Credentials("me", "bad")))
    with pytest.raises(TokenUnavailable, match="answered HTTP 503"):
        await challenged(Authorizer(TokenServer(status=503)), endpoint())
    with pytest.raises(FailedPrecondition, match="sent no token"):
        await challenged(Authorizer(TokenServer(body={"nothing": 1})), endpoint())
    with pytest.raises(FailedPrecondition, match="sent no token"):
        await challenged(Authorizer(TokenServer(body=b"<html>")), endpoint())


async def test_unusable_challenges() -> None:
    with pytest.raises(PermissionDenied, match="no supported challenge: Negotiate"):
        await challenged(Authorizer(TokenServer()), endpoint(), challenges=[Challenge("negotiate")])
    with pytest.raises(PermissionDenied, match="no WWW-Authenticate challenge"):
        await challenged(Authorizer(TokenServer()), endpoint(), challenges=[])
    with pytest.raises(PermissionDenied, match="no usable realm"):
        await challenged(
            Authorizer(TokenServer()), endpoint(), challenges=[Challenge("bearer", {"realm": "/x"})]
        )
