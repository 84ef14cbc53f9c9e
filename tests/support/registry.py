"""Debian's ``docker-registry`` (distribution 2.8) as a test process on 127.0.0.1.

Each :class:`Registry` has its own temporary directory (config, storage,
htpasswd, log) and a free port; ``start()`` returns once ``GET /v2/``
answers, ``stop()`` ends the process by PID (SIGTERM, then SIGKILL) and
removes the directory. Three auth modes: anonymous, ``htpasswd`` basic auth
(``users``), and bearer tokens from a :class:`~tests.support.tokenauth.TokenServer`.

The config is written as JSON, which is YAML too, so no YAML library is
needed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.process import stop_by_pid
from tests.support.tokenauth import TokenServer

DOCKER_REGISTRY = Path("/usr/bin/docker-registry")
READY_TIMEOUT = 15.0
START_ATTEMPTS = 4
#: The account the fixtures give authenticated registries (tests.support.fixtures).
USER = "berth"
PASSWORD = "s3cret-pw"
#: Never through a proxy from the environment: the registry is on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the child binds it a moment later; start() retries a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash (cost 4, the minimum: tests verify many requests) for an htpasswd file.

    docker-registry only accepts bcrypt entries. Python 3.11's ``crypt`` makes
    them through Debian's libxcrypt; failing that, ``htpasswd`` (Debian
    ``apache2-utils``) or the PyPI ``bcrypt`` package would do.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt

            hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
            if hashed and hashed.startswith("$2"):
                return hashed
        except (ImportError, OSError):
            pass
    with contextlib.suppress(ImportError):
        import bcrypt  # type: ignore[import-not-found, unused-ignore]

        return str(bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode())
    if shutil.which("htpasswd"):
        out = subprocess.run(
            ["htpasswd", "-nbBC", "4", "u", password], capture_output=True, text=True, check=True
        ).stdout
        return out.strip().partition(":")[2]
    raise RuntimeError("bcrypt: needs Python's crypt with libxcrypt, PyPI bcrypt, or Debian apache2-utils")


class Registry:
    """One docker-registry process. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        base: Path | None = None,
        *,
        users: Mapping[str, str] | None = None,
        token: TokenServer | None = None,
        binary: Path = DOCKER_REGISTRY,
    ) -> None:
        if users and token:
            raise ValueError("auth: choose basic users or a token server, not both")
        self._own_base = base is None
        self.base = base if base is not None else Path(tempfile.mkdtemp(prefix="berth-reg-", dir="/tmp"))
        self.users = dict(users or {})
        self.token = token
        self.binary = binary
        self.data_dir = self.base / "data"
        self.config_path = self.base / "config.yml"
        self.log_path = self.base / "registry.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:port``: the registry host of a reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.address, "secret": "berth-test-secret"},
        }
        if self.users:
            htpasswd = self.base / "htpasswd"
            htpasswd.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in sorted(self.users.items())))
            cfg["auth"] = {"htpasswd": {"realm": "berth-test", "path": str(htpasswd)}}
        elif self.token is not None:
            cfg["auth"] = {
                "token": {
                    "realm": self.token.realm,
                    "service": self.token.service,
                    "issuer": self.token.issuer,
                    "rootcertbundle": str(self.token.key.cert_path),
                }
            }
        return cfg

    def start(self) -> Registry:
        """Start on a free port and wait for ``GET /v2/``; retries when another process took the port."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(START_ATTEMPTS):
            self.port = free_port()
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.binary), "serve", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
                )
            if self._wait_ready():
                return self
            stop_by_pid(self.proc, grace=10)
            if "address already in use" not in self.log():
                break
        raise RuntimeError(f"docker-registry did not start:\n{self.log()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                with _OPENER.open(f"{self.url}/v2/", timeout=1):
                    return True
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop the process by PID and remove the directory this object created."""
        if self.proc is not None:
            stop_by_pid(self.proc, grace=10)
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Registry:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
