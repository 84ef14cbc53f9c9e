"""The runc v2 runtime: OCI spec generation now; the plugin and shim come later (not registered yet)."""
