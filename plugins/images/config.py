"""The images plugin's config.toml table: ``[plugins."berth.images.v1.default"]``.

It is the registry client's table (:class:`~plugins.images.registry.config.RegistryConfig`:
``config_path``, ``hosts``, retries and timeouts) plus what the pull itself
decides: where layers are unpacked, how many download at once, which
platform is chosen from an index, and how long a pull's lease may outlive a
crashed daemon::

    [plugins."berth.images.v1.default"]
    snapshotter = "overlayfs"
    max_concurrent_downloads = 3
    config_path = "/etc/containerd/certs.d"

    [plugins."berth.images.v1.default".hosts."127.0.0.1:5000"]
    plain_http = true
"""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.config import doc
from daemon.errors import InvalidArgument
from daemon.metadata.validate import validate_identifier
from plugins.images.registry.config import RegistryConfig
from plugins.images.registry.platforms import parse_platform


@dataclass
class ImagesConfig(RegistryConfig):
    """Image pulls (registries, credentials, retries), unpacking, import and export."""

    snapshotter: str = field(
        default="overlayfs",
        metadata=doc(
            "Snapshotter (plugin id of a berth.snapshotter.v1) that pulls and imports unpack into, "
            "unless a request names another."
        ),
    )
    platform: str = field(
        default="",
        metadata=doc(
            'Platform chosen from multi-platform images (os/arch[/variant], e.g. "linux/arm64"). '
            "Empty: the host's (linux/amd64 on x86-64)."
        ),
    )
    max_concurrent_downloads: int = field(
        default=3,
        metadata=doc(
            "Layers of one pull downloaded at the same time (containerd's max_concurrent_downloads). "
            "Layers are unpacked in order while they download, whatever this is."
        ),
    )
    tee_backlog: int = field(
        default=4 << 20,
        metadata=doc(
            "Bytes of a layer that may arrive before the layer under it is unpacked and still be "
            "applied live from the download (beyond that, it is applied from the content store "
            "once downloaded). 0 turns live apply off (benchmarks compare with it)."
        ),
    )
    pull_lease_expiry: float = field(
        default=24 * 3600.0,
        metadata=doc(
            "Seconds the lease of a pull keeps what it fetched if the pull never finishes (berthd "
            "killed): a pull retried within that time reuses every verified blob and layer."
        ),
    )

    def validate(self) -> None:
        super().validate()
        try:
            validate_identifier("snapshotter", self.snapshotter)
            if self.platform:
                parse_platform(self.platform)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from None
        if self.max_concurrent_downloads < 1:
            raise ValueError(
                f"max_concurrent_downloads: expected at least 1, got {self.max_concurrent_downloads}"
            )
        if self.tee_backlog < 0:
            raise ValueError(f"tee_backlog: expected bytes >= 0, got {self.tee_backlog}")
        if self.pull_lease_expiry <= 0:
            raise ValueError(f"pull_lease_expiry: expected a number > 0, got {self.pull_lease_expiry}")
