"""(being written: the containerd.services.content.v1 service plugin lands here)."""
