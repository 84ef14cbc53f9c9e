"""OCI runtime spec generation, shared by every client of the runtime.

containerd builds specs in its client (``ctr``, the CRI plugin); berth does the
same: ``berth run`` and the CRI plugin both build ``config.json`` with these
options before they create a container, so this lives in the core, not in a
plugin.
"""
