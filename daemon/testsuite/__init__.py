"""Conformance suites any implementation of daemon.protocols can run."""
