"""The shared configuration revision every replica watches (see ``render``)."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from ktizo.db.models import ConfigState


def bump(session: Session) -> None:
    """Call inside the transaction that changes anything configs are rendered from."""
    session.execute(update(ConfigState).where(ConfigState.id == 1).values(revision=ConfigState.revision + 1))
