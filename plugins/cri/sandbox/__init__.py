"""CRI pod sandboxes: pinned namespaces, pod files, CNI, the optional infra process, their RPCs.

Modules: :mod:`.manager` (:class:`SandboxManager`: run/stop/remove/status/list/stats),
:mod:`.files` (hostname, hosts, resolv.conf, shm), :mod:`.infra` (the process holding a shared
PID namespace), :mod:`.validate` (input checks naming the field), :mod:`.views` (wire shapes),
:mod:`.stats` (cgroup metrics and netns counters), :mod:`.rpc` (the RuntimeService mixin).
"""
