"""The state database: run history (runs, tasks, the reasons of each disk's transfer), each
restore point disk's block map, schedule fire times, and the records that let failovers,
failbacks, native recoveries and interrupted transfers continue after a kill.

SQLite (one file, the default) or PostgreSQL (shared by several xencr hosts), through
SQLAlchemy Core; the schema evolves by Alembic revisions. Layout:

- `rows`: the records as frozen dataclasses, and the stored time format;
- `schema`: the tables (SQLAlchemy ``MetaData``), the same for both engines;
- `engine`: connecting (SQLite's WAL and immediate write transactions; PostgreSQL's password);
- `migrate`: Alembic revisions (``alembic/versions``) and the frozen pre-Alembic SQLite
  migrations (`legacy`);
- `db`: `StateDB`, every read and write, and `open_state` (the configured database);
- `copy`: copying every table into another database (`xencr state migrate`).
"""

from xencr.state.db import StateDB, open_state
from xencr.state.engine import StateError
from xencr.state.legacy import MIGRATIONS, SCHEMA_VERSION
from xencr.state.rows import (
    FAILBACK_STEPS,
    FAILOVER_STATES,
    MAP_GRACE,
    NATIVE_MODES,
    NATIVE_OUTCOMES,
    PLANNED_OUTCOMES,
    PLANNED_STEPS,
    RUN_OUTCOMES,
    RUNNING,
    TASK_OUTCOMES,
    TRANSFERS,
    FailbackRow,
    FailoverRow,
    JobTotals,
    NativeRecoveryRow,
    PlannedRow,
    PointRow,
    RehearsalRow,
    RehearsedVmRow,
    ResumeDisk,
    ResumeRow,
    RunRow,
    RunSums,
    TaskRow,
    WorkerTotals,
)

__all__ = [
    "FAILBACK_STEPS",
    "FAILOVER_STATES",
    "MAP_GRACE",
    "MIGRATIONS",
    "NATIVE_MODES",
    "NATIVE_OUTCOMES",
    "PLANNED_OUTCOMES",
    "PLANNED_STEPS",
    "RUNNING",
    "RUN_OUTCOMES",
    "SCHEMA_VERSION",
    "TASK_OUTCOMES",
    "TRANSFERS",
    "FailbackRow",
    "FailoverRow",
    "JobTotals",
    "NativeRecoveryRow",
    "PlannedRow",
    "PointRow",
    "RehearsalRow",
    "RehearsedVmRow",
    "ResumeDisk",
    "ResumeRow",
    "RunRow",
    "RunSums",
    "StateDB",
    "StateError",
    "TaskRow",
    "WorkerTotals",
    "open_state",
]
