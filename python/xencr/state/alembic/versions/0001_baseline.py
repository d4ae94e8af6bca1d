"""Baseline: the schema the numbered SQLite migrations had reached (schema 10).

A fresh database (SQLite or PostgreSQL) starts here; an SQLite file from before Alembic is
brought to schema 10 by `xencr.state.legacy` and stamped with this revision instead.

Frozen: written out here rather than taken from `xencr.state.schema`, which follows the newest
revision. ``schema_version`` gets the rows 1..10, so that an xencr from before Alembic sees its
newest schema and one newer (a later row) refuses the database.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Text compares bytewise on both engines (PostgreSQL: the C collation); ids are SQLite's rowid.
STR = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _s(name: str, nullable: bool = True, default: str | None = None) -> sa.Column[str]:
    return sa.Column(
        name, STR, nullable=nullable, server_default=None if default is None else sa.text(f"'{default}'")
    )


def _i(
    name: str, type_: sa.types.TypeEngine[int] | None = None, default: int | None = None
) -> sa.Column[int]:
    return sa.Column(
        name,
        type_ if type_ is not None else sa.Integer(),
        nullable=False,
        server_default=None if default is None else sa.text(str(default)),
    )


def _pk(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint(*columns, name=f"{table}_pkey")


def _fk(table: str, columns: list[str], refs: list[str]) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(columns, refs, name=f"{table}_{columns[0]}_fkey", ondelete="CASCADE")


def upgrade() -> None:
    version = op.create_table(
        "schema_version",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        _s("applied_at", False),
        _pk("schema_version", "version"),
    )
    op.create_table(
        "runs",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        _s("job_id", False),
        _s("job_name", False),
        _s("schedule_id"),
        _s("trigger", False),
        _s("started_at", False),
        _s("finished_at"),
        _s("outcome", False, "running"),
        _s("error"),
        _s("host", False),
        _i("pid"),
        _s("process_start"),
        _pk("runs", "id"),
        sqlite_autoincrement=True,
    )
    op.create_index("runs_by_job", "runs", ["job_id", "started_at"])
    op.create_index("runs_by_start", "runs", ["started_at"])
    op.create_index("runs_by_outcome", "runs", ["outcome"])
    op.create_table(
        "tasks",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("run_id", ID, nullable=False),
        _s("vm_uuid", False),
        _s("vm_name", False),
        _s("target_sr", False),
        _s("started_at", False),
        _s("finished_at"),
        _s("outcome", False, "running"),
        _s("transfer"),
        _i("bytes_sent", sa.BigInteger(), 0),
        _s("error"),
        _s("restore_point"),
        _s("snapshot_time"),
        _i("cleaned", default=0),
        _i("detached", default=0),
        _s("target", False, ""),
        _s("health_check"),
        _fk("tasks", ["run_id"], ["runs.id"]),
        _pk("tasks", "id"),
        sqlite_autoincrement=True,
    )
    op.create_index("tasks_by_run", "tasks", ["run_id"])
    op.create_index("tasks_by_vm_target", "tasks", ["vm_uuid", "target_sr", "id"])
    op.create_table(
        "task_disks",
        sa.Column("task_id", ID, nullable=False),
        _s("disk", False),
        _s("reason", False),
        _s("map"),
        _s("path"),
        _fk("task_disks", ["task_id"], ["tasks.id"]),
        _pk("task_disks", "task_id", "disk"),
    )
    op.create_table(
        "schedule_fires",
        _s("job_id", False),
        _s("schedule_id", False),
        _s("last_fire"),
        _s("next_fire"),
        _pk("schedule_fires", "job_id", "schedule_id"),
    )
    op.create_table(
        "block_maps",
        _s("digest", False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        _i("blocks", sa.BigInteger()),
        _s("touched_at", False),
        _pk("block_maps", "digest"),
    )
    op.create_table(
        "map_refs",
        _s("restore_point", False),
        _s("disk", False),
        _s("digest", False),
        _pk("map_refs", "restore_point", "disk"),
    )
    op.create_index("map_refs_by_digest", "map_refs", ["digest"])
    op.create_table(
        "failovers",
        *(_s(c, False) for c in ("plan", "vm_uuid", "vm_name", "job", "pool", "restore_point")),
        _i("grp"),
        _i("start_delay"),
        _i("clone"),
        _s("token", False),
        _s("vm"),
        _s("state", False),
        _s("started_at"),
        _s("detail"),
        _s("recorded_at", False),
        _pk("failovers", "plan", "vm_uuid"),
    )
    op.create_table(
        "planned_failovers",
        *(_s(c, False) for c in ("plan", "step", "outcome", "halted")),
        _s("detail"),
        _s("started_at", False),
        _s("updated_at", False),
        _pk("planned_failovers", "plan"),
    )
    op.create_table(
        "failbacks",
        *(_s(c, False) for c in ("plan", "vm_uuid", "step", "attempt")),
        _s("d1"),
        _s("d2"),
        _s("disks", False),
        _s("old_disks", False),
        _s("snapshot"),
        _s("detail"),
        _s("updated_at", False),
        _pk("failbacks", "plan", "vm_uuid"),
    )
    op.create_table(
        "native_recoveries",
        *(
            _s(c, False)
            for c in (
                "attempt",
                "pool",
                "mode",
                "outcome",
                "srs_before",
                "vms_before",
                "apps_before",
                "introduced",
                "tasks",
                "selected",
                "started",
            )
        ),
        _s("network"),
        _s("detail"),
        _s("started_at", False),
        _s("updated_at", False),
        _pk("native_recoveries", "attempt"),
    )
    op.create_table(
        "rehearsals",
        sa.Column("run_id", ID, autoincrement=False, nullable=False),
        _s("plan", False),
        _i("booted"),
        _i("ok"),
        _i("kept"),
        _fk("rehearsals", ["run_id"], ["runs.id"]),
        _pk("rehearsals", "run_id"),
    )
    op.create_table(
        "rehearsal_vms",
        sa.Column("run_id", ID, nullable=False),
        _s("vm_uuid", False),
        _s("name", False),
        _s("clone", False),
        _i("ok"),
        sa.Column("grp", sa.Integer(), nullable=True),
        _s("started_at"),
        sa.Column("boot_seconds", sa.Float(), nullable=True),
        _s("detail"),
        _fk("rehearsal_vms", ["run_id"], ["rehearsals.run_id"]),
        _pk("rehearsal_vms", "run_id", "name"),
    )
    op.create_table(
        "resumes",
        *(
            _s(c, False)
            for c in (
                "job_id",
                "vm_uuid",
                "target_sr",
                "attempt",
                "snapshot",
                "replica",
                "shape",
                "started_at",
            )
        ),
        _pk("resumes", "job_id", "vm_uuid", "target_sr"),
    )
    op.create_table(
        "resume_disks",
        *(_s(c, False) for c in ("job_id", "vm_uuid", "target_sr", "userdevice", "vdi")),
        _i("position", sa.BigInteger(), 0),
        _i("blocks", sa.BigInteger(), 0),
        _i("stream_bytes", sa.BigInteger(), 0),
        _s("updated_at", False),
        _fk(
            "resume_disks",
            ["job_id", "vm_uuid", "target_sr"],
            ["resumes.job_id", "resumes.vm_uuid", "resumes.target_sr"],
        ),
        _pk("resume_disks", "job_id", "vm_uuid", "target_sr", "userdevice"),
    )
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    op.bulk_insert(version, [{"version": v, "applied_at": now} for v in range(1, 11)])


def downgrade() -> None:
    raise NotImplementedError("the state database is never downgraded below its baseline")
