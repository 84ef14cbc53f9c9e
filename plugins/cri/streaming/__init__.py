"""The CRI streaming server (exec, attach, port-forward over SPDY/3.1 and WebSocket).

:class:`~.server.StreamingServer` is what the CRI plugin starts; it runs requests
through a :class:`~.backend.StreamBackend` (:class:`~.backend.TaskBackend` over
berth's tasks in production). Modules: :mod:`.tokens` (single-use URL tokens),
:mod:`.spdy` and :mod:`.websocket` (upgrades and stream wiring), :mod:`.exec`,
:mod:`.attach`, :mod:`.portforward` (the handlers), :mod:`.streams` (the
transport-neutral stdio a backend sees), :mod:`.fifo`, :mod:`.crilog`,
:mod:`.netnsdial` (what the task backend is made of).
"""

from plugins.cri.streaming.backend import StreamBackend, TaskBackend
from plugins.cri.streaming.server import StreamingServer
from plugins.cri.streaming.streams import ProcessIO

__all__ = ["ProcessIO", "StreamBackend", "StreamingServer", "TaskBackend"]
