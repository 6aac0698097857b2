"""First contact: one use case for every door a machine knocks at without credentials.

Config download, register, iPXE, the DHCP hook and Talos's device flow all land here (and the agent doors will):
the new-machine budget, create-or-find, binding the identity factors the machine reports, refusing a factor that
differs from the bound one, touching last_seen, and the audit, each written once. What a door adds is only how it
answers."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ktizo.db.batch import insert_many, table_of
from ktizo.db.models import Device, Rule
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus, MachineKind, Role, Source
from ktizo.domain.errors import TooManyAttempts, ValidationFailed
from ktizo.domain.identity import identifying_uuid
from ktizo.services import audit, events, refusals
from ktizo.services.context import Actor

NEW_MACHINE_WINDOW = dt.timedelta(minutes=1)
# Identity factors a machine reports and is then bound to; a later knock must not contradict them.
FACTORS = ("uuid", "serial")


@dataclass(frozen=True)
class Knock:
    """A machine at a door, as the door's adapter parsed it: every value already normalised, None when unknown."""

    door: Source
    mac: str | None = None
    machine_id: str | None = None  # agents: /etc/machine-id
    machine_uid: str | None = None  # zero-touch agents: a hash of the machine-id and Ktizo's CA fingerprint
    uuid: str | None = None
    serial: str | None = None
    kind: MachineKind = MachineKind.TALOS
    source_ip: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)
    lease_ip: str | None = None  # only from the DHCP hook (a local, authenticated helper)
    actor: Actor | None = None  # default: the machine itself, from source_ip

    def __post_init__(self) -> None:
        if self.kind is MachineKind.AGENT and not (self.machine_id or self.machine_uid):
            raise ValidationFailed("an agent is known by its machine-id", "machine_id")
        if self.kind is MachineKind.TALOS and not self.mac and not self.identifying_uuid:
            raise ValidationFailed(
                "the request names no machine: put mac=${mac}&uuid=${uuid} in the talos.config URL", "mac"
            )

    @property
    def identifying_uuid(self) -> str | None:
        return identifying_uuid(self.uuid)

    @property
    def who(self) -> Actor:
        return self.actor or Actor.device(self.source_ip)

    @property
    def subject(self) -> str:
        """How refusals of this machine are counted: by the identity it claims."""
        return self.machine_id or self.machine_uid or self.mac or f"uuid:{self.identifying_uuid}"

    def claimed(self, factor: str) -> str | None:
        return self.identifying_uuid if factor == "uuid" else self.serial


@dataclass(frozen=True)
class Arrival:
    device: Device
    created: bool
    # Factors the knock claimed that differ from the bound ones ({factor: {"bound", "claimed"}}); nothing was
    # changed on the machine then, and the refusal is recorded.
    mismatch: dict[str, dict[str, str | None]] | None = None
    decided: bool = False  # a rule approved or rejected the machine in this transaction


def check_budget(s: Session, source_ip: str | None, per_minute: int) -> None:
    """Refuse (429) one more unknown machine from an address that brought ``per_minute`` already this minute.

    Counted by the address each machine was *first* seen from (``first_ip`` never changes): re-touching the same
    MACs from a second address does not free the first one's budget. Machines already known are never refused,
    and real machines each have their own address; a rack behind one NAT still gets in, a minute's worth at a
    time, as Talos retries. Counted in the database, so every replica shares the budget."""
    if not per_minute or not source_ip:
        return
    now = utcnow()
    n, oldest = s.execute(select(func.count(), func.min(Device.first_seen)).where(*_new_from([source_ip], now))).one()
    if n >= per_minute:
        wait = TooManyAttempts.seconds_until(oldest + NEW_MACHINE_WINDOW, now)
        raise TooManyAttempts(
            f"too many new machines from {source_ip} in the last minute ({n}); this one is registered when it asks "
            f"again in {wait} s",
            wait,
        )


class Registered(enum.Enum):
    """What a batch of first contacts (``FirstContact.register_all``) did with one machine."""

    LEFT = "left"  # nothing: first contact's own ``arrive`` is to take it (the door calls it next)
    NEW = "new"  # registered as pending, audited, as ``arrive`` would have
    OVER_BUDGET = "over_budget"  # its address brought its minute's worth of new machines: not registered


@dataclass
class NewMachine:
    """A knock by a machine its door found no row for, to register in one batch with others that arrived at once."""

    knock: Knock
    outcome: Registered = Registered.LEFT  # set in the batch's transaction, read once it committed


# Whether any rule could decide a machine as it arrives.
ANY_ENABLED_RULE = select(Rule.id).where(Rule.enabled.is_(True)).limit(1)
# What a batch-made row is given beyond ``_new_row``: the values the model's Python defaults would fill in, so the
# rows go through one executemany (``db.batch.execute_many``) instead of SQLAlchemy's per-row defaults.
_BATCH_DEFAULTS: dict[str, Any] = {"labels": {}, "addresses": [], "extra_nics": []}


def _new_from(addresses: Collection[str], now: dt.datetime) -> tuple[Any, ...]:
    """The machines first seen from ``addresses`` within the budget's window: what the budget counts."""
    return Device.first_ip.in_(addresses), Device.first_seen >= now - NEW_MACHINE_WINDOW


# The auto-approval rules (``services.rules``), wired in by the app: they sit above this module, which every
# door uses. Returns whether a rule decided the machine.
Decider = Callable[[Session, Device, "Knock | None"], bool]


class FirstContact:
    def __init__(self, *, new_per_minute: int = 0, touch_interval: float = 0.0) -> None:
        self.new_per_minute = new_per_minute  # see check_budget
        self.touch_interval = touch_interval  # seconds between last_seen writes for a machine that keeps knocking
        self.decider: Decider | None = None

    def decide(self, s: Session, device: Device, knock: Knock | None = None) -> bool:
        """Let the rules decide a pending machine now, in the door's transaction. Talos doors get this from
        ``arrive``; the agent doors call it once the enrollment the approval needs exists."""
        if self.decider is None or device.status != DeviceStatus.PENDING.value:
            return False
        return self.decider(s, device, knock)

    @staticmethod
    def find(s: Session, knock: Knock, *, lock: bool = False) -> Device | None:
        if knock.machine_uid:
            stmt = select(Device).where(Device.machine_uid == knock.machine_uid)
        elif knock.machine_id:
            stmt = select(Device).where(Device.machine_id == knock.machine_id)
        elif knock.mac:
            stmt = select(Device).where(Device.mac_address == knock.mac)
        else:  # known only by its SMBIOS UUID (pre-registered that way, or Talos's legacy ?uuid= form)
            stmt = select(Device).where(Device.uuid == knock.identifying_uuid, Device.mac_address.is_(None))
        device = s.scalar(stmt.with_for_update() if lock else stmt)
        if device is None and knock.mac and knock.identifying_uuid and not (knock.machine_id or knock.machine_uid):
            # Pre-registered by UUID alone: this knock tells its MAC.
            uuid_only = select(Device).where(Device.uuid == knock.identifying_uuid, Device.mac_address.is_(None))
            device = s.scalar(uuid_only.with_for_update() if lock else uuid_only)
        return device

    def arrive(self, s: Session, knock: Knock, *, budget: bool = True) -> Arrival:
        """The machine knocking, found or registered as pending, with what it reported recorded. Raises
        ``TooManyAttempts`` (only for a machine not known yet) when its address is over the new-machine budget."""
        device = self.find(s, knock, lock=True)
        if device is None:
            if budget:
                check_budget(s, knock.source_ip, self.new_per_minute)
            new_id = insert_ignoring_conflict(s, Device, self._new_row(knock), returning=Device.id)
            if new_id is not None:
                device = s.get(Device, new_id)
                assert device is not None
                details: dict[str, Any] = {"source": knock.door.value, "kind": knock.kind.value}
                if knock.lease_ip:
                    details["lease_ip"] = knock.lease_ip
                audit.record(s, knock.who, "register", device, details)
                return Arrival(device, created=True, decided=self._decide_talos(s, device, knock))
            # A concurrent first contact made the row (and audited it): carry on with it as a known machine.
            device = self.find(s, knock, lock=True)
            if device is None:  # it collided on another identity column (a UUID known without a MAC, say)
                raise ValidationFailed("another machine already holds this identity", "uuid")
        mismatch = self._mismatch(device, knock)
        if mismatch:
            refusals.refuse(
                s, knock.who, "identity_mismatch", knock.subject, device, {**mismatch, "door": knock.door.value}
            )
            return Arrival(device, created=False, mismatch=mismatch)
        self._bind(s, device, knock)
        self._touch(device, knock)
        return Arrival(device, created=False, decided=self._decide_talos(s, device, knock))

    def register_all(self, machines: Sequence[NewMachine], s: Session) -> None:
        """First contact for a storm of machines nobody knows yet, in one transaction: their rows, audit rows and
        events one statement each, what ``arrive`` writes for each one alone. Every machine this does not register
        exactly as ``arrive`` would is left to ``arrive`` (``Registered.LEFT``): while any rule is enabled (rules
        decide a machine as it arrives), a machine known already or made meanwhile by a replica, a second knock of
        one machine in the batch, one pre-registered by its UUID alone, an agent."""
        if s.scalar(ANY_ENABLED_RULE) is not None:
            return
        knocks = [m.knock for m in machines]
        macs = {k.mac for k in knocks if k.mac}
        uuids = {k.identifying_uuid for k in knocks if k.identifying_uuid}
        # On SQLite the batch's transaction holds the write lock from its start, so what is not here now is made
        # by nobody else before it commits; on PostgreSQL ON CONFLICT below sees to a replica's concurrent row.
        taken = set(s.scalars(select(Device.mac_address).where(Device.mac_address.in_(macs)))) if macs else set()
        uuid_only = (
            set(s.scalars(select(Device.uuid).where(Device.uuid.in_(uuids), Device.mac_address.is_(None))))
            if uuids
            else set()
        )
        room = self._room(s, {k.source_ip for k in knocks if k.source_ip})
        chosen: dict[str | None, tuple[NewMachine, dict[str, Any]]] = {}  # by MAC, in the order they knocked
        for m in machines:
            k = m.knock
            if k.kind is not MachineKind.TALOS or not k.mac or k.mac in taken or k.identifying_uuid in uuid_only:
                continue
            taken.add(k.mac)  # a second knock of one machine in this batch is arrive's: it finds the row
            if room is not None and k.source_ip:
                left = room.get(k.source_ip, self.new_per_minute)
                if left <= 0:
                    m.outcome = Registered.OVER_BUDGET
                    continue
                room[k.source_ip] = left - 1
            chosen[k.mac] = (m, self._new_row(k) | _BATCH_DEFAULTS)
        if not chosen:
            return
        made = insert_many(
            s,
            table_of(Device),
            [row for _, row in chosen.values()],
            returning=("id", "mac_address"),
            ignore_conflicts=True,
        )
        ids = {found.mac_address: found.id for found in made}
        entries = []
        for mac, (m, row) in chosen.items():
            if mac not in ids:
                continue  # a replica made it just now: arrive finds it
            m.outcome = Registered.NEW
            machine = {name: row.get(name) for name in events.MACHINE_FIELDS} | {"id": ids[mac]}
            entries.append(
                audit.Entry(
                    m.knock.who, "register", machine, {"source": m.knock.door.value, "kind": m.knock.kind.value}
                )
            )
        audit.record_batch(s, entries)

    def _room(self, s: Session, addresses: set[str]) -> dict[str, int] | None:
        """How many more new machines each address may bring this minute (``check_budget``, for a batch); None
        when there is no budget."""
        if not self.new_per_minute or not addresses:
            return None
        counts = s.execute(
            select(Device.first_ip, func.count()).where(*_new_from(addresses, utcnow())).group_by(Device.first_ip)
        ).all()
        return {str(ip): self.new_per_minute - n for ip, n in counts}

    def _decide_talos(self, s: Session, device: Device, knock: Knock) -> bool:
        return knock.kind is MachineKind.TALOS and self.decide(s, device, knock)

    # -- internals -------------------------------------------------------------------------------------

    @staticmethod
    def _new_row(knock: Knock) -> dict[str, Any]:
        now = utcnow()
        return {
            "kind": knock.kind.value,
            "machine_id": knock.machine_id,
            "machine_uid": knock.machine_uid,
            "mac_address": knock.mac,
            "uuid": knock.identifying_uuid,
            "serial": knock.serial,
            "status": DeviceStatus.PENDING.value,
            "role": Role.WORKER.value if knock.kind is MachineKind.TALOS else None,
            "notes": "",
            "source": knock.door.value,
            "facts": dict(knock.facts),
            "first_seen": now,
            "last_seen": now,
            "first_ip": knock.source_ip,
            "last_ip": knock.source_ip,
            "lease_ip": knock.lease_ip,
            "revision": 1,
        }

    @staticmethod
    def _mismatch(device: Device, knock: Knock) -> dict[str, dict[str, str | None]] | None:
        found = {}
        for factor in FACTORS:
            bound, claimed = getattr(device, factor), knock.claimed(factor)
            if bound and claimed and bound != claimed:
                found[factor] = {"bound": bound, "claimed": claimed}
        return found or None

    @staticmethod
    def _bind(s: Session, device: Device, knock: Knock) -> None:
        """Remember identity factors reported for the first time: later knocks must repeat them."""
        bound = {}
        if device.mac_address is None and knock.mac and device.kind == MachineKind.TALOS.value:
            device.mac_address = knock.mac
            bound["mac_address"] = knock.mac
        for factor in FACTORS:
            claimed = knock.claimed(factor)
            if claimed and not getattr(device, factor):
                setattr(device, factor, claimed)
                bound[factor] = claimed
        if bound:
            device.revision += 1
            audit.record(s, knock.who, "bind", device, {**bound, "door": knock.door.value})

    def seen(self, device: Device, source_ip: str | None) -> None:
        """Record that the machine knocked again: last_seen at most every ``touch_interval``, at once from a new
        address (a machine that keeps polling costs no write each time)."""
        now = utcnow()
        last = device.last_seen
        if last is None or (now - last).total_seconds() >= self.touch_interval or device.last_ip != source_ip:
            device.last_seen, device.last_ip = now, source_ip

    def _touch(self, device: Device, knock: Knock) -> None:
        self.seen(device, knock.source_ip)
        if knock.lease_ip is not None:
            device.lease_ip = knock.lease_ip
        # What an unauthenticated caller reports is kept for a machine waiting at the door; an approved machine's
        # facts are not anyone's to overwrite by naming its MAC.
        if knock.facts and device.status != DeviceStatus.APPROVED.value:
            merged = {**(device.facts or {}), **knock.facts}
            if merged != device.facts:
                device.facts = merged


def insert_ignoring_conflict(s: Session, model: type[Any], values: dict[str, Any], *, returning: Any) -> Any:
    """INSERT … ON CONFLICT DO NOTHING: concurrent first contacts of one machine (or first uses of one CA) make
    exactly one row. Returns the ``returning`` column of the new row, or None when another transaction made it."""
    dialect = s.get_bind().dialect.name
    key = (dialect, model, returning.key, frozenset(values))
    stmt = _INSERTS.get(key)
    if stmt is None:
        # Built once per shape: a statement with its values inlined is a new cache key to compute every time,
        # which cost a first contact more than its SQL did.
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        table = model.__table__  # Core, not ORM: no ORM bulk-insert machinery for one row
        stmt = insert(table).values({k: bindparam(k) for k in values}).on_conflict_do_nothing()
        stmt = stmt.returning(table.c[returning.key])
        _INSERTS[key] = stmt
    return s.execute(stmt, values).scalar()


_INSERTS: dict[tuple[str, Any, str, frozenset[str]], Any] = {}
