"""Persistence: SQLAlchemy 2 models, the engine and its transactions, queries, and Alembic migrations."""

from ktizo.db.engine import Database

__all__ = ["Database"]
