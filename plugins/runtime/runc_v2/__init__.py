"""The runc v2 runtime: the plugin (:mod:`.plugin`) and the shim (:mod:`.shim`).

This package module stays empty on purpose: every shim process imports it as
the parent of :mod:`.shim`, and a shim must not pay for the plugin's imports
(metadata, the task manager) in start-up time and resident memory.
"""
