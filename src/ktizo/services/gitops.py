"""The GitOps writer: every change to a machine (approval, change, rejection, deletion, discovery…) becomes a commit
in a local git repository, authored by whoever made it, pushed to a remote when one is configured.

It reads the events outbox (``Event.gitops_pending``), oldest first: for each event it writes the machine's files
(``gitops.manifests``) as the event left them, or removes them, and commits when the tree changed; the last event of a
machine in a batch writes the machine as the database holds it now, so the tree always ends at the registry's state.
Writing is idempotent: an event seen twice (a crash between the commit and the outbox update) changes nothing the
second time and makes no commit. Commits are local and safe; a push that fails leaves ``pushed`` behind ``head`` with
the error, and every run pushes again until the remote takes it.

One writer at a time: a thread lock and an ``flock`` on the repository (processes on one host: the server's job, a
``ktizo gitops sync``), and on PostgreSQL the ``gitops_state`` row ``FOR UPDATE SKIP LOCKED`` (replicas). On SQLite
the database's write lock is taken only for the short update at the end, never while git runs."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from ktizo.db import Database
from ktizo.db.models import Device, Event, GitopsState
from ktizo.db.types import utcnow
from ktizo.domain.errors import Conflict, NotReady
from ktizo.domain.users import UserRole
from ktizo.gitops import manifests
from ktizo.gitops.manifests import MANAGED_DIRS, Machine, Options
from ktizo.gitops.repo import Author, GitError, Repo, redact
from ktizo.services import audit
from ktizo.services.context import Actor
from ktizo.services.render import ConfigSource, Snapshot, gateway_for

BATCH = 500
_REMOVALS = frozenset({"device.deleted", "device.expired"})


@dataclass(frozen=True)
class SyncResult:
    commit: str | None  # None: the tree already matched the database
    changes: list[str] = field(default_factory=list)  # git status lines: "A hardware/node-01.yaml"…
    pushed: bool = False  # this sync pushed commits the remote lacked
    error: str | None = None  # why the push failed


@dataclass(frozen=True)
class GitopsStatus:
    repo: str
    remote: str | None  # credentials in a URL are shown as ***
    branch: str
    head: str | None
    pushed: str | None
    unpushed: int | None  # commits the remote lacks (None: unknown)
    pending_events: int
    last_error: str | None
    updated_at: dt.datetime | None


@dataclass(frozen=True)
class _Probe:
    """What ``Snapshot.groups_for`` reads of a device."""

    id: int
    labels: dict[str, str]


def _line(value: Any) -> str:
    if isinstance(value, str) and value.isprintable():
        return value
    return json.dumps(value, default=str, ensure_ascii=True, sort_keys=True)


def message(event: Event, machine: Mapping[str, Any]) -> str:
    """``device.approved: node-01 (52:54:00:12:34:56) by alice``, the audit details, and trailers naming the event."""
    ident = machine.get("mac_address") or machine.get("machine_id") or f"device {event.device_id}"
    who = f"{machine['hostname']} ({ident})" if machine.get("hostname") else str(ident)
    lines = [_line(f"{event.event}: {who} by {event.actor}"), ""]
    details = (event.payload or {}).get("details") or {}
    for key, value in details.items():
        if value not in (None, "", {}, []):
            lines.append(f"{_line(key)}: {_line(value)}")
    if details:
        lines.append("")
    lines += [f"Ktizo-Event: {event.id}", f"Ktizo-Device: {event.device_id}", f"Ktizo-Actor-Type: {event.actor_type}"]
    return "\n".join(lines) + "\n"


class GitopsService:
    def __init__(
        self,
        db: Database,
        source: ConfigSource | None,
        repo_path: Path,
        remote: str | None = None,
        *,
        branch: str = "main",
        namespace: str = "tink-system",
        discovery_timeout: dt.timedelta = dt.timedelta(hours=24),
        include_patches: bool = False,
        timeout: float = 30.0,
        interval: float = 5.0,
    ) -> None:
        self.db = db
        self.interval = interval  # seconds between the job's runs
        self.source = source
        self.repo = Repo(repo_path, branch=branch, timeout=timeout)
        self.remote = remote or None
        self.options = Options(
            namespace=namespace, discovery_timeout=discovery_timeout, include_patches=include_patches
        )
        self._thread_lock = threading.Lock()
        self._sessions = sessionmaker(db.write_engine, expire_on_commit=False, autoflush=False)

    # -- the job ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Write the pending events into the repository (a commit each that changed something), then push what the
        remote lacks. Returns the events done (+1 for a push)."""
        with self._locked() as session:
            if session is None:
                return 0
            state = self._state()
            self._catch_up(state)
            with self.db.read() as s:
                events = list(
                    s.scalars(select(Event).where(Event.gitops_pending.is_(True)).order_by(Event.id).limit(BATCH))
                )
                ids = {e.device_id for e in events if e.device_id is not None}
                rows = {d.id: d for d in s.scalars(select(Device).where(Device.id.in_(ids)))} if ids else {}
            if not events and (not self.remote or state.pushed == self.repo.head()):
                return 0
            snap = self._snapshot()
            last = {e.device_id: e.id for e in events}
            index = self._index()
            for event in events:
                if event.device_id is None:
                    continue
                row = rows.get(event.device_id)
                machine: Machine | None
                if event.event in _REMOVALS or (row is None and last[event.device_id] == event.id):
                    machine = None
                elif last[event.device_id] == event.id:
                    machine = self._machine(_columns(row), row, snap)
                else:
                    machine = self._machine((event.payload or {}).get("machine") or _columns(row), row, snap, event)
                self._place(index, event.device_id, machine)
                shown = (event.payload or {}).get("machine") or {}
                self.repo.commit(message(event, shown), Author.of(event.actor), MANAGED_DIRS, when=event.at)
            pushed, error = self._push(state)
            self._save(session, [e.id for e in events], pushed, error)
            return len(events) + (1 if pushed and pushed != state.pushed else 0)

    # -- ktizo gitops sync -----------------------------------------------------------------------------

    def sync(self, actor: Actor) -> SyncResult:
        """Rewrite the whole tree from the database: one commit by ``actor`` if anything differs, none otherwise.
        The pending events it covers are done; what the remote lacks is pushed."""
        actor.require(UserRole.ADMIN)
        with self._locked() as session:
            if session is None:
                raise Conflict("another Ktizo replica is writing the GitOps repository; try again in a moment")
            state = self._state()
            self._catch_up(state)
            with self.db.read() as s:
                covered = s.scalar(select(func.max(Event.id)).where(Event.gitops_pending.is_(True)))
                rows = list(s.scalars(select(Device).order_by(Device.id)))
            snap = self._snapshot()
            wanted: dict[str, str] = {}
            for row in rows:
                wanted.update(manifests.files_of(self._machine(_columns(row), row, snap), self.options))
            for rel in list(self.repo.files(MANAGED_DIRS)):
                if rel not in wanted:
                    self.repo.remove(rel)
            for rel, text in wanted.items():
                self.repo.write(rel, text)
            changes = self.repo.changes(MANAGED_DIRS)
            commit = None
            if changes:
                text = f"gitops.sync: {len(changes)} file(s) rewritten from the database by {actor.name}\n\n"
                text += "\n".join(changes) + "\n"
                commit = self.repo.commit(text, Author.of(actor.name), MANAGED_DIRS)
            pushed, error = self._push(state)
            done = []
            if covered is not None:
                with self.db.read() as s:
                    done = list(s.scalars(select(Event.id).where(Event.gitops_pending.is_(True), Event.id <= covered)))
            self._save(session, done, pushed, error)
        with self.db.write() as s:
            audit.record(s, actor, "gitops_sync", None, {"commit": commit, "changes": len(changes)})
        return SyncResult(
            commit=commit, changes=changes, pushed=pushed is not None and pushed != state.pushed, error=error
        )

    def status(self) -> GitopsStatus:
        with self.db.read() as s:
            state = s.get(GitopsState, 1)
            pending = s.scalar(select(func.count()).select_from(Event).where(Event.gitops_pending.is_(True))) or 0
        head = self.repo.head() if (self.repo.path / ".git").exists() else None
        pushed = state.pushed if state else None
        unpushed = None
        if self.remote and head is not None:
            try:
                unpushed = self.repo.count(pushed, head)
            except GitError:
                unpushed = None
        return GitopsStatus(
            repo=str(self.repo.path),
            remote=redact(self.remote) if self.remote else None,
            branch=self.repo.branch,
            head=head,
            pushed=pushed,
            unpushed=unpushed,
            pending_events=int(pending),
            last_error=state.last_error if state else None,
            updated_at=state.updated_at if state else None,
        )

    # -- helpers ---------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[Session | None]:
        """The writer's lock; yields the session that writes the outcome (None: another replica holds it)."""
        with self._thread_lock:
            try:
                self.repo.ensure()
            except GitError as exc:
                raise NotReady(f"GitOps repository: {exc}") from None
            with open(self.repo.path / ".git" / "ktizo-writer.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    with self._sessions() as session:
                        if self.db.dialect != "sqlite":
                            stmt = select(GitopsState.id).where(GitopsState.id == 1).with_for_update(skip_locked=True)
                            if session.scalar(stmt) is None:
                                yield None
                                return
                        try:
                            yield session
                        except GitError as exc:
                            raise NotReady(f"GitOps repository: {exc}") from None
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def _state(self) -> GitopsState:
        with self.db.read() as s:
            state = s.get(GitopsState, 1)
        return state if state is not None else GitopsState(id=1)

    def _catch_up(self, state: GitopsState) -> None:
        """Another replica wrote (and pushed) since this clone last did: start from the remote's branch."""
        if self.remote and state.head and state.head != self.repo.head():
            self.repo.fast_forward(self.remote)

    def _push(self, state: GitopsState) -> tuple[str | None, str | None]:
        """(the commit the remote now has, the push error)."""
        head = self.repo.head()
        if not self.remote or head is None:
            return state.pushed, None
        if head == state.pushed:
            return head, None
        try:
            self.repo.push(self.remote)
        except GitError as exc:
            return state.pushed, str(exc)
        return head, None

    def _save(self, session: Session, done: list[int], pushed: str | None, error: str | None) -> None:
        for start in range(0, len(done), 500):
            chunk = done[start : start + 500]
            session.execute(update(Event).where(Event.id.in_(chunk)).values(gitops_pending=False))
        session.execute(
            update(GitopsState)
            .where(GitopsState.id == 1)
            .values(head=self.repo.head(), pushed=pushed, last_error=error, updated_at=utcnow())
        )
        session.commit()

    def _snapshot(self) -> Snapshot | None:
        return self.source.snapshot() if self.source is not None else None

    def _index(self) -> dict[int, set[str]]:
        """Device id -> the manifests the work tree holds for it (by their ``ktizo.dev/device-id`` annotation)."""
        index: dict[int, set[str]] = {}
        for rel in self.repo.files((manifests.HARDWARE_DIR, manifests.DISCOVERED_DIR)):
            device_id = manifests.device_id_in(self.repo.read(rel) or "")
            if device_id is not None:
                index.setdefault(device_id, set()).add(rel)
        return index

    def _place(self, index: dict[int, set[str]], device_id: int, machine: Machine | None) -> None:
        """Write the machine's files, removing what it had elsewhere (a new hostname moves them); None removes."""
        files = manifests.files_of(machine, self.options) if machine is not None else {}
        for rel in index.pop(device_id, set()):
            for old in (rel, f"{manifests.DEVICES_DIR}/{rel.rsplit('/', 1)[-1]}"):
                if old not in files:
                    self.repo.remove(old)
        for rel, text in files.items():
            self.repo.write(rel, text)
        manifest = next((rel for rel in files if not rel.startswith(manifests.DEVICES_DIR)), None)
        if manifest is not None:
            index[device_id] = {manifest}

    def _machine(
        self, values: Mapping[str, Any], row: Device | None, snap: Snapshot | None, event: Event | None = None
    ) -> Machine:
        """The machine as ``values`` (an event's payload, or the row's columns) say, with what only the row holds."""
        device_id = int(values.get("id") or (row.id if row else 0))
        labels = dict(values.get("labels") or {})
        address = values.get("ip_address")
        gateway = None
        nameservers: tuple[str, ...] = ()
        if snap is not None and address:
            groups = snap.groups_for(_Probe(device_id, labels))  # type: ignore[arg-type]
            gateway = gateway_for(address, snap, groups)
            nameservers = tuple(next((g.nameservers for g in reversed(groups) if g.nameservers), snap.nameservers))
        first_seen: dt.datetime | None
        if row is not None:
            source, first_seen = row.source, row.first_seen
        else:
            source = "manual" if event is not None and event.event == "device.created" else "discovered"
            first_seen = event.at if event is not None else None
        return Machine(
            id=device_id,
            kind=values.get("kind") or "talos",
            status=values.get("status") or "pending",
            mac_address=values.get("mac_address"),
            machine_id=values.get("machine_id"),
            machine_uid=row.machine_uid if row else None,
            uuid=values.get("uuid"),
            hostname=values.get("hostname"),
            ip_address=address,
            role=values.get("role"),
            labels=labels,
            patch=row.patch if row else None,
            install_disk=row.install_disk if row else None,
            extra_nics=tuple(row.extra_nics or ()) if row else (),
            source=source,
            first_seen=first_seen,
            gateway=gateway,
            nameservers=nameservers,
        )


def _columns(row: Device | None) -> dict[str, Any]:
    if row is None:
        return {}
    names = ("id", "kind", "status", "mac_address", "machine_id", "uuid", "hostname", "ip_address", "role", "labels")
    return {name: getattr(row, name) for name in names}
