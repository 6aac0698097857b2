"""Governance: the events outbox, auto-approval rules, webhooks and their deliveries, the GitOps writer's row

- ``events``: written with the audit row of every change worth telling (webhooks, GitOps take them from here).
- ``rules``: auto-approval rules, with the count of machines each decided.
- ``webhooks`` / ``webhook_deliveries``: subscriptions (secret sealed) and one delivery per event and subscription.
- ``gitops_state``: one row, locked by the replica writing the repository.
- ``applied_objects``: what ``ktizo apply`` manages (``--prune`` touches nothing else); devices.approve_on_arrival.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

import ktizo.db.types

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_KEEP_IDS = {"sqlite_autoincrement": True}


def upgrade() -> None:
    op.create_table(
        "applied_objects",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("applied_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("applied_by", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("kind", "name", name=op.f("pk_applied_objects")),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("approve_on_arrival", sa.String(length=64), nullable=True))
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("event", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("actor_type", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("webhooks_pending", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("gitops_pending", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        **_KEEP_IDS,
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_gitops_pending", ["gitops_pending", "id"], unique=False)
        batch_op.create_index("ix_events_webhooks_pending", ["webhooks_pending", "id"], unique=False)

    op.create_table(
        "gitops_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("head", sa.String(length=64), nullable=True),
        sa.Column("pushed", sa.String(length=64), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("updated_at", ktizo.db.types.UTCDateTime(), nullable=True),
        sa.CheckConstraint("id = 1", name=op.f("ck_gitops_state_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gitops_state")),
    )
    op.execute("INSERT INTO gitops_state (id) VALUES (1)")
    op.create_table(
        "rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("priority", sa.Integer(), server_default="100", nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("match", sa.JSON(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("max_count", sa.Integer(), nullable=True),
        sa.Column("matched", sa.Integer(), server_default="0", nullable=False),
        sa.Column("revision", sa.Integer(), server_default="1", nullable=False),
        sa.Column("author", sa.String(length=64), nullable=False),
        sa.Column("author_role", sa.String(length=16), nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("updated_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.CheckConstraint("action IN ('approve', 'reject')", name=op.f("ck_rules_action")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules")),
        sa.UniqueConstraint("name", name=op.f("uq_rules_name")),
    )
    op.create_table(
        "webhooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("secret_sealed", sa.Text(), nullable=False),
        sa.Column("format", sa.String(length=16), server_default="json", nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=64), server_default="", nullable=False),
        sa.Column("revision", sa.Integer(), server_default="1", nullable=False),
        sa.CheckConstraint("format IN ('json', 'slack')", name=op.f("ck_webhooks_format")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
        sa.UniqueConstraint("name", name=op.f("uq_webhooks_name")),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("webhook_id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("next_attempt_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("claimed_until", ktizo.db.types.UTCDateTime(), nullable=True),
        sa.Column("delivered_at", ktizo.db.types.UTCDateTime(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'delivered', 'failed')", name=op.f("ck_webhook_deliveries_status")),
        sa.ForeignKeyConstraint(
            ["event_id"], ["events.id"], name=op.f("fk_webhook_deliveries_event_id_events"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"], ["webhooks.id"], name=op.f("fk_webhook_deliveries_webhook_id_webhooks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("delivery_id", name=op.f("uq_webhook_deliveries_delivery_id")),
        sa.UniqueConstraint("webhook_id", "event_id", name="uq_webhook_deliveries_webhook_event"),
        **_KEEP_IDS,
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_deliveries_due", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_webhook_deliveries_event_id"), ["event_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_webhook_deliveries_webhook_id"), ["webhook_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("approve_on_arrival")
    op.drop_table("applied_objects")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_webhook_id"))
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_event_id"))
        batch_op.drop_index("ix_webhook_deliveries_due")

    op.drop_table("webhook_deliveries")
    op.drop_table("webhooks")
    op.drop_table("rules")
    op.drop_table("gitops_state")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_webhooks_pending")
        batch_op.drop_index("ix_events_gitops_pending")

    op.drop_table("events")
