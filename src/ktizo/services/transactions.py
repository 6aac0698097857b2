"""The edge's transaction, for the adapters that open it (HTTP middleware, CLI commands, jobs): one per request,
command or job, everything the use cases write in it committed or rolled back together (see ``db.engine``)."""

from ktizo.db.engine import (
    Transaction,
    after_commit,
    begin_transaction,
    end_transaction,
    keep_on_refusal,
    transaction,
)

__all__ = ["Transaction", "after_commit", "begin_transaction", "end_transaction", "keep_on_refusal", "transaction"]
