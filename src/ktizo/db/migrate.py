"""Alembic, driven from code: the migrations ship inside the package, so no alembic.ini is needed.

Reading where the schema stands (every CLI command does, before it touches anything) needs no Alembic: the head is
read from the migration files, the current revision from ``alembic_version``. Alembic loads only to migrate."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text

from ktizo.db.engine import Database

if TYPE_CHECKING:
    from alembic.config import Config

_MIGRATIONS = Path(__file__).parent / "migrations"
_REVISION = re.compile(r'^revision\s*=\s*"([^"]+)"', re.MULTILINE)
_DOWN = re.compile(r'^down_revision\s*=\s*(?:"([^"]+)"|None)', re.MULTILINE)


def alembic_config(db: Database) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = db.write_engine
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(db), revision)


@functools.cache
def _graph() -> dict[str, str | None]:
    """Each migration's revision and the one it revises, from the files Alembic runs."""
    graph: dict[str, str | None] = {}
    for path in (_MIGRATIONS / "versions").glob("*.py"):
        source = path.read_text()
        revision, down = _REVISION.search(source), _DOWN.search(source)
        if revision is not None and down is not None:
            graph[revision.group(1)] = down.group(1)
    return graph


def head_revision() -> str | None:
    graph = _graph()
    heads = set(graph) - {down for down in graph.values() if down}
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads: {sorted(heads)}")
    return heads.pop()


def known_revisions() -> set[str]:
    return set(_graph())


def current_revision(db: Database) -> str | None:
    with db.read_engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def is_current(db: Database) -> bool:
    return current_revision(db) == head_revision()
