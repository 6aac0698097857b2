"""Zero-touch sites: sites, their enrollment keys (one active each), agents' API keys; machine_uid, the collision gate

- ``sites``: ``site_code`` (unique), name, ``enrollment_policy`` (auto-approve | manual), optional limits.
- ``site_enrollment_keys``: Argon2id hash of each ``cek_`` key, version (unique per site), fingerprint, expiry and
  uses; a partial unique index keeps one active key per site.
- ``agent_api_keys``: ``cak_`` keys by id, the secret's SHA-256.
- devices: ``site_id``, ``machine_uid`` (unique), ``key_version``; an agent is known by machine-id or machine_uid.
- enrollments: ``site_id``, ``key_version``, ``collision`` and ``claim`` (the collision gate), status ``rejected``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

import ktizo.db.types

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_KEEP_IDS = {"sqlite_autoincrement": True}
_OLD_KIND = "(kind = 'talos' AND role IS NOT NULL) OR (kind = 'agent' AND role IS NULL AND machine_id IS NOT NULL)"
_NEW_KIND = (
    "(kind = 'talos' AND role IS NOT NULL) OR "
    "(kind = 'agent' AND role IS NULL AND (machine_id IS NOT NULL OR machine_uid IS NOT NULL))"
)


def upgrade() -> None:
    op.create_table(
        "sites",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_code", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), server_default="", nullable=False),
        sa.Column("enrollment_policy", sa.String(length=16), server_default="auto-approve", nullable=False),
        sa.Column("max_pending", sa.Integer(), nullable=True),
        sa.Column("max_agents", sa.Integer(), nullable=True),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=64), server_default="", nullable=False),
        sa.CheckConstraint("enrollment_policy IN ('auto-approve', 'manual')", name=op.f("ck_sites_policy")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sites")),
        sa.UniqueConstraint("site_code", name=op.f("uq_sites_site_code")),
    )
    op.create_table(
        "site_enrollment_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=4), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("expires_at", ktizo.db.types.UTCDateTime(), nullable=True),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), server_default="0", nullable=False),
        sa.Column("deactivated_at", ktizo.db.types.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["site_id"], ["sites.id"], name=op.f("fk_site_enrollment_keys_site_id_sites"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_site_enrollment_keys")),
        sa.UniqueConstraint("site_id", "version", name="uq_site_enrollment_keys_site_version"),
    )
    op.create_index(op.f("ix_site_enrollment_keys_site_id"), "site_enrollment_keys", ["site_id"], unique=False)
    op.create_index(
        "uq_site_enrollment_keys_active",
        "site_enrollment_keys",
        ["site_id"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )
    op.create_table(
        "agent_api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=True),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(), nullable=False),
        sa.Column("revoked_at", ktizo.db.types.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_agent_api_keys_device_id_devices"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_api_keys")),
    )
    op.create_index(op.f("ix_agent_api_keys_device_id"), "agent_api_keys", ["device_id"], unique=False)

    with op.batch_alter_table("devices", schema=None, table_kwargs=_KEEP_IDS) as batch_op:
        batch_op.add_column(sa.Column("site_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("machine_uid", sa.String(length=80), nullable=True))
        batch_op.add_column(sa.Column("key_version", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_devices_site_id_sites"), "sites", ["site_id"], ["id"], ondelete="SET NULL"
        )
        batch_op.create_unique_constraint(batch_op.f("uq_devices_machine_uid"), ["machine_uid"])
        batch_op.create_index(batch_op.f("ix_devices_site_id"), ["site_id"], unique=False)
        batch_op.drop_constraint("kind_fields", type_="check")
        batch_op.create_check_constraint("kind_fields", _NEW_KIND)

    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("site_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("key_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("collision", sa.Boolean(), server_default=sa.text("false"), nullable=False))
        batch_op.add_column(sa.Column("claim", sa.JSON(), server_default="{}", nullable=False))
        batch_op.create_foreign_key(
            batch_op.f("fk_enrollments_site_id_sites"), "sites", ["site_id"], ["id"], ondelete="CASCADE"
        )
        batch_op.drop_constraint("status", type_="check")
        batch_op.create_check_constraint("status", "status IN ('pending', 'approved', 'rejected')")


def downgrade() -> None:
    with op.batch_alter_table("enrollments", schema=None) as batch_op:
        batch_op.drop_constraint("status", type_="check")
        batch_op.create_check_constraint("status", "status IN ('pending', 'approved')")
        batch_op.drop_constraint("fk_enrollments_site_id_sites", type_="foreignkey")
        for column in ("claim", "collision", "key_version", "site_id"):
            batch_op.drop_column(column)
    with op.batch_alter_table("devices", schema=None, table_kwargs=_KEEP_IDS) as batch_op:
        batch_op.drop_constraint("kind_fields", type_="check")
        batch_op.create_check_constraint("kind_fields", _OLD_KIND)
        batch_op.drop_index(batch_op.f("ix_devices_site_id"))
        batch_op.drop_constraint(batch_op.f("uq_devices_machine_uid"), type_="unique")
        batch_op.drop_constraint(batch_op.f("fk_devices_site_id_sites"), type_="foreignkey")
        for column in ("key_version", "machine_uid", "site_id"):
            batch_op.drop_column(column)
    op.drop_table("agent_api_keys")
    op.drop_table("site_enrollment_keys")
    op.drop_table("sites")
