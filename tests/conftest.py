"""Fixtures shared by every test folder (test images, registries)."""

pytest_plugins = ["tests.support.fixtures"]
