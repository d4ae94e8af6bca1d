"""Sim-only calls (``sim.*``): guest writes, hashes, fault injection, GC. Not part of XAPI.

They take a valid session (so the SDK can call ``session.xenapi.sim.fault_fail_next_call(...)``)
or the control token written in ``<state>/server.json`` (used by ``xencr sim`` commands).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from xencr.sim.errors import XapiError
from xencr.sim.guest import pattern

if TYPE_CHECKING:
    from xencr.sim.pool_state import PoolState

SimFn = Callable[..., Any]
SIM_CALLS: dict[str, SimFn] = {}


def sim_call(name: str) -> Callable[[SimFn], SimFn]:
    def register(fn: SimFn) -> SimFn:
        SIM_CALLS[name] = fn
        return fn

    return register


def dispatch_sim(pool: PoolState, method: str, params: list[Any]) -> Any:
    fn = SIM_CALLS.get(method)
    if fn is None:
        raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
    if not params or not isinstance(params[0], str):
        raise XapiError("SESSION_INVALID", "")
    credential = params[0]
    if not (pool.control_token and credential == pool.control_token):
        pool.check_session(credential)
    try:
        result = fn(pool, *params[1:])
    except TypeError as err:
        raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, str(err), len(params) - 1) from None
    pool.save()
    return "" if result is None else result


def _vdi(pool: PoolState, vdi_uuid: str) -> str:
    with pool.db.lock:
        return str(pool.db.ref_of("VDI", vdi_uuid))


def write_vdi(pool: PoolState, vdi_uuid: str, offset: int, length: int, seed: str) -> None:
    """A guest write of ``length`` pattern bytes at ``offset`` into the VDI's leaf."""
    vdi = _vdi(pool, vdi_uuid)
    for pos, chunk in pattern(seed, offset, length):
        with pool.db.lock:
            pool.storage.write(vdi, pos, chunk)
    with pool.db.lock:
        pool.storage.refresh(pool.db.get("VDI", vdi)["SR"])
    pool.log.info("guest write: VDI %s offset %d length %d seed %s", vdi_uuid, offset, length, seed)


@sim_call("sim.write")
def _write(pool: PoolState, vdi_uuid: str, offset: Any, length: Any, seed: str = "xencr") -> str:
    write_vdi(pool, vdi_uuid, int(offset), int(length), seed)
    return ""


@sim_call("sim.hash")
def _hash(pool: PoolState, vdi_uuid: str) -> str:
    vdi = _vdi(pool, vdi_uuid)
    return pool.storage.sha256(vdi)


@sim_call("sim.import_stats")
def _import_stats(pool: PoolState, vdi_uuid: str) -> dict[str, Any]:
    """What the last VHD import into this VDI received, as the pool counted it ({} if none)."""
    _vdi(pool, vdi_uuid)  # UUID_INVALID for an unknown VDI
    return dict(pool.imports.get(vdi_uuid, {}))


@sim_call("sim.transfer_gauge")
def _transfer_gauge(pool: PoolState) -> dict[str, int]:
    """VDI exports and imports the pool serves now, and the most it served at once since it
    was started (the simulator's own instrumentation, not XAPI's)."""
    return pool.transfers.describe()


@sim_call("sim.fault_fail_next_call")
def _fail_next(pool: PoolState, method: str, description: list[str]) -> str:
    if not description:
        raise XapiError("INVALID_VALUE", "description", "[]")
    pool.faults.fail_next_call(method, [str(x) for x in description])
    return ""


@sim_call("sim.fault_drop_after")
def _drop(pool: PoolState, kind: str, nbytes: Any) -> str:
    _kind(kind)
    pool.faults.drop_transfer_after(kind, int(nbytes))
    return ""


@sim_call("sim.fault_flip_byte")
def _flip(pool: PoolState, kind: str, offset: Any) -> str:
    _kind(kind)
    pool.faults.flip_byte(kind, int(offset))
    return ""


@sim_call("sim.fault_rate")
def _rate(pool: PoolState, rate: Any) -> str:
    pool.faults.set_rate(int(rate) or None)
    return ""


@sim_call("sim.fault_connection_rate")
def _connection_rate(pool: PoolState, rate: Any) -> str:
    """A slow dom0: each NBD connection and each HTTP export/import stream of the pool limited
    to ``rate`` bytes/s on its own (0 lifts it)."""
    pool.faults.set_connection_rate(int(rate) or None)
    pool.nbd_changed()
    return ""


@sim_call("sim.nbd_attachments")
def _nbd_attachments(pool: PoolState) -> list[dict[str, str]]:
    """The VDIs NBD clients hold attached to a control domain right now: ``{vdi, vbd, host}``
    (VDI and host by UUID)."""
    nbd = pool.nbd
    if nbd is None:
        return []
    with pool.db.lock:
        return [
            {
                "vdi": a.vdi_uuid,
                "vbd": a.vbd,
                "host": pool.db.get("host", a.host)["uuid"] if pool.db.exists("host", a.host) else "",
            }
            for a in nbd.attached(pool.index)
        ]


@sim_call("sim.fault_cbt_inconsistent")
def _cbt_inconsistent(pool: PoolState, vdi_uuid: str) -> str:
    """The VDI's CBT log is found inconsistent (tapdisk died with it open): sm deletes it and
    disables CBT on the VDI (``_disable_cbt_on_error``, alert VDI_CBT_METADATA_INCONSISTENT)."""
    with pool.db.lock:
        vdi = pool.db.ref_of("VDI", vdi_uuid)
        row = pool.db.get("VDI", vdi)
        pool.storage.cbt.discard(pool.storage.sr_dir(row["SR"]), row["uuid"])
        pool.db.update("VDI", vdi, cbt_enabled=False)
    pool.log.warning("fault fired: CBT log of VDI %s inconsistent, CBT disabled", vdi_uuid)
    return ""


@sim_call("sim.fault_fill_sr")
def _fill(pool: PoolState, sr_uuid: str, nbytes: Any) -> str:
    with pool.db.lock:
        sr = pool.db.by_uuid("SR", sr_uuid)
        n = int(nbytes)
        if n < 0:  # "fill completely": leave no free space at all
            pool.faults.fill_sr(sr_uuid, 0)
            n = max(0, pool.storage.free(sr))
        pool.faults.fill_sr(sr_uuid, n)
        pool.storage.refresh(sr)
    return ""


@sim_call("sim.fault_unreachable")
def _unreachable(pool: PoolState, flag: bool) -> str:
    pool.faults.set_unreachable(bool(flag))
    return ""


@sim_call("sim.fault_unreachable_after")
def _unreachable_after(pool: PoolState, n: Any) -> str:
    """The pool answers ``n`` more requests (API calls and transfers), then drops them all."""
    pool.faults.set_unreachable_after(int(n))
    return ""


@sim_call("sim.start_log")
def _start_log(pool: PoolState) -> list[dict[str, Any]]:
    """Every domain start since the pool was served, in order, with a sub-second wall-clock time
    (``VM_metrics.start_time`` is a whole-second DateTime, ``date.ml`` ``to_rfc3339``)."""
    with pool.db.lock:
        return [{"vm": r.vm, "time": r.time, "host": r.host, "domid": r.domid} for r in pool.starts]


def host_of(pool: PoolState, which: str) -> str:
    """A host named by ref, UUID or index in host order."""
    with pool.db.lock:
        if pool.db.exists("host", which):
            return which
        if which.isdigit() and int(which) < len(pool.hosts()):
            return pool.hosts()[int(which)]
        return str(pool.db.by_uuid("host", which))


@sim_call("sim.fault_host_down")
def _host_down(pool: PoolState, which: str, down: bool = True) -> str:
    """Take a host down (its listener closed: connections refused, open ones reset; the master
    records it not live) or bring it back up."""
    pool.set_host_down(host_of(pool, str(which)), bool(down))
    return ""


@sim_call("sim.fault_clear")
def _clear(pool: PoolState) -> str:
    for host in list(pool.down_hosts):
        pool.set_host_down(host, False)
    pool.faults.clear()
    with pool.db.lock:
        for sr in pool.db.refs("SR"):
            pool.storage.refresh(sr)
    pool.nbd_changed()
    return ""


@sim_call("sim.faults")
def _faults(pool: PoolState) -> dict[str, Any]:
    return pool.faults.describe()


@sim_call("sim.guest_tick")
def _guest_tick(pool: PoolState, seconds: Any) -> int:
    """Advance the live-guest imitation by ``seconds`` now (tests use it instead of waiting)."""
    return pool.guests.tick(float(seconds))


def describe_pool(pool: PoolState) -> dict[str, Any]:
    """Pools, SRs, networks and VMs with their disks (what ``xencr sim ls`` prints)."""
    db = pool.db
    with db.lock:
        name = db.get("pool", pool.pool_ref)["name_label"] if db.exists("pool", pool.pool_ref) else ""
        srs = [
            {
                "uuid": r["uuid"],
                "name": r["name_label"],
                "type": r["type"],
                "size": int(r["physical_size"]),
                "used": int(r["physical_utilisation"]),
            }
            for _, r in db.items("SR")
        ]
        networks = [
            {"uuid": r["uuid"], "name": r["name_label"], "bridge": r["bridge"]}
            for _, r in db.items("network")
        ]
        vms = []
        for ref, r in db.items("VM"):
            if r["is_control_domain"]:
                continue
            disks = []
            for vbd in db.reverse("VM", "VBDs", ref):
                vdi = db.get("VBD", vbd)["VDI"]
                if db.exists("VDI", vdi):
                    v = db.get("VDI", vdi)
                    disks.append(
                        {
                            "uuid": v["uuid"],
                            "name": v["name_label"],
                            "size": int(v["virtual_size"]),
                            "userdevice": db.get("VBD", vbd)["userdevice"],
                        }
                    )
            vms.append(
                {
                    "uuid": r["uuid"],
                    "name": r["name_label"],
                    "power_state": r["power_state"],
                    "is_a_snapshot": r["is_a_snapshot"],
                    "is_a_template": r["is_a_template"],
                    "disks": sorted(disks, key=lambda d: str(d["userdevice"])),
                }
            )
    hosts = [
        {
            "uuid": db.get("host", h)["uuid"],
            "name": db.get("host", h)["name_label"],
            "address": db.get("host", h)["address"],
            "master": h == pool.master_ref,
        }
        for h in pool.hosts()
    ]
    return {
        "index": pool.index,
        "name": name,
        "hosts": hosts,
        "srs": srs,
        "networks": networks,
        "vms": sorted(vms, key=lambda v: (v["is_a_snapshot"], v["name"])),
    }


@sim_call("sim.info")
def _info(pool: PoolState) -> dict[str, Any]:
    return describe_pool(pool)


@sim_call("sim.array_mirror")
def _array_mirror(pool: PoolState, from_scsiid: str, to_scsiid: str) -> str:
    """The array replaces LUN ``to_scsiid`` with a point-in-time copy of LUN ``from_scsiid``
    (same SR UUID inside): what the secondary LUN holds once a mirror is broken."""
    pool.array.mirror(str(from_scsiid), str(to_scsiid))
    return ""


@sim_call("sim.array")
def _array(pool: PoolState) -> list[dict[str, Any]]:
    """Every LUN of the array: the SR it holds, its metadata VDIs' database generations, and
    which pools (and hosts) have it plugged."""
    return pool.array.describe()


@sim_call("sim.gc")
def _gc(pool: PoolState, sr_uuid: str) -> int:
    with pool.db.lock:
        sr = pool.db.by_uuid("SR", sr_uuid)
    return pool.gc.collect(sr)


def _kind(kind: str) -> None:
    if kind not in ("export", "import"):
        raise XapiError("INVALID_VALUE", "kind", kind)
