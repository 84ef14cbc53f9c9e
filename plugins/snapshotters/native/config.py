"""Configuration of the native snapshotter: ``[plugins."berth.snapshotter.v1.native"]``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NativeConfig:
    """Snapshots as full copies of their parent, bind-mounted; works on any filesystem."""

    reflink: bool = field(
        default=True,
        metadata={
            "doc": "Clone file data instead of copying it when the filesystem under the plugin root "
            "supports it (btrfs, XFS with reflink): instant and copy-on-write. Elsewhere, or when false, "
            "every byte is copied."
        },
    )
    sync_remove: bool = field(
        default=False,
        metadata={
            "doc": "Delete a snapshot's files during remove itself instead of at the next cleanup "
            "(removes get slower, disk space comes back sooner)."
        },
    )
