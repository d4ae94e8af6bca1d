"""Sim-only timing knobs, read from ``other_config`` maps (inert keys for a real pool).

Rule: a VM's ``other_config[key]`` wins over the pool's ``other_config[key]``, which wins over the
default; every delay is in seconds of simulated time and is multiplied by the pool's
``other_config["sim_delay_scale"]`` (default 1.0), so tests can run realistic timings fast.
Callers hold the database lock.
"""

from __future__ import annotations

from xencr.sim.db import Database
from xencr.sim.errors import XapiError

BOOT_DELAY = "sim_boot_delay"  # seconds from VM.start until the guest is up (default 0)
BOOTS = "sim_boots"  # "false": the domain runs but its guest never comes up
CLEAN_SHUTDOWN_DELAY = "sim_clean_shutdown_delay"  # a cooperating guest's shutdown time (default 0)
HARD_SHUTDOWN_DELAY = "sim_hard_shutdown_delay"  # domain destruction time (default 0)
GUEST_SHUTDOWN = "sim_guest_shutdown"  # "ignore": never acknowledges; "hang": acknowledges, never halts
DELAY_SCALE = "sim_delay_scale"  # pool only


def pool_config(db: Database) -> dict[str, str]:
    pools = db.refs("pool")
    return dict(db.get("pool", pools[0])["other_config"]) if pools else {}


def _number(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number < 0:
        raise XapiError("INVALID_VALUE", key, value)
    return number


def delay_scale(db: Database) -> float:
    value = pool_config(db).get(DELAY_SCALE)
    return 1.0 if value is None else _number(DELAY_SCALE, value)


def seconds(db: Database, vm: str, key: str) -> float:
    """The unscaled delay ``key`` for ``vm`` (VM, then pool, then 0)."""
    value = db.get("VM", vm)["other_config"].get(key, pool_config(db).get(key))
    return 0.0 if value is None else _number(key, value)


def scaled(db: Database, vm: str, key: str) -> float:
    return seconds(db, vm, key) * delay_scale(db)


def guest_boots(db: Database, vm: str) -> bool:
    return str(db.get("VM", vm)["other_config"].get(BOOTS, "true")).lower() != "false"


def guest_shutdown(db: Database, vm: str) -> str:
    """How the guest answers a shutdown request: ``cooperate`` (default), ``ignore`` or ``hang``."""
    value = str(db.get("VM", vm)["other_config"].get(GUEST_SHUTDOWN, "cooperate"))
    if value not in ("cooperate", "ignore", "hang"):
        raise XapiError("INVALID_VALUE", GUEST_SHUTDOWN, value)
    return value
