"""``python -m ktizo`` is ``ktizo``."""

from ktizo.cli import main

main()
