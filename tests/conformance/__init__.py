"""Conformance suites of daemon.testsuite run against the built-in plugins."""
