"""`xencr dr ...`: XenServer's native DR (pool metadata on mirrored SRs): metadata replication on
and off, what mirrored SRs hold, recovery on another pool (or a test of it), and failback."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from xencr.cli.common import ConfigOption, JsonFlag, confirm, load, print_json, reported
from xencr.cli.errors import CliError
from xencr.config import Config
from xencr.dr.connect import dr_sessions
from xencr.dr.native import metadata
from xencr.dr.native.failback import FailbackError, FailbackRequest, failback
from xencr.dr.native.found import Found, LunSource
from xencr.dr.native.recover import RecoverError, RecoverReport, RecoverRequest, probe_only, recover
from xencr.monitor.metrics import render_metadata, write_textfile
from xencr.replication.jobs import connect
from xencr.state import open_state
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession

dr_app = typer.Typer(help="XenServer native DR: pool metadata on mirrored SRs.", no_args_is_help=True)
metadata_app = typer.Typer(help="Pool metadata replication to SRs.", no_args_is_help=True)
dr_app.add_typer(metadata_app, name="metadata")

PoolOption = Annotated[str, typer.Option("--pool", help="The pool (its name in the configuration).")]
SrsOption = Annotated[list[str], typer.Option("--sr", help="An SR (name or UUID); repeat for several.")]
SrConfigOption = Annotated[
    list[str] | None,
    typer.Option(
        "--sr-config",
        metavar="KEY=VALUE,...",
        help="Device config of a mirrored LUN to attach (e.g. target=...,targetIQN=...,SCSIid=...).",
    ),
]
SrTypeOption = Annotated[str, typer.Option("--sr-type", help="SM type of the mirrored LUNs.")]
FromSrOption = Annotated[
    list[str] | None,
    typer.Option("--from-sr", help="An SR to read (attached already, or a UUID found on the LUNs)."),
]
YesOption = Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")]


def _session(cfg: Config, pool: str) -> XapiSession:
    return connect(cfg.pool(pool), interactive=sys.stdin.isatty(), state_path=cfg.state.local_path)


@metadata_app.command("enable")
@reported
def enable_command(pool: PoolOption, sr: SrsOption, config: ConfigOption = None) -> None:
    """Replicate the pool's metadata (its database) to SRs (at most 8; LVM over iSCSI/HBA).

    Example:  xencr dr metadata enable --pool a --sr "iSCSI storage"
    """
    cfg = load(config)
    with _session(cfg, pool) as t:
        for line in metadata.enable(t, pool, sr):
            typer.echo(line)


@metadata_app.command("disable")
@reported
def disable_command(pool: PoolOption, sr: SrsOption, config: ConfigOption = None) -> None:
    """Stop replicating the pool's metadata to SRs (XAPI destroys the metadata VDI there)."""
    cfg = load(config)
    with _session(cfg, pool) as t:
        for line in metadata.disable(t, pool, sr):
            typer.echo(line)


@metadata_app.command("status")
@reported
def status_command(
    pool: Annotated[list[str] | None, typer.Option("--pool", help="Only this pool.")] = None,
    textfile: Annotated[
        Path | None,
        typer.Option("--textfile", metavar="PATH", help="Also write the metrics there (node exporter)."),
    ] = None,
    json_out: JsonFlag = False,
    config: ConfigOption = None,
) -> None:
    """Per pool, the SRs holding its metadata (and those that could): written now or not. With
    --textfile, the xencr_dr_metadata_* metrics too (run it from a timer); a pool that does not
    answer is a line on stderr and `xencr_dr_metadata_pool_up 0`, and the exit code is 1.

    Example:  xencr dr metadata status --textfile /var/lib/node_exporter/textfile/xencr-dr.prom
    """
    cfg = load(config)
    rows: list[metadata.MetadataSr] = []
    down: dict[str, str] = {}
    with dr_sessions(cfg, pool or sorted(cfg.pools), interactive=sys.stdin.isatty()) as dr:
        down = dict(dr.unreachable)
        for name, t in sorted(dr.sessions.items()):
            try:
                rows += metadata.status(t, name)
            except (XapiError, PoolUnreachable) as err:
                down[name] = str(err)
    if textfile is not None:
        try:
            write_textfile(textfile, render_metadata(rows, down))
        except OSError as err:
            raise CliError(f"{textfile}: cannot write: {err.strerror or err}") from None
    if json_out:
        print_json([asdict(r) | {"replicating": r.replicating} for r in rows])
    else:
        for r in rows:
            typer.echo(r.line())
    for name, why in sorted(down.items()):
        typer.echo(f"xencr: error: pool {name}: {why}", err=True)
    if down:
        raise typer.Exit(1)


def _luns(configs: list[str] | None, sr_type: str) -> tuple[LunSource, ...]:
    return tuple(LunSource.parse(c, sr_type) for c in configs or [])


def _found_json(found: Found) -> dict[str, Any]:
    return {
        "pool": found.pool,
        "databases": [asdict(d) for d in found.databases],
        "vms": [
            asdict(v)
            | {"existing_version": found.existing[v.uuid].version if v.uuid in found.existing else None}
            for v in sorted(found.vms.values(), key=lambda v: (v.order, v.name))
        ],
        "vapps": [asdict(a) for a in found.apps.values()],
        "notes": found.notes,
    }


@dr_app.command("probe")
@reported
def probe_command(
    pool: PoolOption,
    sr_config: SrConfigOption = None,
    sr_type: SrTypeOption = "lvmoiscsi",
    from_sr: FromSrOption = None,
    json_out: JsonFlag = False,
    config: ConfigOption = None,
) -> None:
    """What mirrored SRs hold: the pool databases found, their VMs and vApps (the copy a recovery
    would use: newest information wins), the SRs each still needs. The pool is left as it was.

    Example:  xencr dr probe --pool b --sr-config target=10.0.0.9,targetIQN=iqn...,SCSIid=3600...
    """
    cfg = load(config)
    with _session(cfg, pool) as t:
        found = probe_only(t, pool, _luns(sr_config, sr_type), from_sr or [])
    if json_out:
        print_json(_found_json(found))
        return
    for d in found.databases:
        typer.echo(f"{d.where()}: database of pool {d.pool_uuid}" + ("" if d.latest else " (older copy)"))
    for v in sorted(found.vms.values(), key=lambda v: (v.order, v.name)):
        app = found.app_name(v.appliance)
        line = (
            f"VM {v.name} ({v.uuid}): version {v.version}, order {v.order}, start delay {v.start_delay}s"
            + (f", vApp {app}" if app else "")
            + f", from pool {v.pool_name}"
        )
        if v.uuid in found.existing:
            e = found.existing[v.uuid]
            line += f"; pool {pool} has it already (version {e.version}, {e.power_state})"
        if v.missing_srs:
            line += f"; needs SR {', '.join(v.missing_srs)}"
        typer.echo(line)
    for note in found.notes:
        typer.echo(f"note: {note}")


def _report_json(r: RecoverReport) -> dict[str, Any]:
    start = r.start
    return {
        "pool": r.pool,
        "attempt": r.attempt,
        "test": r.test,
        "resumed": r.resumed,
        "ok": r.ok,
        "vms": [asdict(v) for v in r.vms],
        "started": [asdict(x) for x in start.results] if start else [],
        "stopped_at_group": start.stopped_at if start else None,
        "cleaned": r.cleaned,
        "notes": r.notes,
    }


def _print_report(r: RecoverReport, json_out: bool) -> None:
    if json_out:
        print_json(_report_json(r))
    else:
        for note in r.notes:
            typer.echo(f"note: {note}")
        for v in r.vms:
            if not v.recovered:
                typer.echo(v.detail)
        results = r.start.results if r.start else []
        for x in results:
            if not x.ok:
                typer.echo(f"{x.name}: {'started' if x.started else 'not started'}, {x.detail}")
        what = "test of the recovery" if r.test else "recovery"
        counts = f"{sum(v.recovered for v in r.vms)} of {len(r.vms)} VMs recovered"
        if r.start is not None:
            counts += f", {sum(x.ok for x in results)} started"
        if r.test:
            counts += f", {len(r.cleaned)} objects removed again"
        typer.echo(f"{what} on pool {r.pool}: {counts}: {'done' if r.ok else 'FAILED'} (attempt {r.attempt})")
    if not r.ok:
        raise typer.Exit(1)


@dr_app.command("recover")
@reported
def recover_command(
    pool: PoolOption,
    sr_config: SrConfigOption = None,
    sr_type: SrTypeOption = "lvmoiscsi",
    from_sr: FromSrOption = None,
    vm: Annotated[list[str] | None, typer.Option("--vm", help="Only this VM (name or UUID).")] = None,
    vapp: Annotated[list[str] | None, typer.Option("--vapp", help="Only this vApp (name or UUID).")] = None,
    test: Annotated[
        bool, typer.Option("--test", help="Recover, check, then remove everything again.")
    ] = False,
    boot: Annotated[bool, typer.Option("--boot", help="With --test: boot on an isolated network.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a halted VM that is as new or newer.")
    ] = False,
    plan: Annotated[
        str | None, typer.Option("--plan", help="Take gates and hooks from this [[plan]].")
    ] = None,
    yes: YesOption = False,
    json_out: JsonFlag = False,
    config: ConfigOption = None,
) -> None:
    """Recover VMs and vApps on POOL from the pool metadata on mirrored SRs, then start them in
    order (VM.order, start delays, the plan's gates). --test starts nothing (--boot: boots them on
    an isolated network) and removes everything it made, the pool left as it was. A run cut short
    is continued (or, a test, cleaned up) by the next one.

    Example:  xencr dr recover --pool b --sr-config target=10.0.0.9,targetIQN=iqn...,SCSIid=3600... --yes
    """
    cfg = load(config)
    if boot and not test:
        raise CliError("--boot goes with --test (a recovery starts the VMs anyway)")
    if test and force:
        raise CliError("--force does not go with --test: a test never replaces a VM")
    request = RecoverRequest(
        pool=pool,
        luns=_luns(sr_config, sr_type),
        from_srs=tuple(from_sr or []),
        vms=tuple(vm or []),
        vapps=tuple(vapp or []),
        test=test,
        boot=boot,
        force=force,
        plan=cfg.plan(plan) if plan else None,
    )
    if not test:
        confirm(f"recovery on pool {pool}", yes)
    with _session(cfg, pool) as t, open_state(cfg) as db:
        try:
            report = recover(t, db, request, say=lambda line: typer.echo(line, err=json_out))
        except RecoverError as err:
            raise CliError(str(err)) from None
    _print_report(report, json_out)


@dr_app.command("failback")
@reported
def failback_command(
    from_pool: Annotated[str, typer.Option("--from-pool", help="The recovery pool, where the VMs run.")],
    to_pool: Annotated[str, typer.Option("--to-pool", help="The primary pool they go back to.")],
    sr: SrsOption,
    sr_config: SrConfigOption = None,
    sr_type: SrTypeOption = "lvmoiscsi",
    plan: Annotated[
        str | None, typer.Option("--plan", help="Take gates and hooks from this [[plan]].")
    ] = None,
    mirror_command: Annotated[
        str | None,
        typer.Option(
            "--mirror-command",
            metavar="CMD",
            help="The array's command run once the SRs are unplugged, before the primary attaches them.",
        ),
    ] = None,
    yes: YesOption = False,
    json_out: JsonFlag = False,
    config: ConfigOption = None,
) -> None:
    """Bring recovered VMs home: check the recovery pool replicates its metadata to the SRs and
    that each SR is attached to it only, shut its VMs down cleanly in reverse order, unplug the
    SRs, run --mirror-command (the array hands the LUNs back to the primary), then recover them on
    the primary from that metadata and start them in order.

    Example:  xencr dr failback --from-pool b --to-pool a --sr "iSCSI storage" --yes
    """
    cfg = load(config)
    request = FailbackRequest(
        from_pool,
        to_pool,
        tuple(sr),
        _luns(sr_config, sr_type),
        cfg.plan(plan) if plan else None,
        tuple(shlex.split(mirror_command)) if mirror_command else (),
    )
    confirm(f"failback from pool {from_pool} to pool {to_pool}", yes)
    with _session(cfg, from_pool) as back, _session(cfg, to_pool) as home, open_state(cfg) as db:
        try:
            out = failback(back, home, db, request, say=lambda line: typer.echo(line, err=json_out))
        except FailbackError as err:
            raise CliError(str(err)) from None
    if out.recovery is not None:
        _print_report(out.recovery, json_out)
