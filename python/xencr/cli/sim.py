"""`xencr sim ...`: the embedded XAPI simulator."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

sim_app = typer.Typer(help="The XAPI simulator: a faithful pool on loopback.", no_args_is_help=True)
fault_app = typer.Typer(
    help="Fault injection into a running simulator (each fault is logged).", no_args_is_help=True
)
sim_app.add_typer(fault_app, name="fault")

StateOpt = Annotated[Path, typer.Option("--state", help="Simulator state directory.")]
MIB = 1024 * 1024


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@sim_app.command()
def init(
    state: StateOpt,
    pools: Annotated[int, typer.Option(help="Number of independent pools.")] = 2,
    vms: Annotated[int, typer.Option(help="Halted VMs per pool.")] = 2,
    disk_mib: Annotated[int, typer.Option("--disk-mib", help="Size of each VM's disk in MiB.")] = 16,
    sr_gib: Annotated[int, typer.Option("--sr-gib", help="Capacity of each SR in GiB.")] = 4,
    password_file: Annotated[Path | None, typer.Option(help="File holding the root password.")] = None,
    hosts: Annotated[
        int, typer.Option(help="Hosts per pool (each with a local SR; 2+ adds shared SRs on all).")
    ] = 1,
) -> None:
    """Create a ready-to-use state directory.

    Example: xencr sim init --state /tmp/sim --pools 2 --hosts 2
    """
    from xencr.sim.layout import init_state, read_password

    try:
        password = read_password(state, password_file) if password_file else None
        init_state(
            state,
            pools,
            vms=vms,
            disk_size=disk_mib * MIB,
            sr_size=sr_gib * 1024 * MIB,
            password=password,
            hosts=hosts,
        )
    except (FileExistsError, ValueError) as err:
        _fail(str(err))
    each = f" of {hosts} hosts" if hosts > 1 else ""
    typer.echo(f"initialised {pools} pools{each} in {state} (root password in {state / 'password'})")


@sim_app.command()
def serve(
    state: StateOpt,
    pools: Annotated[int | None, typer.Option(help="Pools (default: as stored, 2 if new).")] = None,
    port: Annotated[
        int,
        typer.Option(help="Port of pool 0; pool i listens on port+i, then the other hosts follow (0: any)."),
    ] = 8480,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    password_file: Annotated[Path | None, typer.Option(help="File holding the root password.")] = None,
    auth_delay: Annotated[float, typer.Option(help="Seconds before a failed login answers (xapi: 5).")] = 5.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every fault and request.")] = False,
    tls: Annotated[
        bool, typer.Option("--tls", help="Serve HTTPS with a self-signed certificate in DIR/tls.")
    ] = False,
) -> None:
    """Serve the pools until SIGTERM/SIGINT; prints one line per pool URL (host 0), then for pools of
    several hosts one "poolI hostJ URL" line per host (and, with --tls, each certificate's path and
    SHA-256 fingerprint first).

    Example: xencr sim serve --state /tmp/sim --port 8480
    """
    from xencr.sim.control import StateBusy
    from xencr.sim.control import serve as run

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )

    def announce(line: str) -> None:
        typer.echo(line)
        sys.stdout.flush()

    try:
        run(
            state,
            pools=pools,
            host=host,
            port=port,
            password_file=password_file,
            auth_delay=auth_delay,
            announce=announce,
            tls=tls,
        )
    except StateBusy:
        _fail(f"{state} is already served by another process")
    except (ValueError, OSError) as err:
        _fail(str(err))


def _call(
    state: Path, method: str, *params: object, vdi_uuid: str | None = None, need_server: bool = False
) -> object:
    from xencr.sim.control import running_server, sim_call
    from xencr.sim.errors import XapiError

    if need_server and running_server(state) is None:
        _fail(f"no simulator is serving {state}")
    try:
        return sim_call(state, method, *params, vdi_uuid=vdi_uuid)
    except XapiError as err:
        _fail(str(err))
    return None


@sim_app.command()
def write(
    state: StateOpt,
    vdi_uuid: Annotated[str, typer.Argument(help="UUID of the VDI to write to.")],
    offset: Annotated[int, typer.Option(help="Byte offset.")],
    length: Annotated[int, typer.Option(help="Number of bytes.")],
    pattern: Annotated[str, typer.Option(help="Seed of the deterministic data.")] = "xencr",
) -> None:
    """Simulate a guest write (deterministic pattern data).

    Example: xencr sim write --state /tmp/sim 3f0c...  --offset 0 --length 4194304 --pattern run2
    """
    _call(state, "sim.write", vdi_uuid, str(offset), str(length), pattern, vdi_uuid=vdi_uuid)


@sim_app.command("hash")
def hash_(
    state: StateOpt,
    vdi_uuid: Annotated[str, typer.Argument(help="UUID of the VDI.")],
) -> None:
    """Print the sha256 of a VDI's virtual content.

    Example: xencr sim hash --state /tmp/sim 3f0c...
    """
    typer.echo(_call(state, "sim.hash", vdi_uuid, vdi_uuid=vdi_uuid))


@sim_app.command("ls")
def ls(
    state: StateOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List each pool's SRs, networks and VMs with their disk UUIDs (for `sim write`/`sim hash`).

    Example: xencr sim ls --state /tmp/sim
    """
    from xencr.sim.control import describe

    pools = describe(state)
    if as_json:
        typer.echo(json.dumps(pools, indent=2))
        return
    for pool in pools:
        typer.echo(f"pool{pool['index']} {pool['name']}")
        if len(pool["hosts"]) > 1:
            for h in pool["hosts"]:
                role = " (master)" if h["master"] else ""
                typer.echo(f"  host {h['uuid']}  {h['address']:<15} {h['name']}{role}")
        for sr in pool["srs"]:
            typer.echo(f"  SR  {sr['uuid']}  {sr['type']:<9} {sr['name']}")
        for net in pool["networks"]:
            typer.echo(f"  net {net['uuid']}  {net['bridge']:<9} {net['name']}")
        for vm in pool["vms"]:
            kind = "snap" if vm["is_a_snapshot"] else "tmpl" if vm["is_a_template"] else "VM  "
            typer.echo(f"  {kind} {vm['uuid']}  {vm['power_state']:<9} {vm['name']}")
            for disk in vm["disks"]:
                typer.echo(f"         disk {disk['userdevice']}: {disk['uuid']}  {disk['size'] // MIB} MiB")


def _pool_call(state: Path, pool: int, method: str, *params: object) -> object:
    from xencr.sim.control import running_server, sim_call
    from xencr.sim.errors import XapiError

    if running_server(state) is None:
        _fail(f"no simulator is serving {state}")
    try:
        return sim_call(state, method, *params, pool_index=pool)
    except XapiError as err:
        _fail(str(err))
    return None


PoolOpt = Annotated[int, typer.Option(help="Pool index.")]


@fault_app.command("fail-call")
def fault_fail_call(state: StateOpt, method: str, error: list[str], pool: PoolOpt = 0) -> None:
    """Fail the next call of METHOD with ERROR (code then params).

    Example: xencr sim fault fail-call --state /tmp/sim VM.snapshot SR_BACKEND_FAILURE_44 "" "There is insufficient space" ""
    """  # noqa: E501
    _pool_call(state, pool, "sim.fault_fail_next_call", method, error)


@fault_app.command("drop")
def fault_drop(state: StateOpt, kind: str, after: int, pool: PoolOpt = 0) -> None:
    """Drop the next KIND (export|import) connection after AFTER bytes.

    Example: xencr sim fault drop --state /tmp/sim export 1048576
    """
    _pool_call(state, pool, "sim.fault_drop_after", kind, str(after))


@fault_app.command("flip")
def fault_flip(state: StateOpt, kind: str, offset: int, pool: PoolOpt = 0) -> None:
    """Flip the byte at OFFSET of the next KIND (export|import) stream.

    Example: xencr sim fault flip --state /tmp/sim export 4096
    """
    _pool_call(state, pool, "sim.fault_flip_byte", kind, str(offset))


@fault_app.command("slow")
def fault_slow(state: StateOpt, rate: int, pool: PoolOpt = 0) -> None:
    """Limit every transfer to RATE bytes/s (0 lifts the limit).

    Example: xencr sim fault slow --state /tmp/sim 1048576
    """
    _pool_call(state, pool, "sim.fault_rate", str(rate))


@fault_app.command("fill-sr")
def fault_fill_sr(state: StateOpt, sr_uuid: str, nbytes: int = -1, pool: PoolOpt = 0) -> None:
    """Occupy NBYTES of the SR with foreign data (-1: all free space; 0: release).

    Example: xencr sim fault fill-sr --state /tmp/sim 6a2e...
    """
    _pool_call(state, pool, "sim.fault_fill_sr", sr_uuid, str(nbytes))


@fault_app.command("unreachable")
def fault_unreachable(
    state: StateOpt,
    on: bool = True,
    pool: PoolOpt = 0,
    after: Annotated[int, typer.Option(help="Answer N more requests first (-1: at once).")] = -1,
) -> None:
    """Make the pool's host unreachable (connections dropped) or reachable again (--no-on).

    Example: xencr sim fault unreachable --state /tmp/sim --pool 1 --after 20
    """
    if on and after >= 0:
        _pool_call(state, pool, "sim.fault_unreachable_after", str(after))
    else:
        _pool_call(state, pool, "sim.fault_unreachable", on)


@fault_app.command("host-down")
def fault_host_down(
    state: StateOpt,
    host: Annotated[str, typer.Argument(help="Host index in the pool (0 = first), UUID or ref.")],
    on: bool = True,
    pool: PoolOpt = 0,
) -> None:
    """Take a host of the pool down (connections refused) or bring it back up (--no-on).

    Example: xencr sim fault host-down --state /tmp/sim 1 --pool 0
    """
    _pool_call(state, pool, "sim.fault_host_down", host, on)


@fault_app.command("clear")
def fault_clear(state: StateOpt, pool: PoolOpt = 0) -> None:
    """Remove every armed fault of the pool."""
    _pool_call(state, pool, "sim.fault_clear")


@fault_app.command("show")
def fault_show(state: StateOpt, pool: PoolOpt = 0) -> None:
    """Print the armed faults of the pool as JSON."""
    typer.echo(json.dumps(_pool_call(state, pool, "sim.faults"), indent=2))
