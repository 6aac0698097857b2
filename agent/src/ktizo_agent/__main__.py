"""``python -m ktizo_agent`` is ``ktizo-agent``."""

from ktizo_agent.cli import main

if __name__ == "__main__":
    main()
