"""device codes keep the identity the machine reported; devices indexed by first_seen

The index serves the budget of new machines per source address (a range scan over the last minute).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22

Each migration must keep the previous Ktizo release working (replicas upgrade one at a time).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device_codes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("uuid", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("serial", sa.String(length=128), nullable=True))
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_devices_first_seen"), ["first_seen"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_first_seen"))
    with op.batch_alter_table("device_codes", schema=None) as batch_op:
        batch_op.drop_column("serial")
        batch_op.drop_column("uuid")
