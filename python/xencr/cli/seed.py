"""`xencr seed link|export|import`: the first full copy of a VM by disk instead of the network."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from xencr.cli.common import ConfigOption, load, reported, warn
from xencr.cli.errors import CliError
from xencr.cli.live import LiveTransfers
from xencr.config import Config, ConfigError, PoolConfig
from xencr.coordination import locker_for
from xencr.credentials import Secret, split_url_credentials
from xencr.replication.jobs import connect, connected, resolve_sr, selected_vms
from xencr.seed import link as seedlink
from xencr.seed.export import export_seed
from xencr.seed.load import import_seed
from xencr.seed.manifest import read as read_manifest
from xencr.service.locks import Locker
from xencr.units import human_bytes
from xencr.xapi.session import XapiSession

seed_app = typer.Typer(
    help="Seed a job's first full copy by disk: link a hand-made copy, or export and import one.",
    no_args_is_help=True,
)


def _say(line: str) -> None:
    typer.echo(line, err=True)


def _optional_config(path: Path | None) -> Config | None:
    """The configuration if there is one: `seed link` works without (XO's job ids)."""
    try:
        return load(path)
    except ConfigError:
        if path is not None:
            raise
        return None


def _pool_for(
    url: str, side: str, password_file: Path | None, fingerprint: str | None, cfg: Config | None
) -> PoolConfig:
    """A pool from a command-line URL. The password: --<side>-password-file, then
    XENCR_<SIDE>_PASSWORD, then the URL (warned about), then a configured pool with that URL,
    then a prompt on a terminal."""
    bare, user, password = split_url_credentials(url)
    if password is not None:
        warn(
            f"the password in the {side} URL is visible to other users of this machine (process list,"
            f" shell history); prefer --{side}-password-file or XENCR_{side.upper()}_PASSWORD"
        )
    known = next(
        (p for p in (cfg.pools.values() if cfg else []) if p.url.rstrip("/") == bare.rstrip("/")), None
    )
    env = f"XENCR_{side.upper()}_PASSWORD"
    if known is not None and password_file is None and password is None and not os.environ.get(env):
        return dataclasses.replace(
            known, username=user or known.username, fingerprint=fingerprint or known.fingerprint
        )
    return PoolConfig(
        name=side,
        url=bare,
        username=user or "root",
        password_file=str(password_file) if password_file else None,
        password_env=env,
        fingerprint=fingerprint,
        url_password=Secret(password) if password is not None else None,
    )


def _job_ids(cfg: Config | None, job: str, schedule: str, xo: bool) -> str:
    """The job id to write: a configured job's (by name or id), else ``job`` as given (a Xen
    Orchestra job, or one not configured yet: warned)."""
    if xo:
        return job
    if cfg is None:
        warn(f"no configuration: {job!r} is written as the job id")
        return job
    try:
        j = cfg.job(job)
    except ConfigError:
        warn(f"no job {job!r} in {cfg.path}: it is written as the job id as given")
        return job
    if schedule not in {s.id for s in j.schedules}:
        warn(
            f"job '{j.name}' has no schedule {schedule!r} (schedules: {', '.join(s.id for s in j.schedules)})"
        )
    return j.id


@seed_app.command("link")
@reported
def link_command(
    source_url: Annotated[str, typer.Argument(metavar="SOURCE_URL", help="Source pool's XAPI URL.")],
    snapshot: Annotated[str, typer.Argument(metavar="SNAPSHOT_UUID", help="The source snapshot you copied.")],
    target_url: Annotated[str, typer.Argument(metavar="TARGET_URL", help="Target pool's XAPI URL.")],
    target_vm: Annotated[str, typer.Argument(metavar="TARGET_VM_UUID", help="The VM imported from it.")],
    job: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job (id, or name of a configured job).")],
    schedule: Annotated[str, typer.Argument(metavar="SCHEDULE_ID", help="The job's schedule id.")],
    xo: Annotated[
        bool, typer.Option("--xo", help="Write Xen Orchestra's keys (XO continues the chain).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check, and print what would be written.")
    ] = False,
    source_password_file: Annotated[
        Path | None, typer.Option(help="File (mode 0600) holding the source pool's password.")
    ] = None,
    target_password_file: Annotated[
        Path | None, typer.Option(help="File (mode 0600) holding the target pool's password.")
    ] = None,
    source_fingerprint: Annotated[
        str | None, typer.Option(help="Pin the source pool's certificate (sha256).")
    ] = None,
    target_fingerprint: Annotated[
        str | None, typer.Option(help="Pin the target pool's certificate (sha256).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Link a hand-made copy to a job, so that its next run is a delta: the arguments of Xen
    Orchestra's `xo-cr-seed`, in its order. Everything is checked first (a snapshot of a VM, a
    halted target VM, disks paired by user device with equal sizes); then the metadata is
    written and the target VM protected. Passwords: --*-password-file, XENCR_SOURCE_PASSWORD /
    XENCR_TARGET_PASSWORD, the URL (`https://root:pa%40ss@host`, warned), a configured pool with
    that URL, or a prompt.

    Example:  xencr seed link https://pool-a SNAP_UUID https://pool-b VM_UUID web-servers hourly
    """
    cfg = _optional_config(config)
    interactive = sys.stdin.isatty()
    spool = _pool_for(source_url, "source", source_password_file, source_fingerprint, cfg)
    tpool = _pool_for(target_url, "target", target_password_file, target_fingerprint, cfg)
    with connect(spool, interactive=interactive) as src, _target(spool, tpool, src, interactive) as tgt:
        try:
            p = seedlink.pair(src, snapshot, tgt, target_vm)
        except seedlink.SeedRefused as err:
            raise CliError(f"refused, nothing written: {err}") from None
        job_id = _job_ids(cfg, job, schedule, xo)
        steps = (seedlink.xo_steps if xo else seedlink.xencr_steps)(src, tgt, p, job_id, schedule)
        if dry_run:
            for step in steps:
                typer.echo(f"would write: {step.what}")
            return
        # A run of this VM to this SR (started here) must not clean up half-written keys.
        vm_uuid = p.source_vm_rec["uuid"]
        with contextlib.ExitStack() as stack:
            if cfg:
                locker = stack.enter_context(locker_for(cfg))
                lock = locker.try_lock(vm_uuid, p.sr_uuid, "seed link", job_id=job_id)
                if lock is None:
                    busy = _holder(locker, vm_uuid, p.sr_uuid)
                    raise CliError(
                        f"refused, nothing written: the VM is being replicated to this SR by {busy}"
                    )
                stack.callback(lock.release)
            seedlink.apply(steps, lambda line: typer.echo(f"wrote: {line}", err=True))
    layout = "Xen Orchestra's" if xo else "xencr's"
    typer.echo(
        f"linked: VM {p.target_rec['uuid']} on SR {p.sr_uuid} is the replica of snapshot"
        f" {p.snapshot_rec['uuid']} ({layout} keys); the next run of job {job_id} is a delta"
    )


def _target(
    spool: PoolConfig, tpool: PoolConfig, src: XapiSession, interactive: bool
) -> AbstractContextManager[XapiSession]:
    """The target's session; the source's again when both URLs name one pool (a local replica)."""
    if spool.url.rstrip("/") == tpool.url.rstrip("/") and spool.username == tpool.username:
        return contextlib.nullcontext(src)
    return connect(tpool, interactive=interactive)


@seed_app.command("export")
@reported
def export_command(
    job: Annotated[str, typer.Argument(help="Job name or id.")],
    vm: Annotated[str, typer.Argument(help="VM name or UUID (one the job selects).")],
    to: Annotated[Path, typer.Option("--to", metavar="DIR", help="Directory on the removable disk.")],
    schedule: Annotated[str | None, typer.Option(help="Schedule id (default: the job's first).")] = None,
    config: ConfigOption = None,
) -> None:
    """Snapshot a VM as the job would and write each disk as a VHD file with a manifest
    (per-block digests) into DIR; carry DIR to the target site and run `xencr seed import`. Until
    then the job refuses to send this VM's first full copy over the network. Run again after an
    interruption: it resumes.

    Example:  xencr seed export web-servers web-1 --to /media/usb/web-1
    """
    cfg = load(config)
    j = cfg.job(job)
    schedule_id = schedule or (j.schedules[0].id if j.schedules else "seed")
    with connected(cfg, j, interactive=sys.stdin.isatty()) as c, LiveTransfers() as live:
        [(ref, _)] = selected_vms(c, [vm])
        m = export_seed(
            c.source,
            j,
            schedule_id,
            j.pool,
            ref,
            to,
            say=_say,
            monitor=live,
        )
    size = sum(d.length for d in m.disks)
    typer.echo(
        f"exported {m.vm_name} (snapshot {m.snapshot_uuid}): {len(m.disks)} disk(s), "
        f"{human_bytes(size)} in {to};"
        f" on the target site: xencr seed import {to} --pool POOL --sr SR"
    )


@seed_app.command("import")
@reported
def import_command(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A directory `xencr seed export` wrote.")],
    pool: Annotated[str, typer.Option("--pool", help="Target pool (its name in the configuration).")],
    sr: Annotated[str, typer.Option("--sr", help="Target SR (name or UUID).")],
    config: ConfigOption = None,
) -> None:
    """Create the job's first restore point from a seed directory: each file streamed into the
    pool, checked against the manifest's digests, read back and checked again, then committed
    and protected. The job's next run is a delta. Run again after an interruption: it starts the
    import over (what the interrupted one left is removed first).

    Example:  xencr seed import /media/usb/web-1 --pool site-b --sr "Local storage"
    """
    cfg = load(config)
    m = read_manifest(directory)
    p = cfg.pool(pool)
    network_map: dict[str, str] = {}
    try:
        j = cfg.job(m.job_id)
        network_map = next((t.network_map for t in j.targets if t.pool == pool), {})
    except ConfigError:
        warn(f"job {m.job_name} ({m.job_id}) is not in {cfg.path}: the restore point is made for it anyway")
    with (
        connect(p, interactive=sys.stdin.isatty()) as ts,
        LiveTransfers() as live,
        contextlib.ExitStack() as stack,
    ):
        sr_ref, sr_uuid = resolve_sr(ts, sr, pool)
        locker = stack.enter_context(locker_for(cfg))
        lock = locker.try_lock(m.vm_uuid, sr_uuid, f"seed import of {m.job_name}", job_id=m.job_id)
        if lock is None:
            busy = _holder(locker, m.vm_uuid, sr_uuid)
            raise CliError(f"{m.vm_name} -> {sr}: refused: being replicated by {busy}")
        stack.callback(lock.release)
        rp = import_seed(
            ts, sr_ref, sr_uuid, directory, m, network_map=network_map,
            say=_say, monitor=live,
        )  # fmt: skip
    typer.echo(
        f"restore point {rp.uuid} of {m.vm_name} on SR {sr_uuid}, linked to job {m.job_name}:"
        " its next run is a delta"
    )


def _holder(locker: Locker, vm_uuid: str, sr_uuid: str) -> str:
    """One phrase naming who holds the lock of (VM, SR)."""
    h = locker.read_holder(vm_uuid, sr_uuid)
    return h.describe() if h is not None else "another run (holder unknown)"
