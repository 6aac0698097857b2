"""network boot: device codes, DHCP lease, install state

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

Each migration must keep the previous Ktizo release working (replicas upgrade one at a time).
"""

import sqlalchemy as sa
from alembic import op

import ktizo.db.types

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "service_tokens",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_service_tokens")),
    )
    op.create_table(
        "device_codes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("device_code_hash", sa.String(length=64), nullable=False),
        sa.Column("user_code", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("interval", sa.Integer(), server_default="5", nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_poll_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("access_token_hash", sa.String(length=64), nullable=True),
        sa.Column("token_expires_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("approved_by", sa.String(length=64), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'approved', 'denied', 'consumed', 'expired')", name=op.f("ck_device_codes_status")
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_codes_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_codes")),
        sa.UniqueConstraint("access_token_hash", name=op.f("uq_device_codes_access_token_hash")),
        sa.UniqueConstraint("device_code_hash", name=op.f("uq_device_codes_device_code_hash")),
        sa.UniqueConstraint("user_code", name=op.f("uq_device_codes_user_code")),
    )
    with op.batch_alter_table("device_codes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_codes_device_id"), ["device_id"], unique=False)

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_ip", sa.String(length=45), nullable=True))
        batch_op.add_column(sa.Column("installed_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("installed_at")
        batch_op.drop_column("lease_ip")

    with op.batch_alter_table("device_codes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_codes_device_id"))

    op.drop_table("device_codes")
    op.drop_table("service_tokens")
