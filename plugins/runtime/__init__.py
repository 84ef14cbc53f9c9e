"""Container runtimes: the OCI runtime spec and (later) the runc v2 runtime plugin and its shim."""
