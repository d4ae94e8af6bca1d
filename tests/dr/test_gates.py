"""Health gates against the simulator's guests: a guest that boots passes each kind of gate after
its boot delay, one that never boots times out, a guest script's failure fails at once, and a
VM that stops meanwhile fails its gate."""

from __future__ import annotations

import time

from xapitest import Pools

from xencr.config import HealthGate
from xencr.dr import gates
from xencr.xapi.session import XapiSession

KEY = "vm-data/xo-health-check"


def _fresh_vm(s: XapiSession, name: str, **other: str) -> str:
    """A halted copy of vm0 with the simulator's guest knobs in its other_config."""
    src = s.api.VM.get_by_name_label("vm0")[0]
    vm = s.call_async("VM.clone", src, name)
    s.api.VM.set_other_config(vm, dict(s.api.VM.get_other_config(vm)) | other)
    return str(vm)


def test_gates_wait_for_the_guest(pools: Pools) -> None:
    s = pools.session(1)
    pool = s.api.pool.get_all()[0]
    s.api.pool.set_other_config(pool, dict(s.api.pool.get_other_config(pool)) | {"sim_delay_scale": "1"})
    vm = _fresh_vm(s, "gated", sim_boot_delay="0.6")
    xenstore = HealthGate("xenstore", 10, KEY)
    gates.prepare(s, vm, xenstore)
    assert s.api.VM.get_xenstore_data(vm)[KEY] == "planned"
    s.api.VM.start(vm, False, False)
    assert gates.wait(s, vm, None).ok, "running is enough without a gate"
    tools = gates.wait(s, vm, HealthGate("guest_tools", 10))
    assert tools.ok and tools.detail == "guest tools reported" and tools.seconds >= 0.4, tools
    answer = gates.wait(s, vm, xenstore)
    assert answer.ok and answer.detail == f"{KEY} = success", answer
    s.api.VM.hard_shutdown(vm)
    stopped = gates.wait(s, vm, HealthGate("guest_tools", 10))
    assert not stopped.ok and stopped.detail == "the VM is Halted", stopped


def test_a_guest_that_never_boots_times_out_and_a_failing_script_fails(pools: Pools) -> None:
    s = pools.session(1)
    dead = _fresh_vm(s, "never boots", sim_boots="false")
    s.api.VM.start(dead, False, False)
    started = time.monotonic()
    r = gates.wait(s, dead, HealthGate("guest_tools", 1), poll=0.05)
    assert not r.ok and r.detail == "guest_tools within 1s: not met after 1s", r
    assert 1.0 <= time.monotonic() - started < 3
    s.api.VM.hard_shutdown(dead)
    failing = _fresh_vm(s, "check fails", sim_health_check="failure")
    gate = HealthGate("xenstore", 10, KEY)
    gates.prepare(s, failing, gate)
    s.api.VM.start(failing, False, False)
    r = gates.wait(s, failing, gate)
    assert not r.ok and r.detail == f"{KEY} = failure: simulated health-check failure", r
    s.api.VM.hard_shutdown(failing)
