"""cluster configuration, groups and patches

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22

Each migration must keep the previous Ktizo release working (replicas upgrade one at a time).
"""

import sqlalchemy as sa
from alembic import op

import ktizo.db.types

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "base_configs",
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("revision", sa.Integer(), server_default="1", nullable=False),
        sa.Column("updated_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.CheckConstraint("role IN ('controlplane', 'worker')", name=op.f("ck_base_configs_role")),
        sa.PrimaryKeyConstraint("role", name=op.f("pk_base_configs")),
    )
    op.create_table(
        "cluster_secrets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bundle", sa.Text(), nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cluster_secrets")),
    )
    op.create_table(
        "cluster_settings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cluster_name", sa.String(length=63), nullable=True),
        sa.Column("endpoint", sa.String(length=255), nullable=True),
        sa.Column("talos_version", sa.String(length=16), nullable=True),
        sa.Column("kubernetes_version", sa.String(length=32), nullable=True),
        sa.Column("install_disk", sa.String(length=255), nullable=True),
        sa.Column("install_image", sa.String(length=255), nullable=True),
        sa.Column("pod_subnets", sa.JSON(), nullable=False),
        sa.Column("service_subnets", sa.JSON(), nullable=False),
        sa.Column("dns_domain", sa.String(length=253), nullable=False),
        sa.Column("cert_sans", sa.JSON(), nullable=False),
        sa.Column("gateway", sa.String(length=45), nullable=True),
        sa.Column("nameservers", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), server_default="1", nullable=False),
        sa.Column("updated_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cluster_settings")),
    )
    op.create_table(
        "config_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.Integer(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_config_state")),
    )
    op.create_table(
        "device_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("priority", sa.Integer(), server_default="100", nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("patch", sa.Text(), nullable=True),
        sa.Column("gateway", sa.String(length=45), nullable=True),
        sa.Column("nameservers", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("revision", sa.Integer(), server_default="1", nullable=False),
        sa.Column("created_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_device_groups")),
        sa.UniqueConstraint("name", name=op.f("uq_device_groups_name")),
    )
    op.create_table(
        "group_members",
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_group_members_device_id_devices"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["group_id"], ["device_groups.id"], name=op.f("fk_group_members_group_id_device_groups"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("group_id", "device_id", name=op.f("pk_group_members")),
    )
    with op.batch_alter_table("group_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_group_members_device_id"), ["device_id"], unique=False)

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("labels", sa.JSON(), server_default="{}", nullable=False))
        batch_op.add_column(sa.Column("patch", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("install_disk", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("extra_nics", sa.JSON(), server_default="[]", nullable=False))

    op.execute("INSERT INTO config_state (id, revision) VALUES (1, 1)")


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("extra_nics")
        batch_op.drop_column("install_disk")
        batch_op.drop_column("patch")
        batch_op.drop_column("labels")

    with op.batch_alter_table("group_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_group_members_device_id"))

    op.drop_table("group_members")
    op.drop_table("device_groups")
    op.drop_table("config_state")
    op.drop_table("cluster_settings")
    op.drop_table("cluster_secrets")
    op.drop_table("base_configs")
