"""`xencr dr failback`: the XenServer documentation's steps after a recovery, as one command.
Once the primary site is back, the VMs recovered on the recovery pool go home:

1. the recovery pool must replicate its own metadata to the SRs (it is what the primary recovers
   from): checked, and said how to turn it on when it does not;
2. an LVM SR is written by one pool at a time: each SR must be attached to the recovery pool only
   (plugged on the primary too: refused, naming both);
3. the recovery pool's VMs on those SRs are shut down cleanly in reverse start order (descending
   `VM.order`, `shutdown_delay` waited after each group, as XenCenter does: XAPI does not use it);
   a VM that does not shut down cleanly stops the failback, nothing else changed;
4. the SRs are unplugged from the recovery pool (never forgotten: its VM records stay, halted);
5. ``mirror_command``, when given, runs (no shell): the array's own command that makes the
   primary's LUNs hold what the recovery pool wrote (a mirror reversed and synchronised). It exits
   0 or the failback stops there, the SRs unplugged and nothing recovered;
6. the primary attaches them (its own PBDs plugged, or a DR task from ``--sr-config``) and
   recovers the VMs from the database the recovery pool wrote (`recover`, newest wins: the
   primary's older copy of each VM is replaced), then starts them in order.

The primary must see the LUNs as the recovery pool left them: the array's mirror reversed (or
synchronous). When it does not, step 5 finds no metadata of the recovery pool there and says so."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xencr.config import PlanConfig
from xencr.dr.native import metadata
from xencr.dr.native.found import LunSource
from xencr.dr.native.recover import RecoverError, RecoverReport, RecoverRequest, recover
from xencr.state import StateDB
from xencr.xapi.errors import XapiError
from xencr.xapi.session import XapiSession

NULL = "OpaqueRef:NULL"


class FailbackError(Exception):
    """The failback stopped; one line saying where and what to do."""


@dataclass(frozen=True)
class FailbackRequest:
    from_pool: str  # the recovery pool, where the VMs run now
    to_pool: str  # the primary
    srs: tuple[str, ...]  # the mirrored SRs (name or UUID, as the recovery pool names them)
    luns: tuple[LunSource, ...] = ()  # how the primary attaches them when it does not know them
    plan: PlanConfig | None = None
    mirror_command: tuple[str, ...] = ()  # the array's command that hands the LUNs back (argv)


@dataclass
class FailbackReport:
    stopped: list[str] = field(default_factory=list)  # VM names shut down on the recovery pool
    detached: list[str] = field(default_factory=list)
    recovery: RecoverReport | None = None


Say = Callable[[str], None]


def _vms_on(t: XapiSession, sr_refs: set[str]) -> list[tuple[str, dict[str, object]]]:
    vbds = t.api.VBD.get_all_records()
    vdis = t.api.VDI.get_all_records()
    out = []
    for ref, rec in t.api.VM.get_all_records().items():
        if rec["is_a_snapshot"] or rec["is_a_template"] or rec["is_control_domain"]:
            continue
        if any(
            vbds[b]["VDI"] in vdis and vdis[vbds[b]["VDI"]]["SR"] in sr_refs for b in rec["VBDs"] if b in vbds
        ):
            out.append((str(ref), rec))
    return out


def _run_mirror(argv: Sequence[str], from_pool: str) -> None:
    stop = f"; the SRs are unplugged from pool {from_pool}, nothing was recovered"
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FailbackError(f"mirror command {argv[0]!r} could not run: {err}{stop}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise FailbackError(
            f"mirror command {argv[0]!r} exited {done.returncode}" + (f": {tail[-1]}" if tail else "") + stop
        )


def _plugged(t: XapiSession, sr: str) -> bool:
    return any(t.api.PBD.get_currently_attached(p) for p in t.api.SR.get_PBDs(sr))


def failback(
    back: XapiSession, home: XapiSession, db: StateDB, req: FailbackRequest, *, say: Say = lambda _: None
) -> FailbackReport:
    """The module's steps; ``back`` is the recovery pool, ``home`` the primary."""
    out = FailbackReport()
    srs = [metadata.find_sr(back, req.from_pool, s) for s in req.srs]
    replicating = {m.sr_uuid for m in metadata.status(back, req.from_pool) if m.replicating}
    for _, rec in srs:
        if rec["uuid"] not in replicating:
            raise FailbackError(
                f"pool {req.from_pool} does not replicate its metadata to SR {rec['name_label']}: the "
                f"primary recovers from it; run `xencr dr metadata enable --pool {req.from_pool} "
                f"--sr {rec['uuid']}` first"
            )
    home_srs = {str(r["uuid"]): str(ref) for ref, r in home.api.SR.get_all_records().items()}
    for ref, rec in srs:
        known = home_srs.get(str(rec["uuid"]))
        if known is not None and _plugged(home, known) and _plugged(back, ref):
            raise FailbackError(
                f"SR {rec['name_label']} ({rec['uuid']}) is attached to both pool {req.from_pool} and pool "
                f"{req.to_pool}: an LVM SR is written by one pool at a time; unplug it on pool {req.to_pool} "
                "(xe pbd-unplug) and run again"
            )
        if known is None and not req.luns:
            raise FailbackError(
                f"pool {req.to_pool} does not know SR {rec['name_label']} ({rec['uuid']}): give --sr-config "
                "(the primary's LUN) to attach it"
            )
    # Reverse start order: the highest order first, shutdown_delay after each group.
    vms = _vms_on(back, {ref for ref, _ in srs})
    uuids = tuple(str(rec["uuid"]) for _, rec in vms)
    if not uuids:
        names = ", ".join(str(rec["name_label"]) for _, rec in srs)
        raise FailbackError(f"pool {req.from_pool}: no VM has a disk on SR {names}: nothing to fail back")
    running = [(ref, rec) for ref, rec in vms if rec["power_state"] != "Halted"]
    for order in sorted({int(str(rec["order"])) for _, rec in running}, reverse=True):
        group = [(ref, rec) for ref, rec in running if int(str(rec["order"])) == order]
        for ref, rec in group:
            try:
                back.call_async("VM.clean_shutdown", ref)
            except XapiError as err:
                raise FailbackError(
                    f"pool {req.from_pool}: VM {rec['name_label']} did not shut down cleanly ({err}); "
                    "nothing else changed: shut it down, then run again"
                ) from None
            out.stopped.append(str(rec["name_label"]))
            say(f"pool {req.from_pool}: shut down {rec['name_label']}")
        delay = max(int(str(rec["shutdown_delay"])) for _, rec in group)
        if delay:
            time.sleep(delay)
    for ref, rec in srs:
        if _plugged(back, ref):
            # Detached only after the metadata of the halted VMs reached the SR: xapi writes its
            # redo log before a call returns.
            for pbd in back.api.SR.get_PBDs(ref):
                if back.api.PBD.get_currently_attached(pbd):
                    back.call_once("PBD.unplug", pbd)
            out.detached.append(str(rec["name_label"]))
            say(f"pool {req.from_pool}: SR {rec['name_label']} unplugged")
    if req.mirror_command:
        _run_mirror(req.mirror_command, req.from_pool)
        say(f"mirror command {req.mirror_command[0]!r} exited 0")
    luns: Sequence[LunSource] = ()
    for _, rec in srs:
        known = home_srs.get(str(rec["uuid"]))
        if known is None:
            luns = req.luns
            continue
        # Master first, then the members (xapi_dr_task.ml's order).
        master = home.api.pool.get_master(home.api.pool.get_all()[0])
        pbds = sorted(home.api.SR.get_PBDs(known), key=lambda p: home.api.PBD.get_host(p) != master)
        for pbd in pbds:
            if not home.api.PBD.get_currently_attached(pbd):
                home.call_once("PBD.plug", pbd)
        say(f"pool {req.to_pool}: SR {rec['name_label']} plugged")
    request = RecoverRequest(
        pool=req.to_pool,
        luns=tuple(luns),
        from_srs=tuple(str(rec["uuid"]) for _, rec in srs),
        vms=uuids,
        plan=req.plan,
    )
    try:
        out.recovery = recover(home, db, request, say=say)
    except RecoverError as err:
        raise FailbackError(
            f"{err} (does the primary see the LUNs as pool {req.from_pool} left them? reverse the array "
            "mirror first)"
            if "no other pool's metadata" in str(err)
            else str(err)
        ) from None
    return out
