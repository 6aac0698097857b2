"""Workers and replicas: an approval or a rejection made in one process wakes the config requests held in another

- ``ix_devices_approved_at`` / ``ix_devices_rejected_at``: each process's ApprovalWatcher asks, several times a
  second while requests are held, which machines were decided since it last looked.
- On PostgreSQL, a trigger ``NOTIFY``s channel ``ktizo_devices`` with ``schema:id`` whenever a machine's status changes
  (whatever made the change: the API, a rule, ``ktizo apply``, SQL by hand); every process ``LISTEN``s and wakes
  its held requests at once. Notifications are sent at commit, so nobody is woken to read an uncommitted row. The
  channel is per database, so the payload names the schema: two Ktizos in two schemas of one database do not
  wake each other.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

CHANNEL = "ktizo_devices"


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_devices_approved_at"), ["approved_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_devices_rejected_at"), ["rejected_at"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"""
            CREATE FUNCTION ktizo_device_status_changed() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('{CHANNEL}', TG_TABLE_SCHEMA || ':' || NEW.id::text);
                RETURN NULL;
            END $$
            """
        )
        op.execute(
            """
            CREATE TRIGGER devices_status_changed AFTER UPDATE OF status ON devices
            FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
            EXECUTE FUNCTION ktizo_device_status_changed()
            """
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS devices_status_changed ON devices")
        op.execute("DROP FUNCTION IF EXISTS ktizo_device_status_changed()")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_rejected_at"))
        batch_op.drop_index(batch_op.f("ix_devices_approved_at"))
