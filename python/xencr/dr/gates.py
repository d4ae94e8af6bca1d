"""Health gates: what a failover waits for after starting a group's VMs before the next group,
and what a health check waits for after booting a clone (SPEC 7-8).

- ``power_state``: the VM is Running.
- ``guest_tools``: the guest agent reported (``VM.guest_metrics`` set, PV drivers detected), i.e.
  the guest booted far enough to run its tools.
- ``xenstore``: the guest answered a key, Xen Orchestra's health-check protocol: before the start
  the key is set to ``planned`` in ``VM.xenstore_data`` (xenopsd copies ``vm-data/`` keys both
  ways); a guest script answers ``success``, or ``failure`` with ``<key>-error`` saying why.

Each waits at most the gate's timeout. A VM that stops meanwhile fails its gate at once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from xencr.config import HealthGate
from xencr.xapi.session import XapiSession

NULL = "OpaqueRef:NULL"
PLANNED = "planned"


@dataclass(frozen=True)
class GateResult:
    ok: bool
    detail: str  # one line: what was seen
    seconds: float  # how long the wait took


def prepare(t: XapiSession, vm: str, gate: HealthGate | None) -> None:
    """What a gate needs before the VM starts (a halted VM): the ``xenstore`` key ``planned``."""
    if gate is None or gate.kind != "xenstore" or gate.key is None:
        return
    data = dict(t.api.VM.get_xenstore_data(vm))
    data.pop(f"{gate.key}-error", None)
    t.api.VM.set_xenstore_data(vm, data | {gate.key: PLANNED})


def wait(
    t: XapiSession,
    vm: str,
    gate: HealthGate | None,
    *,
    cancel: threading.Event | None = None,
    poll: float = 0.1,
) -> GateResult:
    """Wait for ``gate`` on the started ``vm`` (no gate: running is enough)."""
    start = time.monotonic()
    kind = gate.kind if gate is not None else "power_state"
    deadline = start + (gate.timeout if gate is not None else 0)
    while True:
        seen = _check(t, vm, gate, kind)
        took = time.monotonic() - start
        if seen is not None:
            return GateResult(seen[0], seen[1], took)
        if cancel is not None and cancel.is_set():
            return GateResult(False, "cancelled while waiting", took)
        if time.monotonic() >= deadline:
            what = gate.describe() if gate is not None else "power_state"
            return GateResult(False, f"{what}: not met after {took:.0f}s", took)
        time.sleep(poll)


def _check(t: XapiSession, vm: str, gate: HealthGate | None, kind: str) -> tuple[bool, str] | None:
    """(passed, why) once decided, None while still waiting."""
    state = str(t.api.VM.get_power_state(vm))
    if state != "Running":
        return False, f"the VM is {state}"
    if kind == "power_state":
        return True, "running"
    if kind == "guest_tools":
        metrics = str(t.api.VM.get_guest_metrics(vm))
        if metrics != NULL and bool(t.api.VM_guest_metrics.get_PV_drivers_detected(metrics)):
            return True, "guest tools reported"
        return None
    assert gate is not None and gate.key is not None
    data = t.api.VM.get_xenstore_data(vm)
    answer = data.get(gate.key, "")
    if answer == "success":
        return True, f"{gate.key} = success"
    if answer == "failure":
        return False, f"{gate.key} = failure: {data.get(f'{gate.key}-error', 'no reason given')}"
    return None
