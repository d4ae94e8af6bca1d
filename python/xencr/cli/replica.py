"""`xencr replica list|clone|protect|unprotect`: restore points on the targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from xencr.cli.common import ConfigOption, load, reported
from xencr.cli.errors import CliError
from xencr.config import Config
from xencr.replication import metadata as md
from xencr.replication.jobs import connect
from xencr.xapi.session import XapiSession

replica_app = typer.Typer(help="List, clone and (un)protect restore points.", no_args_is_help=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", envvar="XENCR_CONFIG", help="Configuration file (default: user config dir)."),
]


def _replicas(s: XapiSession) -> list[dict[str, Any]]:
    out = []
    for ref, rec in s.api.VM.get_all_records().items():
        oc = rec["other_config"]
        if rec["is_a_snapshot"] or oc.get(md.ROLE) != "replica":
            continue
        out.append(rec | {"ref": str(ref)})
    return sorted(
        out, key=lambda r: (r["other_config"].get(md.VM, ""), r["other_config"].get(md.SNAPSHOT_TIME, ""))
    )


def _target_pools(cfg: Config) -> list[str]:
    names = []
    for job in cfg.jobs.values():
        names += [t.pool for t in job.targets if t.pool not in names]
    return names


def _find(cfg: Config, replica: str) -> tuple[XapiSession, dict[str, Any]]:
    """A replica by UUID or name on any target pool (the caller logs the session out)."""
    for pool in _target_pools(cfg):
        s = connect(cfg.pool(pool), interactive=sys.stdin.isatty())
        for rec in _replicas(s):
            if replica in (rec["uuid"], rec["name_label"]):
                return s, rec
        s.logout()
    raise CliError(f"no replica {replica!r} on the target pools")


@replica_app.command("list")
@reported
def list_command(
    job: Annotated[str | None, typer.Argument(help="Only this job's (name or id).")] = None,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOption = None,
) -> None:
    """List restore points (complete) and interrupted replicas on every target pool.

    Example:  xencr replica list web-servers --json
    """
    cfg = load(config)
    job_id = cfg.job(job).id if job else None
    rows = []
    for pool in _target_pools(cfg):
        with connect(cfg.pool(pool), interactive=sys.stdin.isatty()) as s:
            for rec in _replicas(s):
                oc = rec["other_config"]
                if job_id and oc.get(md.JOB) != job_id:
                    continue
                rows.append(
                    {
                        "pool": pool,
                        "uuid": rec["uuid"],
                        "name": rec["name_label"],
                        "source_vm": oc.get(md.VM),
                        "snapshot_time": oc.get(md.SNAPSHOT_TIME),
                        "complete": oc.get(md.COMPLETE) == "true",
                        "bytes": int(oc.get(md.BYTES, "0")),
                        "protected": "start" in rec["blocked_operations"],
                        "power_state": rec["power_state"],
                    }
                )
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        state = "complete" if r["complete"] else "INCOMPLETE"
        prot = "protected" if r["protected"] else "UNPROTECTED"
        typer.echo(f"{r['pool']}  {r['uuid']}  {r['name']}  {state}  {prot}  {r['power_state']}")
    typer.echo(f"{len(rows)} replica(s)")


@replica_app.command("clone")
@reported
def clone_command(
    replica: Annotated[str, typer.Argument(help="Replica UUID or name.")],
    name: Annotated[str | None, typer.Option("--name", help="Name of the clone.")] = None,
    config: ConfigOption = None,
) -> None:
    """Make a bootable fast clone of a restore point, leaving the replica untouched.

    Example:  xencr replica clone 5f0c...e1 --name web-1-test
    """
    s, rec = _find(load(config), replica)
    with s:
        clone = s.api.VM.clone(rec["ref"], name or f"{rec['name_label']} (clone)")
        # The clone must not pass for a replica: drop our keys; it carries no blocked operations.
        s.api.VM.set_other_config(clone, md.strip_ours(dict(s.api.VM.get_other_config(clone))))
        s.api.VM.set_is_a_template(clone, False)
        typer.echo(s.api.VM.get_uuid(clone))


def _protect(replica: str, config: Path | None, on: bool) -> None:
    s, rec = _find(load(config), replica)
    with s:
        for op in md.PROTECTED_OPS:
            s.api.VM.remove_from_blocked_operations(rec["ref"], op)
            if on:
                s.api.VM.add_to_blocked_operations(rec["ref"], op, md.START_BLOCKED)
        typer.echo(f"{rec['uuid']}: {'protected' if on else 'unprotected'}")


@replica_app.command("protect")
@reported
def protect_command(replica: Annotated[str, typer.Argument()], config: ConfigOption = None) -> None:
    """Block start/start_on on a replica again (repair).

    Example:  xencr replica protect 5f0c...e1
    """
    _protect(replica, config, True)


@replica_app.command("unprotect")
@reported
def unprotect_command(replica: Annotated[str, typer.Argument()], config: ConfigOption = None) -> None:
    """Lift the start block (failover does this); the next run will not use it as a base.

    Example:  xencr replica unprotect 5f0c...e1
    """
    _protect(replica, config, False)


@reported
def verify_command(
    replica: Annotated[str, typer.Argument(help="Replica (restore point) UUID or name.")],
    json_out: Annotated[bool, typer.Option("--json")] = False,
    config: ConfigOption = None,
) -> None:
    """Re-read a restore point's disks and compare every block it was sent with the digest
    recorded at transfer; also report a disk written since the commit. Exit 1 on any mismatch.

    Example:  xencr verify 5f0c...e1
    """
    from xencr.replication.verify import verify_replica

    s, rec = _find(load(config), replica)
    with s:
        checks = verify_replica(s, rec["ref"])
    if json_out:
        typer.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        for c in checks:
            verdict = "ok" if c.ok else "MISMATCH"
            typer.echo(f"{rec['uuid']} disk {c.userdevice}: {verdict}: {c.blocks} block(s), {c.detail}")
    if not checks or not all(c.ok for c in checks):
        raise typer.Exit(1)
