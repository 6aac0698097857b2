"""The ``ktizo`` command: run the server and administer it from a shell, through the same services."""

from ktizo.cli.main import app, main

__all__ = ["app", "main"]
