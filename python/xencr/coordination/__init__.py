"""Several xencr workers sharing one PostgreSQL state: who runs what, and the rules that keep two
hosts from replicating one VM at once. Layer: on the state database, under the daemon; no XAPI
here. With an SQLite state none of this runs (flock files, in-process limits, one host).

Rules:

- **Workers** (`worker`). ``xencr daemon`` with a PostgreSQL state registers a row (``[worker]
  name``, default ``<hostname>-<pid>``; a name a live worker of another process holds is refused)
  and renews it every ``lease / 3`` together with every lease, slot and queue claim it holds, in
  one transaction. A worker is *alive* while its last heartbeat is younger than its lease and it
  has not stopped; a clean stop releases its claims and records ``stopped_at``. Every time these
  rules compare is the database server's clock, so hosts' clocks may differ.
- **Fires** (`queue.claim_fire`). Every worker computes the same fire times (cron, or multiples
  of ``every`` since the epoch); the first to insert (job, schedule, fire time) owns the fire,
  so a schedule fires once cluster-wide. The owner records the last fire for everyone (status
  shows the same next and last fire from any host).
- **Tasks** (`queue`). The owner of a fire queues, in the transaction that claims it, one task
  for the whole job; a worker that may touch the job's pools claims it like any task, asks the
  source pool for the job's VMs and queues one task per VM (a winner or an expander that dies
  loses no fire: its claim lapses and another worker expands the task); while no live worker
  may touch the pools it stays, reported. A newer fire of the same (job, schedule, VM)
  supersedes a task still pending: missed ticks are not queued, as on one host.
- **Claims** (`queue.claim_next`). A worker claims the oldest pending task of a job whose pools it
  may all touch (``[worker] pools``; empty: all) with ``SELECT ... FOR UPDATE SKIP LOCKED``, and
  a numbered job slot with it (`slots`: ``n < concurrency``), so a job's concurrency holds across
  workers. It runs the task as one run of the job for that VM (the run and its tasks name the
  worker), then marks it done with the run's outcome. At most ``[worker] slots`` tasks at once.
- **Leases** (`leases`): the per-(VM, target SR) lock of `service.locks` in the database. Taken
  when free, expired, or held by a stopped worker; a holder is named (`skipped: previous run still
  running on worker A`, `skipped: being replicated by job X on worker A since ...`).
- **Transfer slots** (`slots`): ``max_exports`` / ``max_imports`` of a pool as numbered rows; a
  transfer takes all of its slots in one transaction or none (no two transfers wait on each
  other), and gives them back after.
- **A worker that dies** stops renewing: after its lease its claims lapse, any worker's
  housekeeping puts its claimed tasks back to pending and closes its runs as interrupted; the
  next worker to claim a task runs it, and the runner resumes the interrupted transfer from the
  state database or cleans it up. A takeover waits at most lease + one heartbeat period.
- **A worker that loses the database** (a restart, a partition) keeps retrying with backoff
  (pooled connections are pinged first). If its claims could not be renewed for half a lease, it
  cancels its running tasks (their attempts are kept for a resume); whatever happens, the runner
  checks, right before committing a restore point, that the lease is still its own (renewing it),
  and does not commit otherwise. So a worker cut off from the database never commits a second
  restore point beside the one of the worker that took its task over: no (VM, target) ever has
  two attempts committing, and an attempt whose worker lost its lease ends ``interrupted``.
- **Affinity**: a task whose pools no live worker may touch stays pending and is reported, not
  silently late (a daemon log line, `xencr status`, the ``xencr_tasks_unserved`` metric).
- **Manual runs** (`xencr run`, a planned failover's last sync) with a PostgreSQL state take the
  same leases and slots under this process's name, renewed while the run lasts (`holding`).
"""

from xencr.coordination.holding import Holding, holding, locker_for
from xencr.coordination.worker import Worker, WorkerNameInUse, WorkerRow, worker_rows

__all__ = ["Holding", "Worker", "WorkerNameInUse", "WorkerRow", "holding", "locker_for", "worker_rows"]
