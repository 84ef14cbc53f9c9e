"""(being written: the berth.services.gc service plugin lands here)."""
