"""Several workers sharing a PostgreSQL state (`xencr.coordination`): the workers, the leases on
(VM, target SR), the numbered transfer and job slots, the fires claimed and the queue of their
tasks; and the worker that ran each run and task (NULL for runs of a single host).

Frozen like the baseline: written out here, not taken from `xencr.state.schema`.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STR = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _s(name: str, nullable: bool = True, default: str | None = None) -> sa.Column[str]:
    return sa.Column(
        name, STR, nullable=nullable, server_default=None if default is None else sa.text(f"'{default}'")
    )


def _i(name: str, default: int | None = None) -> sa.Column[int]:
    return sa.Column(
        name, sa.Integer(), nullable=False, server_default=None if default is None else sa.text(str(default))
    )


def _pk(table: str, *columns: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint(*columns, name=f"{table}_pkey")


def upgrade() -> None:
    with op.batch_alter_table("runs") as runs:
        runs.add_column(_s("worker"))
    with op.batch_alter_table("tasks") as tasks:
        tasks.add_column(_s("worker"))
    op.create_table(
        "workers",
        _s("name", False),
        _s("host", False),
        _i("pid"),
        _s("pools", False, ""),
        _i("slots", 1),
        _i("lease_seconds", 30),
        _s("started_at", False),
        _s("heartbeat_at", False),
        _s("stopped_at"),
        _pk("workers", "name"),
    )
    op.create_table(
        "leases",
        *(_s(c, False) for c in ("vm_uuid", "target_sr", "job_id", "job_name", "worker", "token")),
        _s("since", False),
        _s("expires_at", False),
        _pk("leases", "vm_uuid", "target_sr"),
    )
    op.create_index("leases_by_worker", "leases", ["worker"])
    op.create_table(
        "slots",
        _s("kind", False),
        _s("pool", False),
        _i("n"),
        _s("worker", False),
        _s("token", False),
        _s("expires_at", False),
        _pk("slots", "kind", "pool", "n"),
    )
    op.create_index("slots_by_worker", "slots", ["worker"])
    op.create_table(
        "fire_claims",
        *(_s(c, False) for c in ("job_id", "schedule_id", "fire_at", "worker", "claimed_at")),
        _pk("fire_claims", "job_id", "schedule_id", "fire_at"),
    )
    op.create_table(
        "queue",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        *(_s(c, False) for c in ("job_id", "schedule_id", "fire_at", "vm_uuid", "vm_name", "pools")),
        _s("state", False, "pending"),
        _s("worker"),
        _s("token"),
        sa.Column("slot", sa.Integer(), nullable=True),
        _s("enqueued_at", False),
        _s("claimed_at"),
        _s("expires_at"),
        _s("finished_at"),
        sa.Column("run_id", ID, nullable=True),
        _s("outcome"),
        _pk("queue", "id"),
        sa.UniqueConstraint(
            "job_id", "schedule_id", "fire_at", "vm_uuid", name="queue_job_id_schedule_id_fire_at_vm_uuid_key"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("queue_by_state", "queue", ["state", "fire_at", "id"])
    op.create_index("queue_by_worker", "queue", ["worker", "state"])


def downgrade() -> None:
    for name in ("queue", "fire_claims", "slots", "leases", "workers"):
        op.drop_table(name)
    with op.batch_alter_table("tasks") as tasks:
        tasks.drop_column("worker")
    with op.batch_alter_table("runs") as runs:
        runs.drop_column("worker")
