"""(being written: the containerd.services.snapshots.v1 service plugin lands here)."""
