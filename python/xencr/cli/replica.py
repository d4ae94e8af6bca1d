"""`xencr replica list|clone|protect|unprotect`: restore points on the targets."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from xencr.cli.common import ConfigOption, load, reported, usage_error
from xencr.cli.errors import CliError
from xencr.config import Config
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.replication.jobs import connect
from xencr.replication.target import make_plain
from xencr.replication.verify import Sample, verify_replica
from xencr.state import open_state
from xencr.units import human_bytes
from xencr.xapi.errors import XapiError
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
        s = connect(cfg.pool(pool), interactive=sys.stdin.isatty(), state_path=cfg.state.local_path)
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
        with connect(cfg.pool(pool), interactive=sys.stdin.isatty(), state_path=cfg.state.local_path) as s:
            replicas = [r for r in _replicas(s) if not job_id or r["other_config"].get(md.JOB) == job_id]
            verdicts = _detached(s, replicas)
            for rec in replicas:
                oc = rec["other_config"]
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
                        # "<time> <why>" once a run marked it; "<why>" when only this look saw it.
                        "detached": oc.get(md.DETACHED) or verdicts.get(rec["uuid"]),
                    }
                )
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        state = "complete" if r["complete"] else "INCOMPLETE"
        prot = "protected" if r["protected"] else "UNPROTECTED"
        line = f"{r['pool']}  {r['uuid']}  {r['name']}  {state}  {prot}  {r['power_state']}"
        if r["detached"]:
            line += f"  DETACHED ({r['detached']}): not a restore point, left alone"
        typer.echo(line)
    detached = sum(1 for r in rows if r["detached"])
    typer.echo(f"{len(rows)} replica(s)" + (f", {detached} detached" if detached else ""))


def _detached(s: XapiSession, replicas: list[dict[str, Any]]) -> dict[str, str]:
    """Replica UUID -> why it is detached, by the ownership rule (read only: runs write marks)."""
    out: dict[str, str] = {}
    groups = {
        (oc.get(md.JOB, ""), oc.get(md.VM, ""), oc.get(md.SR, ""))
        for oc in (r["other_config"] for r in replicas)
    }
    for job_id, vm_uuid, sr_uuid in sorted(groups):
        try:
            found = ownership.survey(s, job_id, vm_uuid, sr_uuid)
        except XapiError:
            continue  # the SR is gone: nothing to say beyond the marks
        out |= {d.uuid: d.why for d in found.detached if d.kind == "VM"}
    return out


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
        label = name or f"{rec['name_label']} (clone)"
        clone = s.call_async("VM.clone", rec["ref"], label)
        # A plain VM (it carries no blocked operations: VM.clone does not copy them).
        make_plain(s, clone)
        typer.echo(f"cloned {rec['uuid']} into VM {label!r} {s.api.VM.get_uuid(clone)}")


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
    sample: Annotated[
        str | None,
        typer.Option(
            "--sample",
            metavar="N%",
            help="Check a random N% of each disk's blocks (--sample 100% is the full check).",
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="The sample's seed (default: a random one, printed).")
    ] = None,
    against_source: Annotated[
        bool,
        typer.Option(
            "--against-source",
            help="Also read the source snapshot's disks, if they still exist, and compare.",
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Re-read a restore point's disks whole and compare every block with the disk's block map
    (what the whole disk must hold, kept in the state database when the restore point was
    made); also report a disk written since the commit. One line per differing block range;
    exit 1 on any difference, or when a disk's map is missing.

    Cost: every allocated block of each disk is read over the target pool's link (a 100 GiB
    disk holding 40 GiB reads 40 GiB); --against-source reads as much again from the source
    pool. --sample digests and compares only the sampled blocks, but XAPI's export cannot
    seek: it is read from the start up to the last sampled block, which for a random sample is
    most of the disk, so a sample saves little reading.

    Example:  xencr verify 5f0c...e1 --sample 10% --seed 42
    """
    chosen = None
    if sample is not None:
        try:
            percent = float(sample.strip().removesuffix("%"))
        except ValueError:
            usage_error(f"--sample: {sample!r} is not a percentage (like 10%)")
        if not 0 < percent <= 100:
            usage_error(f"--sample: {sample!r} must be more than 0% and at most 100%")
        chosen = Sample(percent, seed if seed is not None else secrets.randbelow(2**31))
    cfg = load(config)
    s, rec = _find(cfg, replica)
    with s, contextlib.ExitStack() as stack:
        maps = stack.enter_context(open_state(cfg)) if cfg.state.exists() else None
        source = None
        if against_source:
            job_id = rec["other_config"].get(md.JOB, "")
            job = next((j for j in cfg.jobs.values() if j.id == job_id), None)
            if job is None:
                raise CliError(f"replica {rec['uuid']}: its job {job_id!r} is not in the configuration")
            source = stack.enter_context(
                connect(cfg.pool(job.pool), interactive=sys.stdin.isatty(), state_path=cfg.state.local_path)
            )
        checks = verify_replica(s, rec["ref"], maps, sample=chosen, source=source)
    if json_out:
        where = {"percent": chosen.percent, "seed": chosen.seed} if chosen else None
        typer.echo(json.dumps([dataclasses.asdict(c) | {"sample": where} for c in checks], indent=2))
    else:
        if chosen is not None:
            typer.echo(
                f"sample: {chosen.percent:g}% of each disk's blocks, seed {chosen.seed}"
                f" (repeat with --seed {chosen.seed})"
            )
        for c in checks:
            verdict = "ok" if c.ok else "MISMATCH"
            read = f", {human_bytes(c.bytes_read)} read" if c.bytes_read else ""
            typer.echo(f"{rec['uuid']} disk {c.userdevice}: {verdict}: {c.blocks} block(s){read}, {c.detail}")
            for line in c.lines():
                typer.echo(line)
            if c.map:
                typer.echo(f"disk {c.userdevice}: map {c.map}")
    if not checks or not all(c.ok for c in checks):
        raise typer.Exit(1)
