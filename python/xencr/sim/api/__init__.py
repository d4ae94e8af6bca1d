"""Per-class message handlers; importing this package registers them all with the dispatcher."""

from xencr.sim.api import (  # noqa: F401 - imported for registration
    appliance,
    cbt,
    dr,
    event,
    host_pool,
    nbd,
    network,
    placement,
    session,
    sim,
    sr,
    task,
    vbd,
    vdi,
    vif,
    vm,
)
