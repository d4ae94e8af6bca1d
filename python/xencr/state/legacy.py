"""The schema before Alembic: numbered SQLite migrations, frozen.

``MIGRATIONS[i]`` took an SQLite state file from schema version ``i`` to ``i + 1`` (the
``schema_version`` table lists those applied). A file written by an xencr from before Alembic is
brought to ``SCHEMA_VERSION`` by these statements and then stamped with the Alembic baseline
(`migrate.py`); every later change is an Alembic revision. Never edit or append to them.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL,
            job_name TEXT NOT NULL,
            schedule_id TEXT,
            trigger TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            outcome TEXT NOT NULL DEFAULT 'running',
            error TEXT,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            process_start TEXT
        )""",
        "CREATE INDEX runs_by_job ON runs (job_id, started_at)",
        "CREATE INDEX runs_by_start ON runs (started_at)",
        "CREATE INDEX runs_by_outcome ON runs (outcome)",
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
            vm_uuid TEXT NOT NULL,
            vm_name TEXT NOT NULL,
            target_sr TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            outcome TEXT NOT NULL DEFAULT 'running',
            transfer TEXT,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            restore_point TEXT
        )""",
        "CREATE INDEX tasks_by_run ON tasks (run_id)",
        "CREATE INDEX tasks_by_vm_target ON tasks (vm_uuid, target_sr, id)",
        """CREATE TABLE task_disks (
            task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            disk TEXT NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (task_id, disk)
        )""",
    ),
    (
        # When the restore point was taken (its age is what the RPO measures, not the task's end),
        # orphans a task cleaned up, and the scheduler's fire times per (job, schedule).
        "ALTER TABLE tasks ADD COLUMN snapshot_time TEXT",
        "ALTER TABLE tasks ADD COLUMN cleaned INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE schedule_fires (
            job_id TEXT NOT NULL,
            schedule_id TEXT NOT NULL,
            last_fire TEXT,
            next_fire TEXT,
            PRIMARY KEY (job_id, schedule_id)
        )""",
    ),
    (
        # Objects a task found detached; each restore point disk's block map (`blockmap`): the map
        # digest per task disk, the maps themselves by digest (compressed, shared by equal content),
        # and which restore point disk uses which map, so that maps are dropped once none does.
        "ALTER TABLE tasks ADD COLUMN detached INTEGER NOT NULL DEFAULT 0",
        # The target as people name it (pool/SR name at the time), beside its SR UUID.
        "ALTER TABLE tasks ADD COLUMN target TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE task_disks ADD COLUMN map TEXT",
        """CREATE TABLE block_maps (
            digest TEXT PRIMARY KEY,
            data BLOB NOT NULL,
            blocks INTEGER NOT NULL,
            touched_at TEXT NOT NULL
        )""",
        """CREATE TABLE map_refs (
            restore_point TEXT NOT NULL,
            disk TEXT NOT NULL,
            digest TEXT NOT NULL,
            PRIMARY KEY (restore_point, disk)
        )""",
        "CREATE INDEX map_refs_by_digest ON map_refs (digest)",
    ),
    (
        # Failovers (`dr.failover`): one row per plan and source VM, written before anything is
        # done to it, so a failover run again after a kill continues and never starts a VM twice.
        """CREATE TABLE failovers (
            plan TEXT NOT NULL,
            vm_uuid TEXT NOT NULL,
            vm_name TEXT NOT NULL,
            job TEXT NOT NULL,
            pool TEXT NOT NULL,
            restore_point TEXT NOT NULL,
            grp INTEGER NOT NULL,
            start_delay INTEGER NOT NULL,
            clone INTEGER NOT NULL,
            token TEXT NOT NULL,
            vm TEXT,
            state TEXT NOT NULL,
            started_at TEXT,
            detail TEXT,
            recorded_at TEXT NOT NULL,
            PRIMARY KEY (plan, vm_uuid)
        )""",
    ),
    (
        # The health check of the task's new restore point (`health.HealthResult.line`): NULL
        # when none ran, else "passed: ..." or "failed: ...".
        "ALTER TABLE tasks ADD COLUMN health_check TEXT",
    ),
    (
        # Planned failovers (`dr.planned`): the step a plan's planned failover reached, and the
        # source VMs it shut down (so an abort, even a later attempt's, says how to restart them).
        # Its own table: a `failovers` row needs the restore point, known only after the last
        # delta, and makes `xencr failover PLAN` continue it.
        """CREATE TABLE planned_failovers (
            plan TEXT PRIMARY KEY,
            step TEXT NOT NULL,
            outcome TEXT NOT NULL,
            halted TEXT NOT NULL,
            detail TEXT,
            started_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    ),
    (
        # Failbacks (`dr.failback`): the step each failed-over VM's failback reached and the
        # objects it made (recorded before the next step), so a rerun continues.
        """CREATE TABLE failbacks (
            plan TEXT NOT NULL,
            vm_uuid TEXT NOT NULL,
            step TEXT NOT NULL,
            attempt TEXT NOT NULL,
            d1 TEXT,
            d2 TEXT,
            disks TEXT NOT NULL,
            old_disks TEXT NOT NULL,
            snapshot TEXT,
            detail TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (plan, vm_uuid)
        )""",
    ),
    (
        # Native DR recoveries (`dr.native.recover`): what each attempt found before it changed
        # anything and what it made, recorded before each step, so a rerun continues or cleans up.
        """CREATE TABLE native_recoveries (
            attempt TEXT PRIMARY KEY,
            pool TEXT NOT NULL,
            mode TEXT NOT NULL,
            outcome TEXT NOT NULL,
            srs_before TEXT NOT NULL,
            vms_before TEXT NOT NULL,
            apps_before TEXT NOT NULL,
            introduced TEXT NOT NULL,
            tasks TEXT NOT NULL,
            selected TEXT NOT NULL,
            started TEXT NOT NULL,
            network TEXT,
            detail TEXT,
            started_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    ),
    (
        # The path each disk took ("NBD + CBT", "stream: no NBD network on pool a"...), beside
        # the full/delta reason.
        "ALTER TABLE task_disks ADD COLUMN path TEXT",
        # A test failover's VMs (`monitor.rehearsals`): their start group, when each started, how
        # long its gate took; the run row (trigger dr-test) has the outcome.
        """CREATE TABLE rehearsals (
            run_id INTEGER PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
            plan TEXT NOT NULL,
            booted INTEGER NOT NULL,
            ok INTEGER NOT NULL,
            kept INTEGER NOT NULL
        )""",
        """CREATE TABLE rehearsal_vms (
            run_id INTEGER NOT NULL REFERENCES rehearsals (run_id) ON DELETE CASCADE,
            vm_uuid TEXT NOT NULL,
            name TEXT NOT NULL,
            clone TEXT NOT NULL,
            ok INTEGER NOT NULL,
            grp INTEGER,
            started_at TEXT,
            boot_seconds REAL,
            detail TEXT,
            PRIMARY KEY (run_id, name)
        )""",
    ),
    (
        # Attempts left incomplete by a kill, a timeout or a dropped link (`replication.resume`):
        # the replica kept for the next run to resume, what it was made of, and per disk how far
        # its stream had passed when last recorded.
        """CREATE TABLE resumes (
            job_id TEXT NOT NULL,
            vm_uuid TEXT NOT NULL,
            target_sr TEXT NOT NULL,
            attempt TEXT NOT NULL,
            snapshot TEXT NOT NULL,
            replica TEXT NOT NULL,
            shape TEXT NOT NULL,
            started_at TEXT NOT NULL,
            PRIMARY KEY (job_id, vm_uuid, target_sr)
        )""",
        """CREATE TABLE resume_disks (
            job_id TEXT NOT NULL,
            vm_uuid TEXT NOT NULL,
            target_sr TEXT NOT NULL,
            userdevice TEXT NOT NULL,
            vdi TEXT NOT NULL,
            position INTEGER NOT NULL DEFAULT 0,
            blocks INTEGER NOT NULL DEFAULT 0,
            stream_bytes INTEGER NOT NULL DEFAULT 0,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (job_id, vm_uuid, target_sr, userdevice),
            FOREIGN KEY (job_id, vm_uuid, target_sr) REFERENCES resumes (job_id, vm_uuid, target_sr)
                ON DELETE CASCADE
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)  # 10: the baseline revision's schema
