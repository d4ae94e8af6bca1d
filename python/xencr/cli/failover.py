"""`xencr failover PLAN`: recover a plan's VMs on the DR side (`dr.failover`), the primary site
never needed. It acts on real VMs: confirmed on a terminal, refused without one unless ``--yes``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from xencr.cli.common import ConfigOption, JsonFlag, confirm, load, print_json, reported, warn
from xencr.cli.errors import CliError
from xencr.cli.run import stopping_cleanly
from xencr.dr import choose
from xencr.dr.connect import dr_sessions
from xencr.dr.failback import FailbackAbort, failback
from xencr.dr.failover import FailoverError, FailoverReport, failover
from xencr.dr.planned import SHUTDOWN_TIMEOUT, PlannedAbort, planned_failover, pools_of
from xencr.dr.testrun import cleanup, rehearse
from xencr.monitor import rehearsals
from xencr.monitor.notify import notify_test
from xencr.state import open_state


def _json(r: FailoverReport) -> dict[str, Any]:
    results = {x.vm_uuid: x for x in r.start.results}
    return {
        "plan": r.plan,
        "resumed": r.resumed,
        "ok": r.start.ok,
        "stopped_at_group": r.start.stopped_at,
        "not_started": r.start.not_started,
        "vms": [
            {
                "uuid": row.vm_uuid,
                "name": row.vm_name,
                "pool": row.pool,
                "restore_point": row.restore_point,
                "group": row.group,
                "vm": row.vm,
                "state": row.state,
                "started_at": row.started_at.isoformat() if row.started_at else None,
                "boot_seconds": results[row.vm_uuid].boot_seconds if row.vm_uuid in results else None,
                "detail": row.detail,
            }
            for row in r.rows
        ],
    }


def failover_command(
    plan: Annotated[str | None, typer.Argument(help="The [[plan]] to fail over.")] = None,
    vm: Annotated[
        list[str] | None, typer.Option("--vm", help="Only this VM of the plan (name or UUID).")
    ] = None,
    clone: Annotated[
        bool, typer.Option("--clone", help="Start fast clones; keep the replicas intact.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    continue_on_failure: Annotated[
        bool, typer.Option("--continue-on-failure", help="Start the later groups when a gate fails.")
    ] = False,
    test: Annotated[
        bool, typer.Option("--test", help="Rehearse on clones, isolated; then destroy them.")
    ] = False,
    boot: Annotated[
        bool, typer.Option("--boot", help="With --test: boot the clones, check the gates.")
    ] = False,
    keep_on_failure: Annotated[
        bool, typer.Option("--keep-on-failure", help="With --test: keep the clones when something failed.")
    ] = False,
    cleanup: Annotated[
        bool, typer.Option("--cleanup", help="Destroy what interrupted test failovers left.")
    ] = False,
    planned: Annotated[
        bool,
        typer.Option(
            "--planned",
            help="Both sites up: final delta, clean shutdown of the sources, last delta, failover.",
        ),
    ] = False,
    shutdown_timeout: Annotated[
        int,
        typer.Option(
            "--shutdown-timeout",
            metavar="SECONDS",
            help="With --planned: the most a source VM may take to shut down.",
        ),
    ] = int(SHUTDOWN_TIMEOUT),
    json_out: JsonFlag = False,
    config: ConfigOption = None,
) -> None:
    """Fail a plan over to the DR side: newest restore point per VM, started group by group.

    Run it again after an interruption: it continues and never starts a VM twice.
    With --planned (both sites up) nothing written on the source is lost; if it stops before the
    failover, it lists each source VM it shut down with the command that restarts it.
    Example:  xencr failover site-b --yes
    """
    if cleanup:
        _cleanup(json_out, config)
    elif plan is None:
        raise typer.BadParameter("give a PLAN (or --cleanup)")
    elif planned:
        if test or vm:
            raise typer.BadParameter("--planned fails the whole plan over: give no --test or --vm with it")
        _planned(plan, clone, yes, continue_on_failure, shutdown_timeout, json_out, config)
    elif test:
        _rehearse(plan, boot, keep_on_failure, json_out, config)
    else:
        _failover(plan, vm or [], clone, yes, continue_on_failure, json_out, config)


@reported
def _cleanup(json_out: bool, config: Path | None) -> None:
    cfg = load(config)
    with dr_sessions(cfg, [p.pool for p in choose.places(cfg)], interactive=sys.stdin.isatty()) as dr:
        lines = cleanup(dr.sessions)
        missed = [f"pool {p} not cleaned: unreachable ({why})" for p, why in sorted(dr.unreachable.items())]
    if json_out:
        print_json({"destroyed": lines, "problems": missed})
    else:
        for line in [*lines, *missed]:
            typer.echo(line)
        typer.echo(f"{len(lines)} test object(s) destroyed")
    if missed:
        raise typer.Exit(1)


@reported
def _rehearse(name: str, boot: bool, keep: bool, json_out: bool, config: Path | None) -> None:
    cfg = load(config)
    plan = cfg.plan(name)
    say = (lambda _: None) if json_out else typer.echo
    with (
        open_state(cfg) as db,
        dr_sessions(cfg, [p.pool for p in choose.places(cfg)], interactive=sys.stdin.isatty()) as dr,
    ):
        try:
            r = rehearse(cfg, plan, db, dr, boot=boot, keep_on_failure=keep, say=say)
        except FailoverError as err:
            raise CliError(str(err)) from None
        # Kept for the status page and `xencr report PLAN` (start groups and times as a timeline).
        record = rehearsals.record(r.plan, r.run_id, r.booted, r.kept, r.clones, r.start)
        rehearsals.save(db, record)
    for problem in notify_test(cfg, plan, record):
        warn(problem)
    results = {x.name: x for x in r.start.results}
    if json_out:
        print_json(
            {
                "plan": r.plan,
                "attempt": r.attempt,
                "run": r.run_id,
                "booted": r.booted,
                "ok": r.ok,
                "kept": r.kept,
                "vms": [
                    {
                        "name": n,
                        "clone": c,
                        "boot_seconds": results[n].boot_seconds if n in results else None,
                        "gate": (results[n].detail if n in results else None),
                        "ok": results[n].ok if n in results else True,
                    }
                    for n, c in r.clones.items()
                ],
                "cleaned": r.cleaned,
            }
        )
    else:
        for n in r.clones:
            x = results.get(n)
            if x is None:
                typer.echo(f"{n}: cloned (not booted)")
            else:
                took = f" in {x.boot_seconds:.1f}s" if x.boot_seconds is not None else ""
                typer.echo(f"{n}: {'ok' if x.ok else 'FAILED'}{took}: {x.detail}")
        what = "kept for inspection (xencr failover --cleanup removes them)" if r.kept else "destroyed"
        typer.echo(f"test failover of plan {name}: {'passed' if r.ok else 'FAILED'}; test objects {what}")
    if not r.ok:
        raise typer.Exit(1)


@reported
def _failover(
    name: str, vms: list[str], clone: bool, yes: bool, cont: bool, json_out: bool, config: Path | None
) -> None:
    cfg = load(config)
    plan = cfg.plan(name)
    confirm(f"failover of plan {name}", yes)
    say = (lambda _: None) if json_out else typer.echo
    with (
        open_state(cfg) as db,
        dr_sessions(cfg, [p.pool for p in choose.places(cfg)], interactive=sys.stdin.isatty()) as dr,
    ):
        try:
            r = failover(cfg, plan, db, dr, vms=vms, clone=clone, continue_on_failure=cont, say=say)
        except FailoverError as err:
            raise CliError(str(err)) from None
    if json_out:
        print_json(_json(r))
    _finish(name, r, json_out)


def _finish(name: str, r: FailoverReport, json_out: bool) -> None:
    """Each VM's outcome (unless JSON was printed), and the exit: 1 when a gate failed."""
    if not json_out:
        for x in r.start.results:
            took = f" in {x.boot_seconds:.1f}s" if x.boot_seconds is not None else ""
            typer.echo(f"{x.name}: {'ok' if x.ok else 'FAILED'}{took}: {x.detail}")
    if r.start.stopped_at is not None:
        failed = [x.name for x in r.start.results if not x.ok]
        rest = ", ".join(r.start.not_started) or "none"
        raise CliError(
            f"plan {name} stopped at group {r.start.stopped_at}: {', '.join(failed)} failed its gate; "
            f"not started: {rest} (fix it, then run the same command again to continue)"
        )
    if not r.start.ok:
        raise CliError(f"plan {name}: {sum(not x.ok for x in r.start.results)} VM(s) failed their gate")
    if not json_out:
        typer.echo(f"plan {name}: {len(r.rows)} VM(s) failed over")


@reported
def _planned(
    name: str, clone: bool, yes: bool, cont: bool, timeout: int, json_out: bool, config: Path | None
) -> None:
    cfg = load(config)
    plan = cfg.plan(name)
    confirm(f"planned failover of plan {name} (its source VMs are shut down)", yes)
    say = (lambda _: None) if json_out else typer.echo
    with (
        open_state(cfg) as db,
        dr_sessions(cfg, pools_of(cfg), interactive=sys.stdin.isatty()) as dr,
        stopping_cleanly() as cancel,
    ):
        try:
            r = planned_failover(
                cfg,
                plan,
                db,
                dr,
                clone=clone,
                continue_on_failure=cont,
                shutdown_timeout=timeout,
                cancel=cancel,
                interactive=sys.stdin.isatty(),
                say=say,
            )
        except FailoverError as err:
            raise CliError(str(err)) from None
        except PlannedAbort as err:
            if json_out:
                print_json(
                    {"plan": name, "ok": False, "step": err.step, "error": err.reason, "restart": err.restart}
                )
            else:
                for line in err.restart:
                    typer.echo(line)
            raise CliError(err.line()) from None
    if json_out:
        print_json(
            _json(r.failover)
            | {
                "planned": True,
                "halted": [v.vm_uuid for v in r.halted],
                "final_delta": r.final,
                "last_delta": r.last,
            }
        )
    _finish(name, r.failover, json_out)


def failback_command(
    plan: Annotated[str, typer.Argument(help="The [[plan]] whose failed-over VMs come back.")],
    vm: Annotated[
        list[str] | None, typer.Option("--vm", help="Only this failed-over VM (name or UUID).")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    json_out: JsonFlag = False,
    config: ConfigOption = None,
) -> None:
    """Bring failed-over VMs back to their original VMs on the primary pool (both sites up).

    Sends only what changed on the DR side, shuts the DR VM down cleanly, gives the original
    (halted) VM the new disks, keeps its former disks renamed, starts it, and makes the DR VM a
    restore point again: the job's next run is a delta. Run it again after an interruption.
    Example:  xencr failback site-b --yes
    """
    _failback(plan, vm or [], yes, json_out, config)


@reported
def _failback(name: str, vms: list[str], yes: bool, json_out: bool, config: Path | None) -> None:
    cfg = load(config)
    plan = cfg.plan(name)
    confirm(f"failback of plan {name} (the DR VMs are shut down, the original VMs' disks replaced)", yes)
    say = (lambda _: None) if json_out else typer.echo
    with open_state(cfg) as db, dr_sessions(cfg, pools_of(cfg), interactive=sys.stdin.isatty()) as dr:
        try:
            r = failback(cfg, plan, db, dr, vms=vms, say=say)
        except (FailoverError, FailbackAbort) as err:
            raise CliError(str(err)) from None
    if json_out:
        print_json(
            {
                "plan": r.plan,
                "vms": [
                    {
                        "uuid": v.vm_uuid,
                        "name": v.name,
                        "step": v.step,
                        "disks": [
                            {
                                "step": c.step,
                                "userdevice": c.userdevice,
                                "kind": c.kind,
                                "blocks": c.blocks,
                                "vdi": c.vdi,
                            }
                            for c in v.copies
                        ],
                        "former_disks": v.old_disks,
                    }
                    for v in r.vms
                ],
            }
        )
    elif r.nothing_to_do:
        typer.echo(f"plan {name}: no failed-over VM to fail back; nothing done")
    else:
        for v in r.vms:
            for line in v.old_disks:
                typer.echo(f"{v.name}: former disk kept, detached: {line}")
        typer.echo(f"plan {name}: {len(r.vms)} VM(s) failed back")
