"""`xencr dr recover --test` leaves the recovery pool's objects as they were, also when killed and
run again; `xencr dr failback` brings the recovered VMs home with what they wrote at the DR site."""

from __future__ import annotations

import signal
import sys
import time

from nativetest import LUN, MIRROR, Site, by_uuid, disks, objects


def test_a_test_leaves_the_recovery_pool_as_it_was(site: Site) -> None:
    # A network pool b lacks: the recovery's import makes one for web, which the test removes too.
    a = site.a
    net = a.api.network.create(
        {"name_label": "only on a", "name_description": "", "MTU": "1500", "other_config": {}}
    )
    a.api.VIF.create(
        {
            "device": "3",
            "network": net,
            "VM": site.vms["web"],
            "MAC": "",
            "MTU": "1500",
            "other_config": {},
            "qos_algorithm_type": "",
            "qos_algorithm_params": {},
        }
    )
    site.mirror()
    before = objects(site.b)
    for flags in ((), ("--boot",)):
        code, out = site.xencr(
            "dr", "recover", "--pool", "b", "--sr-config", site.lun_config(), "--test", *flags
        )
        assert code == 0, out
        assert "test of the recovery on pool b: 2 of 2 VMs recovered" in out
        assert objects(site.b) == before
    assert "2 started" in out  # --boot started them, on the isolated network
    # A VM the recovery pool holds already is never replaced by a test.
    code, out = site.xencr(
        "dr", "recover", "--pool", "b", "--sr-config", site.lun_config(), "--vm", "web", "--yes"
    )
    assert code == 0, out
    after_recovery = objects(site.b)
    code, out = site.xencr("dr", "recover", "--pool", "b", "--sr-config", site.lun_config(), "--test")
    assert code == 1 and "VM db: skipped: web already in pool b; a test never replaces a VM" in out
    assert objects(site.b) == after_recovery


def test_a_killed_test_is_cleaned_up_by_the_next(site: Site) -> None:
    site.mirror()
    before = objects(site.b)
    # Slow boots keep the test in its start step long enough to be killed there.
    site.b.api.pool.set_other_config(site.b.api.pool.get_all()[0], {"sim_delay_scale": "1"})
    proc = site.recover_in_background("--test", "--boot")
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("recovered "):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = objects(site.b)
    assert left != before  # the kill left recovered objects behind
    site.b.api.pool.set_other_config(site.b.api.pool.get_all()[0], {"sim_delay_scale": "0.01"})
    code, out = site.xencr("dr", "recover", "--pool", "b", "--sr-config", site.lun_config(), "--test")
    assert code == 0, out
    assert "destroyed test VM" in out
    assert objects(site.b) == before


def test_failback_brings_the_vms_home(site: Site) -> None:
    a, b = site.a, site.b
    site.mirror()
    code, out = site.xencr("dr", "recover", "--pool", "b", "--sr-config", site.lun_config(), "--yes")
    assert code == 0, out
    web = a.api.VM.get_uuid(site.vms["web"])
    # The DR site runs and writes.
    for uuid in disks(b, by_uuid(b, web)).values():
        b.api.sim.write(uuid, "0", str(2**20), "written-at-the-dr-site")
    sr = site.sr_uuid
    back = ["dr", "failback", "--from-pool", "b", "--to-pool", "a", "--sr", sr, "--yes"]
    code, out = site.xencr(*back)
    assert code == 1 and "pool b does not replicate its metadata to SR iSCSI storage" in out
    code, out = site.xencr("dr", "metadata", "enable", "--pool", "b", "--sr", sr)
    assert code == 0, out
    # The primary came back with its old copy of the SR plugged: refused, nothing changed.
    code, out = site.xencr(*back)
    assert code == 1 and "is attached to both pool b and pool a" in out
    assert b.api.VM.get_power_state(by_uuid(b, web)) == "Running"
    for pbd in a.api.SR.get_PBDs(site.sr):
        a.api.PBD.unplug(pbd)
    hashes = {d: b.api.sim.hash(u) for d, u in disks(b, by_uuid(b, web)).items()}
    version = int(b.api.VM.get_version(by_uuid(b, web)))
    mirror = (
        f"{sys.executable} -c \"import XenAPI; s = XenAPI.Session('{site.pools.urls[0]}'); "
        f"s.xenapi.login_with_password('root', open('{site.tmp / 'pw'}').read().strip()); "
        f"s.xenapi.sim.array_mirror('{MIRROR}', '{LUN}')\""
    )
    code, out = site.xencr(*back, "--mirror-command", mirror)
    assert code == 0, out
    home = by_uuid(a, web)
    assert a.api.VM.get_power_state(home) == "Running"
    assert int(a.api.VM.get_version(home)) == version + 1
    assert {d: a.api.sim.hash(u) for d, u in disks(a, home).items()} == hashes
    # The DR site's VMs are halted, its SR unplugged (never forgotten).
    assert b.api.VM.get_power_state(by_uuid(b, web)) == "Halted"
    b_sr = b.api.SR.get_by_uuid(sr)
    assert not any(b.api.PBD.get_currently_attached(p) for p in b.api.SR.get_PBDs(b_sr))


def test_a_killed_recovery_continues_and_starts_each_vm_once(site: Site) -> None:
    site.mirror()
    b = site.b
    # db's start delay (100 s unscaled) keeps the recovery in its first group when it is killed.
    b.api.pool.set_other_config(b.api.pool.get_all()[0], {"sim_delay_scale": "1"})
    proc = site.recover_in_background("--yes")
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if len([x for x in seen if x.startswith("recovered ")]) == 2:
            break
    while not b.api.sim.start_log():  # db's VM.start is running (sleeping its delay)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    b.api.pool.set_other_config(b.api.pool.get_all()[0], {"sim_delay_scale": "0.01"})
    code, out = site.xencr("dr", "recover", "--pool", "b", "--sr-config", site.lun_config(), "--yes")
    assert code == 0, out
    assert "continuing recovery attempt" in out and "2 of 2 VMs recovered, 2 started: done" in out
    log = [e["vm"] for e in b.api.sim.start_log()]
    uuids = {site.a.api.VM.get_uuid(vm) for vm in site.vms.values()}
    assert sorted(v for v in log if v in uuids) == sorted(uuids)  # each started exactly once
    for uuid in uuids:
        assert b.api.VM.get_power_state(by_uuid(b, uuid)) == "Running"
