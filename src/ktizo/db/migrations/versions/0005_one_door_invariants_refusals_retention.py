"""machines have a kind; approved hostnames and static IPs unique by constraint; refusals counted; audit retention

- devices: ``kind`` (talos | agent), ``machine_id`` (unique, agents), ``first_ip`` (the address a machine was first
  seen from, which the new-machine budget counts; ``last_ip`` moves), ``role`` only for Talos machines.
- Partial unique indexes over approved machines: the hostname (stored lower-cased), and ``static_ip``, the static
  address without its prefix (kept by the model from ``ip_address``).
  Approved duplicates left by the race this closes are revoked here, the earliest approval kept, each audited.
- Single-row tables (cluster settings, secrets, config state) hold id 1 only.
- ``refusals``: repeated refusals (sign-ins, identity mismatches, wrong console codes, console-code requests) are a
  count per subject and minute, not a row each; the first of each minute is also an audit row pointing at it.
- ``audit_retention``: the audit log's triggers let a row be deleted only when it is older than
  ``prune_before``, which the retention job alone moves.
- ``device_codes.source_ip`` (requests per address are budgeted) and an index for their expiry.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Each migration must keep the previous Ktizo release working (replicas upgrade one at a time).
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

import ktizo.db.types

# SQLite rebuilds the table for these changes: it must keep AUTOINCREMENT (a deleted device's id is never reused,
# so its audit history stays its own).
_KEEP_IDS = {"sqlite_autoincrement": True}

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name

    with op.batch_alter_table("devices", schema=None, table_kwargs=_KEEP_IDS) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), server_default="talos", nullable=False))
        batch_op.add_column(sa.Column("machine_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("first_ip", sa.String(length=45), nullable=True))
        batch_op.add_column(sa.Column("static_ip", sa.String(length=45), nullable=True))
        batch_op.alter_column("role", existing_type=sa.String(length=16), nullable=True, server_default=None)
        batch_op.create_unique_constraint(batch_op.f("uq_devices_machine_id"), ["machine_id"])
        batch_op.create_check_constraint("kind", "kind IN ('talos', 'agent')")
        batch_op.create_check_constraint(
            "kind_fields",
            "(kind = 'talos' AND role IS NOT NULL) OR (kind = 'agent' AND role IS NULL AND machine_id IS NOT NULL)",
        )
        batch_op.create_index("ix_devices_first_ip_first_seen", ["first_ip", "first_seen"], unique=False)
    op.execute("UPDATE devices SET first_ip = last_ip")

    op.execute("UPDATE devices SET hostname = lower(hostname) WHERE hostname IS NOT NULL")
    rows = bind.execute(sa.text("SELECT id, ip_address FROM devices WHERE ip_address IS NOT NULL")).all()
    for device_id, ip in rows:
        bind.execute(
            sa.text("UPDATE devices SET static_ip = :ip WHERE id = :id"), {"ip": ip.split("/")[0], "id": device_id}
        )
    _revoke_duplicates(bind)
    approved = "status = 'approved'"
    with op.batch_alter_table("devices", schema=None, table_kwargs=_KEEP_IDS) as batch_op:
        for name, column in (
            ("uq_devices_approved_hostname", "hostname"),
            ("uq_devices_approved_address", "static_ip"),
        ):
            where = sa.text(f"{approved} AND {column} IS NOT NULL")
            batch_op.create_index(name, [column], unique=True, sqlite_where=where, postgresql_where=where)

    for table in ("cluster_settings", "cluster_secrets", "config_state"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_check_constraint("one_row", "id = 1")

    op.create_table(
        "refusals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("source_ip", sa.String(length=45), server_default="", nullable=False),
        sa.Column("minute", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), server_default="1", nullable=False),
        sa.Column("first_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_at", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refusals")),
        sa.UniqueConstraint("action", "subject", "source_ip", "minute", name="uq_refusals_action_subject_minute"),
    )
    with op.batch_alter_table("refusals", schema=None) as batch_op:
        batch_op.create_index("ix_refusals_action_source_minute", ["action", "source_ip", "minute"], unique=False)
        batch_op.create_index(batch_op.f("ix_refusals_minute"), ["minute"], unique=False)

    op.create_table(
        "audit_retention",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prune_before", ktizo.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_retention_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_retention")),
    )
    retention = sa.table(
        "audit_retention",
        sa.column("id", sa.Integer()),
        sa.column("prune_before", ktizo.db.types.UTCDateTime(timezone=True)),
    )
    op.bulk_insert(retention, [{"id": 1, "prune_before": dt.datetime(1970, 1, 1, tzinfo=dt.UTC)}])

    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("refusal_id", sa.Integer(), nullable=True))
    _replace_audit_triggers(dialect)

    with op.batch_alter_table("device_codes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_ip", sa.String(length=45), nullable=True))
        batch_op.create_index("ix_device_codes_source_ip_created_at", ["source_ip", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_device_codes_expires_at"), ["expires_at"], unique=False)


def _revoke_duplicates(bind: sa.Connection) -> None:
    """Before the constraint: an approved hostname or address held twice (the race the constraint closes) keeps its
    earliest approval; the others are revoked, and the audit log says why."""
    rows = bind.execute(
        sa.text(
            "SELECT id, mac_address, hostname, ip_address FROM devices WHERE status = 'approved' "
            "ORDER BY approved_at, id"
        )
    ).all()
    names: set[str] = set()
    addresses: set[str] = set()
    now = dt.datetime.now(dt.UTC)
    for device_id, mac, hostname, ip in rows:
        name = hostname.lower() if hostname else None
        address = ip.split("/")[0] if ip else None
        clash = (name is not None and name in names) or (address is not None and address in addresses)
        if not clash:
            if name:
                names.add(name)
            if address:
                addresses.add(address)
            continue
        bind.execute(
            sa.text(
                "UPDATE devices SET status = 'rejected', rejected_at = :now, rejected_by = 'migration' WHERE id = :id"
            ),
            {"now": now if bind.dialect.name != "sqlite" else now.replace(tzinfo=None), "id": device_id},
        )
        bind.execute(
            sa.text(
                "INSERT INTO audit_events (at, actor, actor_type, action, device_id, device_mac, details) "
                "VALUES (:now, 'migration', 'system', 'reject', :id, :mac, :details)"
            ),
            {
                "now": now if bind.dialect.name != "sqlite" else now.replace(tzinfo=None),
                "id": device_id,
                "mac": mac,
                "details": '{"from": "approved", "revoked": true, "reason": "another approved machine already had '
                'this hostname or static IP (approved concurrently before release 0005 made it a constraint)"}',
            },
        )


def _replace_audit_triggers(dialect: str) -> None:
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
        op.execute(
            "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
            "WHEN OLD.at >= (SELECT prune_before FROM audit_retention WHERE id = 1) "
            "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only (only the retention job deletes old rows)'); END"
        )
    else:
        op.execute(
            "CREATE OR REPLACE FUNCTION ktizo_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF TG_OP = 'DELETE' AND OLD.at < (SELECT prune_before FROM audit_retention WHERE id = 1) THEN "
            "RETURN OLD; END IF; "
            "RAISE EXCEPTION 'the audit log is append-only (only the retention job deletes old rows)'; END $$"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_delete")
        op.execute(
            "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
            "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END"
        )
    else:
        op.execute(
            "CREATE OR REPLACE FUNCTION ktizo_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$"
        )
    with op.batch_alter_table("device_codes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_codes_expires_at"))
        batch_op.drop_index("ix_device_codes_source_ip_created_at")
        batch_op.drop_column("source_ip")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_column("refusal_id")
    op.drop_table("audit_retention")
    op.drop_table("refusals")
    for table in ("cluster_settings", "cluster_secrets", "config_state"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(batch_op.f(f"ck_{table}_one_row"), type_="check")
    op.execute("DELETE FROM devices WHERE kind = 'agent'")
    with op.batch_alter_table("devices", schema=None, table_kwargs=_KEEP_IDS) as batch_op:
        batch_op.drop_index("uq_devices_approved_address")
        batch_op.drop_index("uq_devices_approved_hostname")
        batch_op.drop_column("static_ip")
        batch_op.drop_index("ix_devices_first_ip_first_seen")
        batch_op.drop_constraint(batch_op.f("ck_devices_kind_fields"), type_="check")
        batch_op.drop_constraint(batch_op.f("ck_devices_kind"), type_="check")
        batch_op.drop_constraint(batch_op.f("uq_devices_machine_id"), type_="unique")
        batch_op.alter_column("role", existing_type=sa.String(length=16), nullable=False, server_default="worker")
        batch_op.drop_column("first_ip")
        batch_op.drop_column("machine_id")
        batch_op.drop_column("kind")
