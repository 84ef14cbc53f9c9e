"""(being written: see the plugin registration once it lands)."""
