"""berth-shim-runc-v2: the per-pod shim process (containerd shim v2 model, ttrpc)."""
