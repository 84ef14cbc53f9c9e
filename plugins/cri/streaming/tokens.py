"""Single-use tokens for streaming URLs: what an Exec/Attach/PortForward RPC hands kubelet.

The RPC validates the request, stores it here under a fresh token and returns
``http://<addr>/<kind>/<token>``; the first HTTP request on that URL takes the
stored request back out (:meth:`TokenCache.consume`), so a token works once.
As kubelet's request cache: tokens are unguessable (128 random bits,
``secrets.token_urlsafe``), expire after ``ttl`` seconds, and at most
``max_outstanding`` wait at any time (a flood of RPCs gets ResourceExhausted
instead of growing memory). Everything here is synchronous and O(expired).

The lifetime is kubelet's minute unless ``BERTH_CRI_STREAM_TOKEN_TTL``
(seconds) is set in berthd's environment (:func:`ttl_from_env`): that lets
an end-to-end test see a token expire without waiting a minute; it is not a
config option because nothing on a node has a reason to change it.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from daemon.errors import InvalidArgument, ResourceExhausted

DEFAULT_TTL = 60.0
DEFAULT_MAX_OUTSTANDING = 1000
TOKEN_BYTES = 16
TTL_ENV = "BERTH_CRI_STREAM_TOKEN_TTL"


def ttl_from_env(default: float = DEFAULT_TTL) -> float:
    """``$BERTH_CRI_STREAM_TOKEN_TTL`` in seconds (> 0), else ``default``; InvalidArgument if bad."""
    text = os.environ.get(TTL_ENV, "").strip()
    if not text:
        return default
    try:
        ttl = float(text)
    except ValueError:
        raise InvalidArgument(f"{TTL_ENV}={text!r}: not a number of seconds") from None
    if not ttl > 0 or not math.isfinite(ttl):
        raise InvalidArgument(f"{TTL_ENV}={text!r}: must be a positive number of seconds")
    return ttl


@dataclass(frozen=True)
class _Pending:
    kind: str
    request: object
    expires: float


class TokenCache:
    def __init__(
        self,
        *,
        ttl: float = DEFAULT_TTL,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_outstanding = max_outstanding
        self._clock = clock
        self._pending: OrderedDict[str, _Pending] = OrderedDict()  # insertion order = expiry order

    def __len__(self) -> int:
        self._prune()
        return len(self._pending)

    def mint(self, kind: str, request: object) -> str:
        """Store ``request`` for one use on a ``kind`` URL; the token. ResourceExhausted when full."""
        self._prune()
        if len(self._pending) >= self.max_outstanding:
            raise ResourceExhausted(
                f"streaming: {self.max_outstanding} requests already wait for a connection; try again later"
            )
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self._pending[token] = _Pending(kind, request, self._clock() + self.ttl)
        return token

    def consume(self, kind: str, token: str) -> object | None:
        """The request stored under ``token`` for ``kind``, removed; None if unknown, used or expired.

        A token presented on the wrong kind of URL is spent all the same: whoever
        holds it is probing.
        """
        self._prune()
        pending = self._pending.pop(token, None)
        if pending is None or pending.kind != kind:
            return None
        return pending.request

    def _prune(self) -> None:
        now = self._clock()
        while self._pending:
            token, pending = next(iter(self._pending.items()))
            if pending.expires > now:
                break
            del self._pending[token]
