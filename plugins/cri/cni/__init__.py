"""Running CNI plugins by the CNI specification (1.0), as libcni does.

* :mod:`.config` finds the network configuration in a conf dir,
* :mod:`.invoke` runs one plugin binary with the ``CNI_*`` environment,
* :mod:`.result` parses what ADD returns (interfaces, IPs, routes, DNS),
* :mod:`.cache` keeps each ADD result so DEL after a restart sees it,
* :mod:`.network` puts them together: :class:`~.network.CniNetwork`.
"""
