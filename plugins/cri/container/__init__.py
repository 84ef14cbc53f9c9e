"""CRI containers: the OCI spec of a ContainerConfig (:mod:`.specgen`), their lifecycle and exits
(:mod:`.manager`), stats (:mod:`.stats`) and the RuntimeService mixin (:mod:`.rpc`)."""
