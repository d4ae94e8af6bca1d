"""History retention (`StateDB.prune_history`): what the forgotten runs' tasks added up to, per
job and worker, so that the metrics' counters never go backwards.

Frozen like the baseline: written out here, not taken from `xencr.state.schema`.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

STR = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def _s(name: str) -> sa.Column[str]:
    return sa.Column(name, STR, nullable=False)


def _n(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default=sa.text("0"))


def upgrade() -> None:
    op.create_table(
        "history_totals",
        _s("job_id"),
        _s("worker"),
        _s("outcome"),
        _s("transfer"),
        _n("tasks"),
        _n("bytes_sent"),
        _n("cleaned"),
        sa.PrimaryKeyConstraint("job_id", "worker", "outcome", "transfer", name="history_totals_pkey"),
    )
    op.create_table(
        "history_fulls",
        _s("job_id"),
        _s("reason"),
        _n("disks"),
        sa.PrimaryKeyConstraint("job_id", "reason", name="history_fulls_pkey"),
    )


def downgrade() -> None:
    op.drop_table("history_fulls")
    op.drop_table("history_totals")
