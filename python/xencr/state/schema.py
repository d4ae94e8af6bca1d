"""The state database's tables, for SQLite and PostgreSQL alike (SQLAlchemy Core ``MetaData``).

This is the schema the newest Alembic revision leaves (`alembic/versions/`): change a table here
and in a new revision together (the state tests compare a migrated database with this).

Portable choices, so that one definition means the same on both engines:
- times are fixed-width UTC text (`rows.time_text`): sortable, compared as text in SQL;
- text compares bytewise on both (PostgreSQL's ``C`` collation, SQLite's default), so ``ORDER BY``
  and ``<`` give one order whatever the server's locale;
- ids and byte counts are 64-bit (SQLite's ``INTEGER`` already is; the id stays SQLite's rowid);
- flags stay 0/1 integers, as the schema-10 SQLite files have them.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeEngine

# Constraint names a later `ALTER` (and Alembic's batch mode on SQLite) can refer to.
metadata = MetaData(
    naming_convention={
        "pk": "%(table_name)s_pkey",
        "fk": "%(table_name)s_%(column_0_name)s_fkey",
        "uq": "%(table_name)s_%(column_0_N_name)s_key",
        "ck": "%(table_name)s_%(constraint_name)s_check",
        "ix": "%(table_name)s_%(column_0_N_name)s_idx",
    }
)

STR: TypeEngine[str] = Text().with_variant(Text(collation="C"), "postgresql")
ID: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")  # SQLite: the rowid itself
BIG: TypeEngine[int] = BigInteger()


def _text(name: str, *, nullable: bool = True, default: str | None = None) -> Column[str]:
    return Column(
        name, STR, nullable=nullable, server_default=None if default is None else text(f"'{default}'")
    )


def _int(name: str, type_: TypeEngine[int] | None = None, *, default: int | None = None) -> Column[int]:
    return Column(
        name,
        type_ if type_ is not None else Integer(),
        nullable=False,
        server_default=None if default is None else text(str(default)),
    )


# The legacy numbered schema (`legacy.MIGRATIONS`): rows 1..10 mean "schema 10"; kept so that an
# xencr from before Alembic refuses a database written by a newer one rather than misreading it.
schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    _text("applied_at", nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    _text("job_id", nullable=False),
    _text("job_name", nullable=False),
    _text("schedule_id"),
    _text("trigger", nullable=False),
    _text("started_at", nullable=False),
    _text("finished_at"),
    _text("outcome", nullable=False, default="running"),
    _text("error"),
    _text("host", nullable=False),
    _int("pid"),
    _text("process_start"),
    _text("worker"),  # the cluster worker that ran it (PostgreSQL state, `xencr daemon`); NULL otherwise
    Index("runs_by_job", "job_id", "started_at"),
    Index("runs_by_start", "started_at"),
    Index("runs_by_outcome", "outcome"),
    sqlite_autoincrement=True,  # ids never reused, as the schema-10 files have them
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("run_id", ID, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    _text("vm_uuid", nullable=False),
    _text("vm_name", nullable=False),
    _text("target_sr", nullable=False),
    _text("started_at", nullable=False),
    _text("finished_at"),
    _text("outcome", nullable=False, default="running"),
    _text("transfer"),
    _int("bytes_sent", BIG, default=0),
    _text("error"),
    _text("restore_point"),
    _text("snapshot_time"),  # the restore point's moment: its age is what the RPO measures
    _int("cleaned", default=0),  # orphans this task cleaned up
    _int("detached", default=0),  # objects it found detached
    _text("target", nullable=False, default=""),  # pool/SR name at the time
    _text("health_check"),  # "passed: ..." / "failed: ...", NULL: not checked
    _text("worker"),  # as its run's
    Index("tasks_by_run", "run_id"),
    Index("tasks_by_vm_target", "vm_uuid", "target_sr", "id"),
    sqlite_autoincrement=True,
)

task_disks = Table(
    "task_disks",
    metadata,
    Column("task_id", ID, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    _text("disk", nullable=False),
    _text("reason", nullable=False),  # why it went full or delta
    _text("map"),  # its block map's digest
    _text("path"),  # the path it took ("NBD + CBT", "stream: ...")
    PrimaryKeyConstraint("task_id", "disk"),
)

schedule_fires = Table(
    "schedule_fires",
    metadata,
    _text("job_id", nullable=False),
    _text("schedule_id", nullable=False),
    _text("last_fire"),
    _text("next_fire"),
    PrimaryKeyConstraint("job_id", "schedule_id"),
)

# Block maps by digest (compressed, shared by equal content), and which restore point disk uses
# which, so that maps are dropped once none does.
block_maps = Table(
    "block_maps",
    metadata,
    _text("digest", nullable=False),
    Column("data", LargeBinary, nullable=False),
    _int("blocks", BIG),
    _text("touched_at", nullable=False),
    PrimaryKeyConstraint("digest"),
)

map_refs = Table(
    "map_refs",
    metadata,
    _text("restore_point", nullable=False),
    _text("disk", nullable=False),
    _text("digest", nullable=False),
    PrimaryKeyConstraint("restore_point", "disk"),
    Index("map_refs_by_digest", "digest"),
)

# Failovers (`dr.failover`): one row per plan and source VM, written before anything is done to
# it, so a failover run again after a kill continues and never starts a VM twice.
failovers = Table(
    "failovers",
    metadata,
    _text("plan", nullable=False),
    _text("vm_uuid", nullable=False),
    _text("vm_name", nullable=False),
    _text("job", nullable=False),
    _text("pool", nullable=False),
    _text("restore_point", nullable=False),
    _int("grp"),
    _int("start_delay"),
    _int("clone"),
    _text("token", nullable=False),
    _text("vm"),
    _text("state", nullable=False),
    _text("started_at"),
    _text("detail"),
    _text("recorded_at", nullable=False),
    PrimaryKeyConstraint("plan", "vm_uuid"),
)

planned_failovers = Table(
    "planned_failovers",
    metadata,
    _text("plan", nullable=False),
    _text("step", nullable=False),
    _text("outcome", nullable=False),
    _text("halted", nullable=False),
    _text("detail"),
    _text("started_at", nullable=False),
    _text("updated_at", nullable=False),
    PrimaryKeyConstraint("plan"),
)

failbacks = Table(
    "failbacks",
    metadata,
    _text("plan", nullable=False),
    _text("vm_uuid", nullable=False),
    _text("step", nullable=False),
    _text("attempt", nullable=False),
    _text("d1"),
    _text("d2"),
    _text("disks", nullable=False),
    _text("old_disks", nullable=False),
    _text("snapshot"),
    _text("detail"),
    _text("updated_at", nullable=False),
    PrimaryKeyConstraint("plan", "vm_uuid"),
)

native_recoveries = Table(
    "native_recoveries",
    metadata,
    _text("attempt", nullable=False),
    _text("pool", nullable=False),
    _text("mode", nullable=False),
    _text("outcome", nullable=False),
    _text("srs_before", nullable=False),
    _text("vms_before", nullable=False),
    _text("apps_before", nullable=False),
    _text("introduced", nullable=False),
    _text("tasks", nullable=False),
    _text("selected", nullable=False),
    _text("started", nullable=False),
    _text("network"),
    _text("detail"),
    _text("started_at", nullable=False),
    _text("updated_at", nullable=False),
    PrimaryKeyConstraint("attempt"),
)

rehearsals = Table(
    "rehearsals",
    metadata,
    Column(
        "run_id",
        ID,
        ForeignKey("runs.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    _text("plan", nullable=False),
    _int("booted"),
    _int("ok"),
    _int("kept"),
)

rehearsal_vms = Table(
    "rehearsal_vms",
    metadata,
    Column("run_id", ID, ForeignKey("rehearsals.run_id", ondelete="CASCADE"), nullable=False),
    _text("vm_uuid", nullable=False),
    _text("name", nullable=False),
    _text("clone", nullable=False),
    _int("ok"),
    Column("grp", Integer),
    _text("started_at"),
    Column("boot_seconds", Float),
    _text("detail"),
    PrimaryKeyConstraint("run_id", "name"),
)

# Attempts left incomplete by a kill, a timeout or a dropped link (`replication.resume`).
resumes = Table(
    "resumes",
    metadata,
    _text("job_id", nullable=False),
    _text("vm_uuid", nullable=False),
    _text("target_sr", nullable=False),
    _text("attempt", nullable=False),
    _text("snapshot", nullable=False),
    _text("replica", nullable=False),
    _text("shape", nullable=False),
    _text("started_at", nullable=False),
    PrimaryKeyConstraint("job_id", "vm_uuid", "target_sr"),
)

resume_disks = Table(
    "resume_disks",
    metadata,
    _text("job_id", nullable=False),
    _text("vm_uuid", nullable=False),
    _text("target_sr", nullable=False),
    _text("userdevice", nullable=False),
    _text("vdi", nullable=False),
    _int("position", BIG, default=0),
    _int("blocks", BIG, default=0),
    _int("stream_bytes", BIG, default=0),
    _text("updated_at", nullable=False),
    PrimaryKeyConstraint("job_id", "vm_uuid", "target_sr", "userdevice"),
    ForeignKeyConstraint(
        ["job_id", "vm_uuid", "target_sr"],
        ["resumes.job_id", "resumes.vm_uuid", "resumes.target_sr"],
        ondelete="CASCADE",
    ),
)

# What forgotten history added up to (`StateDB.prune_history`): the metrics' counters add it to
# what is still recorded, so that forgetting old runs never moves a counter backwards.
history_totals = Table(
    "history_totals",
    metadata,
    _text("job_id", nullable=False),
    _text("worker", nullable=False),  # the cluster worker that ran the tasks ("" for a host alone)
    _text("outcome", nullable=False),
    _text("transfer", nullable=False),  # "" when none
    _int("tasks", BIG, default=0),
    _int("bytes_sent", BIG, default=0),
    _int("cleaned", BIG, default=0),
    PrimaryKeyConstraint("job_id", "worker", "outcome", "transfer"),
)

history_fulls = Table(
    "history_fulls",
    metadata,
    _text("job_id", nullable=False),
    _text("reason", nullable=False),
    _int("disks", BIG, default=0),
    PrimaryKeyConstraint("job_id", "reason"),
)

# Several workers sharing a PostgreSQL state (`xencr.coordination`). Every time here is the
# database server's (one clock for every host), as fixed-width text like the others.
workers = Table(
    "workers",
    metadata,
    _text("name", nullable=False),
    _text("host", nullable=False),
    _int("pid"),
    _text("pools", nullable=False, default=""),  # the pools it may touch, comma-separated ("": all)
    _int("slots", default=1),  # tasks it runs at once
    _int("lease_seconds", default=30),  # its claims last this long past each heartbeat
    _text("started_at", nullable=False),
    _text("heartbeat_at", nullable=False),
    _text("stopped_at"),  # set by a clean stop (its claims released)
    PrimaryKeyConstraint("name"),
)

# The per-(VM, target SR) lock across hosts: the twin of `service.locks`' flock files.
leases = Table(
    "leases",
    metadata,
    _text("vm_uuid", nullable=False),
    _text("target_sr", nullable=False),
    _text("job_id", nullable=False),
    _text("job_name", nullable=False),
    _text("worker", nullable=False),
    _text("token", nullable=False),  # this one claim's, so a retried claim knows it already holds it
    _text("since", nullable=False),
    _text("expires_at", nullable=False),
    PrimaryKeyConstraint("vm_uuid", "target_sr"),
    Index("leases_by_worker", "worker"),
)

# Numbered places: ("export" | "import", pool, n < max_exports/max_imports) for transfers, ("job",
# job id, n < concurrency) for a job's tasks at once, whichever worker runs them.
slots = Table(
    "slots",
    metadata,
    _text("kind", nullable=False),
    _text("pool", nullable=False),
    _int("n"),
    _text("worker", nullable=False),
    _text("token", nullable=False),
    _text("expires_at", nullable=False),
    PrimaryKeyConstraint("kind", "pool", "n"),
    Index("slots_by_worker", "worker"),
)

# A schedule's fire, claimed once cluster-wide by the first worker to insert it.
fire_claims = Table(
    "fire_claims",
    metadata,
    _text("job_id", nullable=False),
    _text("schedule_id", nullable=False),
    _text("fire_at", nullable=False),  # the scheduled time (the same on every worker)
    _text("worker", nullable=False),
    _text("claimed_at", nullable=False),
    PrimaryKeyConstraint("job_id", "schedule_id", "fire_at"),
)

# The (job, VM) tasks of each fire; vm_uuid "" stands for all the job's VMs, not resolved yet.
queue = Table(
    "queue",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    _text("job_id", nullable=False),
    _text("schedule_id", nullable=False),
    _text("fire_at", nullable=False),
    _text("vm_uuid", nullable=False),
    _text("vm_name", nullable=False),
    _text("pools", nullable=False),  # every pool the task touches, comma-separated
    _text("state", nullable=False, default="pending"),  # pending | claimed | done
    _text("worker"),
    _text("token"),
    Column("slot", Integer),  # the job slot (`slots` "job") its claim holds
    _text("enqueued_at", nullable=False),
    _text("claimed_at"),
    _text("expires_at"),
    _text("finished_at"),
    Column("run_id", ID),
    _text("outcome"),
    UniqueConstraint("job_id", "schedule_id", "fire_at", "vm_uuid"),
    Index("queue_by_state", "state", "fire_at", "id"),  # the oldest pending first
    Index("queue_by_worker", "worker", "state"),  # a worker's claims, not its day of done rows
    sqlite_autoincrement=True,
)

# Held only while workers run: never copied by `xencr state migrate` (`copy.CONTENT_TABLES`).
COORDINATION_TABLES: tuple[Table, ...] = (workers, leases, slots, fire_claims, queue)

# Every table holding xencr's records, parents before children (the order a copy inserts in).
TABLES: tuple[Table, ...] = tuple(metadata.sorted_tables)
