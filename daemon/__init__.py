"""berth daemon core: config, plugin registry, event bus, metadata, API server."""

__version__ = "0.1.0"
