"""The XAPI client against the simulator: sessions, errors, and disk transfers whose result is
checked by content (the simulator's own hash of each VDI)."""

from __future__ import annotations

import pytest
from xapitest import MIB, PASSWORD, Pools

from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import Endpoint, XapiSession
from xencr.xapi.transfer import copy_vdi


def _disk_of(s: XapiSession, vm_name: str) -> str:
    vm = s.api.VM.get_by_name_label(vm_name)[0]
    for vbd in s.api.VM.get_VBDs(vm):
        if s.api.VBD.get_type(vbd) == "Disk":
            return str(s.api.VBD.get_VDI(vbd))
    raise AssertionError("no disk")


def _new_vdi(s: XapiSession, size: int) -> str:
    sr = s.api.pool.get_default_SR(s.api.pool.get_all()[0])
    rec = {
        "SR": sr,
        "virtual_size": str(size),
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": {},
        "name_label": "xencr test",
    }
    return str(s.api.VDI.create(rec))


def _hash(s: XapiSession, vdi: str) -> str:
    return str(s.api.sim.hash(s.api.VDI.get_uuid(vdi)))


def test_wrong_password_is_one_code(pools: Pools) -> None:
    with pytest.raises(XapiError) as e:
        XapiSession(Endpoint(pools.urls[0]), "root", "nope", retries=0)
    assert e.value.code == "SESSION_AUTHENTICATION_FAILED"
    assert "nope" not in str(e.value) and PASSWORD not in str(e.value)


def test_unreachable_pool() -> None:
    with pytest.raises(PoolUnreachable) as e:
        XapiSession(Endpoint("http://127.0.0.1:9"), "root", "x", retries=1, backoff=0.01)
    assert "connection refused" in str(e.value)


def test_logic_errors_are_typed_and_not_retried(pools: Pools) -> None:
    s = pools.session(0)
    with pytest.raises(XapiError) as e:
        s.api.VM.get_record("OpaqueRef:00000000-0000-0000-0000-000000000000")
    assert e.value.code == "HANDLE_INVALID"
    assert e.value.params[0] == "VM"


def test_async_call_follows_the_task(pools: Pools) -> None:
    s = pools.session(0)
    vm = s.api.VM.get_by_name_label("vm0")[0]
    snap = s.call_async("VM.snapshot", vm, "xencr async test")
    assert snap.startswith("OpaqueRef:")
    assert s.api.VM.get_is_a_snapshot(snap) is True
    s.api.VM.destroy(snap)


def test_full_then_delta_lands_identical(pools: Pools) -> None:
    src, dst = pools.session(0), pools.session(1)
    vm = src.api.VM.get_by_name_label("vm0")[0]
    disk = _disk_of(src, "vm0")
    snap1 = src.call_async("VM.snapshot", vm, "s1")
    snap1_vdi = _snap_disk(src, snap1)
    size = int(src.api.VDI.get_virtual_size(snap1_vdi))
    target = _new_vdi(dst, size)
    full = copy_vdi(src, snap1_vdi, dst, target)
    assert full.kind == "full"
    assert _hash(dst, target) == _hash(src, snap1_vdi)
    # A guest write, a second snapshot, a delta into a clone of the first copy.
    src.api.sim.write(src.api.VDI.get_uuid(disk), str(3 * MIB + 100), str(5000), "delta-1")
    snap2 = src.call_async("VM.snapshot", vm, "s2")
    snap2_vdi = _snap_disk(src, snap2)
    clone = str(dst.api.VDI.clone(target, {}))
    delta = copy_vdi(src, snap2_vdi, dst, clone, base_vdi=snap1_vdi)
    assert delta.kind == "delta"
    assert delta.blocks == 1, "one 2 MiB block changed"
    assert _hash(dst, clone) == _hash(src, snap2_vdi) != _hash(dst, target)
    assert [b for b, _ in delta.digests] == [1]


def _snap_disk(s: XapiSession, snap: str) -> str:
    for vbd in s.api.VM.get_VBDs(snap):
        if s.api.VBD.get_type(vbd) == "Disk":
            return str(s.api.VBD.get_VDI(vbd))
    raise AssertionError("no disk")
