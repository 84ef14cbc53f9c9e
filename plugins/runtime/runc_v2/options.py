"""runc options for a task: the container's or the request's, always with berth's runc root and binary."""

from __future__ import annotations

import betterproto.lib.google.protobuf as pb

from daemon.errors import InvalidArgument
from daemon.metadata import TypedValue
from daemon.protocols import Opaque
from plugins.runtime.runc_v2.settings import Settings
from protos.containerd.runc.v1 import Options

OPTIONS_TYPE = "containerd.runc.v1.Options"


class RuncOptions:
    """Encodes the ``containerd.runc.v1.Options`` a shim's Create gets."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._default: bytes | None = None

    def resolve(self, *candidates: Opaque | TypedValue | None) -> pb.Any:
        """runc options: the container's, then the request's, with berth's runc root always.

        Without any (every CRI container) the answer is always the same: encoded once.
        """
        if all(c is None for c in candidates):
            if self._default is None:
                self._default = self._encode(Options())
            return pb.Any(type_url=OPTIONS_TYPE, value=self._default)
        opts = Options()
        for candidate in candidates:
            if candidate is not None and candidate.type_url.rsplit("/", 1)[-1] == OPTIONS_TYPE:
                try:
                    opts = Options().parse(candidate.value)
                except Exception as exc:  # betterproto raises assorted types
                    raise InvalidArgument(f"options: not a {OPTIONS_TYPE}: {exc}") from exc
        return pb.Any(type_url=OPTIONS_TYPE, value=self._encode(opts))

    def _encode(self, opts: Options) -> bytes:
        opts.root = str(self.settings.runc_root)
        if not opts.binary_name:
            opts.binary_name = self.settings.runc_binary
        opts.systemd_cgroup = opts.systemd_cgroup or self.settings.systemd_cgroup
        return bytes(opts)
