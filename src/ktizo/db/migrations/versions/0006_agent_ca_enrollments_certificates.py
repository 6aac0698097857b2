"""Linux agents: Ktizo's agent CA, live enrollments, every certificate it issued; agents' FQDN, addresses, probe

- ``pki_authority``: the agent CA (one row; its key sealed when a secret key is configured).
- ``enrollments``: an agent's live enrollment (pending, or approved awaiting the one pickup), one per machine,
  the polling token as its SHA-256.
- ``agent_certificates``: every issued certificate by serial, with revocation; kept after a purge (``device_id``
  NULL) so the CRL lists it until it expires.
- devices: ``fqdn`` and ``addresses`` (what an agent's certificate names), ``agent_address`` (where to probe it).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

Each migration must keep the previous Ktizo release working (replicas upgrade one at a time): only new tables and
nullable or defaulted columns here.
"""

import sqlalchemy as sa
from alembic import op

import ktizo.db.types

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("devices", sa.Column("fqdn", sa.String(length=253), nullable=True))
    op.add_column("devices", sa.Column("addresses", sa.JSON(), server_default="[]", nullable=False))
    op.add_column("devices", sa.Column("agent_address", sa.String(length=64), nullable=True))

    op.create_table(
        "pki_authority",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=71), nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_pki_authority_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pki_authority")),
    )
    op.create_table(
        "enrollments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("csr_pem", sa.Text(), nullable=False),
        sa.Column("key_type", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("certificate_serial", sa.String(length=40), nullable=True),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("expires_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("source_ip", sa.String(length=45), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'approved')", name=op.f("ck_enrollments_status")),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_enrollments_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollments")),
        sa.UniqueConstraint("device_id", name=op.f("uq_enrollments_device_id")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrollments_token_hash")),
    )
    op.create_index(op.f("ix_enrollments_expires_at"), "enrollments", ["expires_at"], unique=False)
    op.create_table(
        "agent_certificates",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=True),
        sa.Column("machine_id", sa.String(length=64), nullable=False),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("not_before", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("not_after", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("issued_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("issued_by", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("revoked_at", ktizo.db.types.UTCDateTime(), nullable=True),
        sa.Column("revoked_by", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_agent_certificates_device_id_devices"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("serial", name=op.f("pk_agent_certificates")),
    )
    for column in ("device_id", "not_after", "revoked_at"):
        op.create_index(op.f(f"ix_agent_certificates_{column}"), "agent_certificates", [column], unique=False)


def downgrade() -> None:
    op.drop_table("agent_certificates")
    op.drop_table("enrollments")
    op.drop_table("pki_authority")
    with op.batch_alter_table("devices", schema=None, table_kwargs={"sqlite_autoincrement": True}) as batch_op:
        batch_op.drop_column("agent_address")
        batch_op.drop_column("addresses")
        batch_op.drop_column("fqdn")
