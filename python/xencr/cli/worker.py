"""`xencr worker list`: the workers sharing a PostgreSQL state, their liveness and their tasks."""

from __future__ import annotations

import typer

from xencr.cli.common import ConfigOption, JsonFlag, columns, load, print_json, reported
from xencr.coordination.view import cluster_view, unserved_line
from xencr.state import open_state

worker_app = typer.Typer(
    help="The workers of a cluster (`xencr daemon` on several hosts sharing a PostgreSQL state).",
    no_args_is_help=True,
)


def _age(seconds: float) -> str:
    s = int(seconds)
    return (
        f"{s // 3600}h{s % 3600 // 60:02d}m"
        if s >= 3600
        else f"{s // 60}m{s % 60:02d}s"
        if s >= 60
        else f"{s}s"
    )


@worker_app.command("list")
@reported
def list_command(json: JsonFlag = False, config: ConfigOption = None) -> None:
    """List every worker recorded in the state database: host, pid, the pools it may touch,
    heartbeat age, whether it is alive (heartbeat within its lease, not stopped) and the tasks
    it runs now; then the tasks no live worker may take.

    Example:  xencr worker list --json
    """
    cfg = load(config)
    if cfg.state.engine != "postgresql":
        if json:
            print_json({"workers": [], "unserved": []})
        else:
            typer.echo(
                f"no workers: the state is SQLite ({cfg.state.describe()}): the daemon runs on one host"
            )
        return
    with open_state(cfg) as db:
        view = cluster_view(db)
    names = {j.id: j.name for j in cfg.jobs.values()}
    if json:
        print_json(
            {
                "workers": [w.json() for w in view.workers],
                "unserved": [
                    {
                        "job": names.get(t.job_id),
                        "job_id": t.job_id,
                        "vm_uuid": t.vm_uuid or None,
                        "vm_name": t.vm_name,
                        "pools": list(t.pools),
                        "fire_at": t.fire_at.isoformat(),
                    }
                    for t in view.unserved
                ],
            }
        )
        return
    if not view.workers:
        typer.echo("no workers recorded yet (start `xencr daemon`)")
    else:
        rows = [
            [
                w.row.name,
                w.row.host,
                str(w.row.pid),
                ",".join(w.row.pools) or "all",
                _age(w.heartbeat_age),
                "yes" if w.alive else ("stopped" if w.row.stopped_at is not None else "no"),
                f"{w.tasks_running}/{w.row.slots}",
            ]
            for w in view.workers
        ]
        typer.echo(columns(["worker", "host", "pid", "pools", "heartbeat", "alive", "tasks"], rows))
    for t in view.unserved:
        typer.echo(unserved_line(t, names.get(t.job_id, t.job_id)))
