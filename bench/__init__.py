"""Benchmarks: scripts that print figures side by side with a reference daemon (see bench/RESULTS.md)."""
