"""What DR tests need from the simulator: guests that boot late or never, shutdown delays and
failures, start order, memory exhaustion, internal networks and a pool lost mid-plan."""

from __future__ import annotations

import http.client
import re
import time
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import pytest
import XenAPI
from simtest import MIB, Sim, failure, first_vm
from typer.testing import CliRunner

from xencr.cli.app import app

GIB = 1024 * MIB
HEALTH_KEY = "vm-data/xo/health-check"


@pytest.fixture
def x(sim: Sim) -> Iterator[Any]:
    """A session on pool 0 whose sim knobs and VM states are reset afterwards."""
    api = sim.session(0).xenapi
    vms = (first_vm(api, "vm0"), first_vm(api, "vm1"))
    vifs = {vm: set(api.VM.get_VIFs(vm)) for vm in vms}
    yield api
    pool = api.pool.get_all()[0]
    api.pool.set_other_config(pool, {})
    for vm in vms:
        if api.VM.get_power_state(vm) != "Halted":
            api.VM.remove_from_other_config(vm, "sim_hard_shutdown_delay")
            api.VM.hard_shutdown(vm)
        other = api.VM.get_other_config(vm)
        api.VM.set_other_config(vm, {k: v for k, v in other.items() if not k.startswith("sim_")})
        api.VM.set_domain_type(vm, "hvm")
        api.VM.set_xenstore_data(vm, {})
        for vif in set(api.VM.get_VIFs(vm)) - vifs[vm]:
            api.VIF.destroy(vif)


def knobs(x: Any, vm: str | None = None, **values: str) -> None:
    if vm is None:
        pool = x.pool.get_all()[0]
        x.pool.set_other_config(pool, {**x.pool.get_other_config(pool), **values})
    else:
        x.VM.set_other_config(vm, {**x.VM.get_other_config(vm), **values})


def internal_network(x: Any, name: str) -> str:
    return str(x.network.create({"name_label": name, "name_description": "", "MTU": "0", "other_config": {}}))


def add_vif(x: Any, vm: str, network: str, device: str) -> str:
    return str(
        x.VIF.create(
            {
                "device": device,
                "network": network,
                "VM": vm,
                "MAC": "",
                "MTU": "1500",
                "other_config": {},
                "qos_algorithm_type": "",
                "qos_algorithm_params": {},
            }
        )
    )


def wait_for(predicate: Any, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def test_guest_comes_up_after_boot_delay(x: Any) -> None:
    vm = first_vm(x, "vm0")
    net = internal_network(x, "boot-test")
    before = x.VM.get_VIFs(vm)  # device 0, on xenbr0
    add_vif(x, vm, net, "1")
    add_vif(x, vm, net, "2")
    knobs(x, None, sim_delay_scale="0.1")
    knobs(x, vm, sim_boot_delay="4")  # 0.4 s
    x.VM.set_xenstore_data(vm, {HEALTH_KEY: "planned"})
    started = time.monotonic()
    x.VM.start(vm, False, False)
    assert x.VM.get_guest_metrics(vm) == "OpaqueRef:NULL"
    assert x.VM.get_xenstore_data(vm)[HEALTH_KEY] == "planned"
    wait_for(lambda: x.VM.get_guest_metrics(vm) != "OpaqueRef:NULL")
    assert time.monotonic() - started >= 0.4
    gm = x.VM_guest_metrics.get_record(x.VM.get_guest_metrics(vm))
    domid = int(x.VM.get_domid(vm))
    assert gm["PV_drivers_up_to_date"] is True and gm["PV_drivers_detected"] is True
    assert gm["os_version"]["name"] == "Simulated guest"
    assert gm["networks"] == {
        "0/ip": f"10.0.{domid}.10",
        "0/ipv4/0": f"10.0.{domid}.10",
        "1/ip": f"10.0.{domid}.11",
        "1/ipv4/0": f"10.0.{domid}.11",
        "2/ip": f"10.0.{domid}.12",
        "2/ipv4/0": f"10.0.{domid}.12",
    }
    assert x.VM.get_xenstore_data(vm)[HEALTH_KEY] == "success"
    x.VM.hard_shutdown(vm)
    assert x.network.get_VIFs(net) != []
    x.network.destroy(net)  # also destroys the halted VM's VIFs on it
    assert x.VM.get_VIFs(vm) == before


def test_guest_that_never_boots(x: Any) -> None:
    vm = first_vm(x, "vm0")
    knobs(x, None, sim_delay_scale="0.01")
    knobs(x, vm, sim_boots="false", sim_hard_shutdown_delay="30")  # 0.3 s
    x.VM.set_xenstore_data(vm, {HEALTH_KEY: "planned"})
    x.VM.start(vm, False, False)
    time.sleep(0.3)
    assert x.VM.get_power_state(vm) == "Running"
    assert x.VM.get_guest_metrics(vm) == "OpaqueRef:NULL"
    assert x.VM.get_xenstore_data(vm)[HEALTH_KEY] == "planned"
    # HVM without PV drivers: no acknowledgement expected, the hypervisor shuts it down
    took = time.monotonic()
    x.VM.clean_shutdown(vm)
    assert time.monotonic() - took >= 0.3
    assert x.VM.get_power_state(vm) == "Halted"
    # a PV kernel must acknowledge: xenopsd waits min(60 s, 1200 s), then gives up
    x.VM.set_domain_type(vm, "pv")
    x.VM.start(vm, False, False)
    took = time.monotonic()
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.clean_shutdown(vm)
    assert 0.6 <= time.monotonic() - took < 3.0
    assert failure(exc) == ["VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT", vm]
    assert x.VM.get_power_state(vm) == "Running"
    # VM.shutdown falls back to a hard shutdown
    x.VM.shutdown(vm)
    assert x.VM.get_power_state(vm) == "Halted"


def test_shutdown_delays_and_uncooperative_guests(x: Any) -> None:
    vm = first_vm(x, "vm0")
    knobs(x, None, sim_delay_scale="0.1", sim_clean_shutdown_delay="5", sim_hard_shutdown_delay="1")
    x.VM.start(vm, False, False)
    took = time.monotonic()
    x.VM.clean_shutdown(vm)
    clean = time.monotonic() - took
    x.VM.start(vm, False, False)
    took = time.monotonic()
    x.VM.hard_shutdown(vm)
    hard = time.monotonic() - took
    assert 0.5 <= clean < 2.0 and 0.1 <= hard < 0.5
    assert x.VM.get_power_state(vm) == "Halted"
    knobs(x, None, sim_delay_scale="0.001")
    knobs(x, vm, sim_guest_shutdown="hang")  # acknowledges, never halts: 1200 s (1.2 s here)
    x.VM.start(vm, False, False)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.clean_shutdown(vm)
    assert failure(exc) == ["VM_SHUTDOWN_TIMEOUT", vm, "1200."]
    knobs(x, vm, sim_guest_shutdown="ignore")
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.clean_shutdown(vm)
    assert failure(exc) == ["VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT", vm]
    assert x.VM.get_power_state(vm) == "Running"


def test_start_order_is_observable(x: Any) -> None:
    vm0, vm1 = first_vm(x, "vm0"), first_vm(x, "vm1")
    knobs(x, None, sim_delay_scale="0.1")
    x.VM.set_start_delay(vm0, "2")  # VM.start returns 0.2 s after the domain runs
    try:
        x.VM.start(vm0, False, False)
        x.VM.start(vm1, False, False)
    finally:
        x.VM.set_start_delay(vm0, "0")
    log = [e for e in x.sim.start_log() if e["vm"] in (x.VM.get_uuid(vm0), x.VM.get_uuid(vm1))][-2:]
    assert [e["vm"] for e in log] == [x.VM.get_uuid(vm0), x.VM.get_uuid(vm1)]
    assert log[1]["time"] - log[0]["time"] >= 0.2
    host = x.host.get_uuid(x.VM.get_resident_on(vm1))
    assert log[1]["host"] == host and log[1]["domid"] == x.VM.get_domid(vm1)
    start_time = x.VM_metrics.get_start_time(x.VM.get_metrics(vm1))
    assert re.fullmatch(r"\d{8}T\d\d:\d\d:\d\dZ", start_time.value)  # whole seconds only


def test_memory_fills_the_host(x: Any) -> None:
    vm0, vm1 = first_vm(x, "vm0"), first_vm(x, "vm1")
    big = str(25 * GIB)
    third = x.VM.clone(vm0, "third")
    try:
        for vm in (vm0, vm1, third):
            x.VM.set_memory_limits(vm, big, big, big, big)
        host = x.host.get_all()[0]
        metrics = x.host.get_metrics(host)
        assert x.host.compute_free_memory(host) == str(60 * GIB)
        x.VM.start(vm0, False, False)
        x.VM.start(vm1, False, False)
        assert x.host.compute_free_memory(host) == str(10 * GIB)
        assert x.host_metrics.get_memory_free(metrics) == str(10 * GIB)
        with pytest.raises(XenAPI.Failure) as exc:
            x.VM.start(third, False, False)
        assert failure(exc) == ["HOST_NOT_ENOUGH_FREE_MEMORY", big, str(10 * GIB)]
        assert x.VM.get_power_state(third) == "Halted"
        x.VM.hard_shutdown(vm1)
        assert x.host_metrics.get_memory_free(metrics) == str(35 * GIB)
    finally:
        for vm in (vm0, vm1):
            if x.VM.get_power_state(vm) != "Halted":
                x.VM.hard_shutdown(vm)
            x.VM.set_memory_limits(vm, str(512 * MIB), str(GIB), str(GIB), str(GIB))
        for vbd in x.VM.get_VBDs(third):
            vdi = x.VBD.get_VDI(vbd)
            x.VBD.destroy(vbd)
            x.VDI.destroy(vdi)
        x.VM.destroy(third)


def test_internal_network_without_pifs(x: Any) -> None:
    vm = first_vm(x, "vm1")
    net = internal_network(x, "isolated test")
    record = x.network.get_record(net)
    assert record["PIFs"] == [] and record["MTU"] == "1500"
    assert re.fullmatch(r"xapi\d+", record["bridge"])
    vif = add_vif(x, vm, net, "1")
    x.VM.start(vm, False, False)
    assert x.VIF.get_currently_attached(vif) is True
    with pytest.raises(XenAPI.Failure) as exc:
        x.network.destroy(net)
    assert failure(exc) == ["NETWORK_CONTAINS_VIF", vif]
    x.VM.hard_shutdown(vm)
    x.network.destroy(net)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VIF.get_record(vif)
    assert failure(exc) == ["HANDLE_INVALID", "VIF", vif]
    with pytest.raises(XenAPI.Failure) as exc:
        x.network.create({"name_label": "n", "bridge": "xenbr9", "other_config": {}})
    assert failure(exc) == ["INVALID_VALUE", "bridge", "xenbr9"]
    mine = x.network.create({"name_label": "n", "bridge": "mybr0", "other_config": {}})
    with pytest.raises(XenAPI.Failure) as exc:
        x.network.create({"name_label": "n2", "bridge": "mybr0", "other_config": {}})
    assert failure(exc) == ["BRIDGE_NAME_EXISTS", "mybr0"]
    x.network.destroy(mine)


def test_pool_unreachable_after_n_calls(sim: Sim) -> None:
    s = sim.session(1)
    x = s.xenapi
    x.sim.fault_unreachable_after("3")
    assert x.sim.faults()["unreachable_after"] == "3"
    vms = [x.VM.get_all(), x.SR.get_all(), x.network.get_all()]
    assert all(vms)
    with pytest.raises((OSError, http.client.HTTPException, xmlrpc.client.ProtocolError)):
        x.host.get_all()
    assert x.sim.faults()["unreachable"] is True  # sim.* calls still answer
    with pytest.raises((OSError, http.client.HTTPException, xmlrpc.client.ProtocolError)):
        XenAPI.Session(sim.urls[1]).xenapi.login_with_password("root", sim.password, "1.0", "t")
    x.sim.fault_clear()
    assert x.host.get_all() != []


def test_cli_arms_unreachable_after(sim: Sim) -> None:
    x = sim.session(1).xenapi
    result = CliRunner().invoke(
        app, ["sim", "fault", "unreachable", "--state", str(sim.state), "--pool", "1", "--after", "5"]
    )
    assert result.exit_code == 0, result.output
    faults = x.sim.faults()
    assert faults["unreachable_after"] == "5" and faults["unreachable"] is False
    x.sim.fault_clear()
    assert x.sim.faults()["unreachable_after"] == "-1"
