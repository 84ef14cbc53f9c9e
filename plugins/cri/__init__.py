"""The CRI plugin (kubelet's runtime.v1): for now only its groundwork.

``cni/`` runs CNI plugins by the CNI spec to give a pod its network;
``netns`` pins a pod's net/ipc/uts namespaces as bind-mounted files that
berth owns, so no pause container has to hold them. The plugin registration,
the gRPC services and the sandbox store come later and build on these.
"""
