"""(being written: the containerd.services.images.v1 service plugin lands here)."""
