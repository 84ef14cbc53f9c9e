"""Configuration of the overlayfs snapshotter: ``[plugins."berth.snapshotter.v1.overlayfs"]``."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Options the snapshotter computes itself for every mount.
RESERVED_OPTIONS = ("lowerdir", "upperdir", "workdir")


@dataclass
class OverlayConfig:
    """Snapshots as overlayfs layers, stacked by the kernel; skipped where overlay cannot mount."""

    mount_options: list[str] = field(
        default_factory=list,
        metadata={
            "doc": 'Extra options added to every overlay mount, e.g. ["volatile"] or ["metacopy=on"]. '
            "lowerdir, upperdir and workdir are the snapshotter's own and cannot be set here."
        },
    )
    upperdir_label: bool = field(
        default=False,
        metadata={
            "doc": "Show each snapshot's upper directory in its info as the label \"containerd.io/snapshot/"
            'overlay.upperdir" (as containerd does), for tools that read layers directly.'
        },
    )
    sync_remove: bool = field(
        default=False,
        metadata={
            "doc": "Delete a snapshot's files during remove itself instead of at the next cleanup "
            "(removes get slower, disk space comes back sooner)."
        },
    )

    def validate(self) -> None:
        for option in self.mount_options:
            name = option.split("=", 1)[0]
            if name in RESERVED_OPTIONS:
                raise ValueError(f"mount_options: {name} is set by the snapshotter itself, not by config")
            if not option or "," in option:
                raise ValueError(f"mount_options: {option!r}: one option per list item, non-empty, no ','")
