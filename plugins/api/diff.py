"""(being written: the containerd.services.diff.v1 service plugin lands here)."""
