"""(being written: the berth.services.transfer service plugin lands here)."""
