"""The database schema, for the CLI and the health checks: where it is, which revision it is at, upgrading it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from ktizo.db import Database, migrate
from ktizo.domain.errors import NotReady


def display_url(url: str) -> str:
    """A database URL fit for a terminal: without its password."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_file(url: str) -> Path | None:
    """The file an SQLite URL names (None for PostgreSQL, memory, or a URI filename left to SQLite)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    if parsed.database.startswith("file:"):
        return None
    return Path(parsed.database)


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    head: str | None
    known: bool  # this release knows the current revision (else a newer Ktizo upgraded the database)

    @property
    def is_current(self) -> bool:
        return self.current == self.head


class SchemaService:
    def __init__(self, db: Database) -> None:
        self.db = db

    def state(self) -> SchemaState:
        try:
            current = migrate.current_revision(self.db)
        except SQLAlchemyError as exc:
            reason = getattr(exc, "orig", None) or exc
            raise NotReady(f"cannot read the database at {display_url(self.db.url)}: {reason}") from None
        return SchemaState(current, migrate.head_revision(), current is None or current in migrate.known_revisions())

    def upgrade(self) -> tuple[str | None, str | None]:
        """Create or upgrade the schema to this release's; returns (revision before, revision after)."""
        before = migrate.current_revision(self.db)
        if before is not None and before not in migrate.known_revisions():
            raise NotReady(
                f"the database at {display_url(self.db.url)} is at schema {before}, newer than this release of "
                f"Ktizo knows (its newest is {migrate.head_revision()}): a newer Ktizo upgraded it. Run that "
                "release (or newer) against it; migrations only go forward."
            )
        migrate.upgrade(self.db)
        return before, migrate.current_revision(self.db)
