"""What mirrored SRs hold: the pool databases in their metadata VDIs, and the VMs and vApps
those databases describe (xapi.md §5.2: `DR_task.create`, `VDI.open_database`).

**Newest information wins**, decided as XAPI decides it, in two steps:

1. Of the metadata VDIs holding one foreign pool's database, only the one XAPI marks
   `metadata_latest` is read: XAPI sets it on the copy with the highest database generation when
   it plugs the SRs. The others are listed as older copies, not used.
2. A VM found in the databases of several pools (it was recovered from one to the other and back)
   is taken from the copy with the highest `VM.version`: XAPI increments it at each recovery and
   `VM.recover` compares exactly that number with a VM already in the recovery pool
   (`VM_TO_IMPORT_IS_NOT_NEWER_VERSION` when the existing one is as new or newer). Equal
   versions: the first pool by name, said so.

Reading is side-effect free for the caller who asks it (`keep=False`): the DR tasks made to attach
SRs are destroyed again, forgetting the SRs they introduced, and the database sessions are logged
out."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from xencr.config import ConfigError
from xencr.dr.native.metadata import METADATA_SR_TYPES, find_sr
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession

NULL = "OpaqueRef:NULL"


@dataclass(frozen=True)
class LunSource:
    """A mirrored LUN to attach (`--sr-config`): the SM type and its device configuration."""

    type: str
    device_config: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str, sr_type: str = "lvmoiscsi") -> LunSource:
        """``target=10.0.0.9,targetIQN=iqn...,SCSIid=36001...`` (keys as `xe sr-probe` takes them)."""
        pairs = []
        for item in text.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"--sr-config {text!r}: expected key=value[,key=value...]")
            pairs.append((key.strip(), value.strip()))
        if sr_type not in METADATA_SR_TYPES:
            # XAPI's own refusal (xapi_dr_task.ml), before anything is attached.
            raise XapiError(
                "OPERATION_NOT_ALLOWED", [f"Disaster recovery not supported on SRs of type {sr_type}"]
            )
        return cls(sr_type, tuple(pairs))

    @property
    def config(self) -> dict[str, str]:
        return dict(self.device_config)

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.device_config)


@dataclass(frozen=True)
class Database:
    """One metadata VDI holding a foreign pool's database."""

    vdi_uuid: str
    sr_uuid: str
    sr_name: str
    pool_uuid: str  # the pool whose database it is
    latest: bool  # XAPI's metadata_latest: the newest copy of that pool's database

    def where(self) -> str:
        return f"metadata VDI {self.vdi_uuid} on SR {self.sr_name}"


@dataclass(frozen=True)
class FoundVm:
    """A VM as a foreign database describes it (the fields a recovery carries over)."""

    uuid: str
    name: str
    version: int
    order: int
    start_delay: int
    shutdown_delay: int
    ha_restart_priority: str
    power_state: str  # in the database, when it was written
    memory: int  # memory_static_max
    vcpus: int
    appliance: str | None  # the vApp's UUID
    pool_uuid: str
    pool_name: str
    database: str  # its metadata VDI's UUID
    missing_srs: tuple[str, ...]  # SRs it needs that the recovery pool has not attached


@dataclass(frozen=True)
class FoundApp:
    uuid: str
    name: str
    vms: tuple[str, ...]  # member VM UUIDs
    database: str


@dataclass(frozen=True)
class Existing:
    """A VM with the same UUID already in the recovery pool."""

    ref: str
    version: int
    power_state: str


@dataclass
class Found:
    """What the attached SRs hold, chosen newest first; ``sessions``: metadata VDI UUID -> the
    database session (open while the ``opened`` block runs)."""

    pool: str
    pool_uuid: str
    databases: list[Database] = field(default_factory=list)
    vms: dict[str, FoundVm] = field(default_factory=dict)  # VM UUID -> the copy used
    apps: dict[str, FoundApp] = field(default_factory=dict)
    existing: dict[str, Existing] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # copies not used, and why
    sessions: dict[str, XapiSession] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)  # DR tasks this read made

    def app_name(self, uuid: str | None) -> str | None:
        return self.apps[uuid].name if uuid and uuid in self.apps else None


class Journal(Protocol):
    """Told before each SR is attached and after each DR task is made, so that a run killed in
    between can still be cleaned up."""

    def will_attach(self, sr_uuids: Sequence[str]) -> None: ...

    def attached(self, task: str) -> None: ...


class _NoJournal:
    def will_attach(self, sr_uuids: Sequence[str]) -> None:
        return None

    def attached(self, task: str) -> None:
        return None


_SR_UUID = re.compile(r"<UUID>\s*([^<\s]+)\s*</UUID>")


def probe(t: XapiSession, lun: LunSource) -> list[str]:
    """The UUIDs of the SRs the LUN holds (`SR.probe` with metadata=true, as DR_task.create does)."""
    pool = t.api.pool.get_all()[0]
    xml = str(
        t.call_once("SR.probe", t.api.pool.get_master(pool), lun.config, lun.type, {"metadata": "true"})
    )
    return _SR_UUID.findall(xml)


def attach(
    t: XapiSession, pool: str, luns: Sequence[LunSource], wanted: Sequence[str], journal: Journal
) -> tuple[list[str], list[str]]:
    """Attach the SRs the LUNs hold with one DR task each (only those in ``wanted`` when given):
    (DR task refs, SR UUIDs found). SRs the pool knows already are left as they are."""
    tasks, found = [], []
    for lun in luns:
        uuids = probe(t, lun)
        if not uuids:
            raise ConfigError(f"pool {pool}: no SR with DR metadata found on LUN {lun.describe()}")
        whitelist = [u for u in uuids if not wanted or u in wanted]
        journal.will_attach(whitelist)
        tasks.append(str(t.call_once("DR_task.create", lun.type, lun.config, whitelist)))
        journal.attached(tasks[-1])
        found += whitelist
    return tasks, found


def destroy_tasks(t: XapiSession, tasks: Sequence[str]) -> list[str]:
    """`DR_task.destroy` each (it unplugs and forgets the SRs still introduced by it); problems
    as lines, never raised: the caller is cleaning up."""
    problems = []
    for task in tasks:
        try:
            t.call_once("DR_task.destroy", task)
        except (XapiError, PoolUnreachable) as err:
            problems.append(f"DR task {task}: {err}")
    return problems


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def _databases(t: XapiSession, pool_uuid: str, srs: Mapping[str, dict[str, Any]]) -> list[Database]:
    out = []
    for ref, rec in t.api.VDI.get_all_records().items():
        if rec["type"] != "metadata" or rec["SR"] not in srs:
            continue
        foreign = str(t.call("VDI.read_database_pool_uuid", ref))
        if not foreign or foreign == pool_uuid:
            continue  # this pool's own database (it replicates there too)
        sr = srs[rec["SR"]]
        out.append(
            Database(
                str(rec["uuid"]),
                str(sr["uuid"]),
                str(sr["name_label"]),
                foreign,
                bool(rec["metadata_latest"]),
            )
        )
    return sorted(out, key=lambda d: (d.pool_uuid, not d.latest, d.vdi_uuid))


def _read(t: XapiSession, f: XapiSession, db: Database) -> tuple[str, list[FoundVm], list[FoundApp]]:
    pools = f.api.pool.get_all_records()
    pool_name = next((str(p["name_label"]) for p in pools.values()), "") or db.pool_uuid
    apps_by_ref = f.api.VM_appliance.get_all_records()
    srs = f.api.SR.get_all_records()
    vms: list[FoundVm] = []
    members: dict[str, list[str]] = {}
    for ref, rec in f.api.VM.get_all_records().items():
        if rec["is_a_snapshot"] or rec["is_a_template"] or rec["is_control_domain"]:
            continue
        missing = f.call("VM.get_SRs_required_for_recovery", ref, t.ref)
        app = rec["appliance"]
        vms.append(
            FoundVm(
                uuid=str(rec["uuid"]),
                name=str(rec["name_label"]),
                version=_int(rec["version"]),
                order=_int(rec["order"]),
                start_delay=_int(rec["start_delay"]),
                shutdown_delay=_int(rec["shutdown_delay"]),
                ha_restart_priority=str(rec["ha_restart_priority"]),
                power_state=str(rec["power_state"]),
                memory=_int(rec["memory_static_max"]),
                vcpus=_int(rec["VCPUs_max"]),
                appliance=str(apps_by_ref[app]["uuid"]) if app in apps_by_ref else None,
                pool_uuid=db.pool_uuid,
                pool_name=pool_name,
                database=db.vdi_uuid,
                missing_srs=tuple(
                    f"{srs[s]['name_label']} ({srs[s]['uuid']})" if s in srs else str(s) for s in missing
                ),
            )
        )
        if app in apps_by_ref:
            members.setdefault(app, []).append(str(rec["uuid"]))
    apps = [
        FoundApp(str(a["uuid"]), str(a["name_label"]), tuple(sorted(members.get(ref, []))), db.vdi_uuid)
        for ref, a in apps_by_ref.items()
    ]
    return pool_name, vms, apps


def choose(candidates: Sequence[FoundVm]) -> tuple[dict[str, FoundVm], list[str]]:
    """The copy of each VM to use (the module's rule 2) and a line for each copy not used."""
    by_uuid: dict[str, list[FoundVm]] = {}
    for vm in candidates:
        by_uuid.setdefault(vm.uuid, []).append(vm)
    chosen, notes = {}, []
    for uuid, copies in by_uuid.items():
        copies.sort(key=lambda v: (-v.version, v.pool_name, v.database))
        best = chosen[uuid] = copies[0]
        for other in copies[1:]:
            why = (
                f"version {other.version} < {best.version}"
                if other.version < best.version
                else f"same version {best.version}: the first pool by name is used"
            )
            notes.append(
                f"VM {best.name}: the copy in pool {other.pool_name}'s database is not used ({why}); "
                f"using pool {best.pool_name}'s"
            )
    return chosen, notes


@contextlib.contextmanager
def opened(
    t: XapiSession,
    pool: str,
    luns: Sequence[LunSource],
    from_srs: Sequence[str],
    *,
    keep: bool,
    journal: Journal | None = None,
) -> Iterator[Found]:
    """Attach the LUNs' SRs, open the newest database of each foreign pool and read it. On exit
    the database sessions are logged out and, unless ``keep``, the DR tasks destroyed."""
    pool_ref = t.api.pool.get_all()[0]
    out = Found(pool, str(t.api.pool.get_uuid(pool_ref)))
    try:
        wanted = []
        named: list[str] = []
        for name in from_srs:
            if re.fullmatch(r"[0-9a-fA-F-]{36}", name):
                wanted.append(name)
            else:
                named.append(name)
        out.tasks, attached = attach(t, pool, luns, wanted, journal or _NoJournal()) if luns else ([], [])
        srs_all = t.api.SR.get_all_records()
        by_uuid = {str(rec["uuid"]): str(ref) for ref, rec in srs_all.items()}
        uuids = list(attached)
        for name in from_srs:
            if name in attached:
                continue
            if luns and name in wanted:
                raise ConfigError(f"pool {pool}: SR {name} is not on the LUNs given with --sr-config")
            ref, rec = find_sr(t, pool, name)
            uuids.append(str(rec["uuid"]))
        if not uuids:
            raise ConfigError(f"pool {pool}: no SR to read: give --sr-config (a mirrored LUN) or --from-sr")
        srs = {by_uuid[u]: srs_all[by_uuid[u]] for u in dict.fromkeys(uuids) if u in by_uuid}
        out.databases = _databases(t, out.pool_uuid, srs)
        if not out.databases:
            names = ", ".join(str(r["name_label"]) for r in srs.values())
            raise ConfigError(f"pool {pool}: no other pool's metadata on SR {names}")
        candidates: list[FoundVm] = []
        for db in out.databases:
            if not db.latest:
                out.notes.append(
                    f"{db.where()}: an older copy of pool {db.pool_uuid}'s database"
                    " (not metadata_latest): not used"
                )
                continue
            f = out.sessions[db.vdi_uuid] = t.foreign(
                str(t.call_once("VDI.open_database", t.api.VDI.get_by_uuid(db.vdi_uuid)))
            )
            _, vms, apps = _read(t, f, db)
            candidates += vms
            for app in apps:
                out.apps.setdefault(app.uuid, app)
        out.vms, notes = choose(candidates)
        out.notes += notes
        for ref, rec in t.api.VM.get_all_records().items():
            if str(rec["uuid"]) in out.vms and not rec["is_a_snapshot"]:
                out.existing[str(rec["uuid"])] = Existing(
                    str(ref), _int(rec["version"]), str(rec["power_state"])
                )
        yield out
    finally:
        for s in out.sessions.values():
            s.logout()
        if not keep:
            destroy_tasks(t, out.tasks)
