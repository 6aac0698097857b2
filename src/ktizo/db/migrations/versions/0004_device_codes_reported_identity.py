"""device codes keep the identity the machine reported when it asked for its code

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


def downgrade() -> None:
    with op.batch_alter_table("device_codes", schema=None) as batch_op:
        batch_op.drop_column("serial")
        batch_op.drop_column("uuid")
