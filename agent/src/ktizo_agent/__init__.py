"""ktizo-agent: the host side of Ktizo's agent enrollment, from the first pinned contact to serving facts over mTLS."""

__version__ = "0.1.0"
