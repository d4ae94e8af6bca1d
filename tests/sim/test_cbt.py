"""Changed block tracking through the SDK (xapi.md 3.6)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import XenAPI
from simtest import MIB, Sim, export_path, failure, first_vm, http_request, vm_disk

CBT_BLOCK = 64 * 1024


def changed(bitmap_b64: str) -> list[int]:
    data = base64.b64decode(bitmap_b64)
    return [i for i in range(len(data) * 8) if data[i >> 3] & (0x80 >> (i & 7))]


def disk(x: Any) -> str:
    return vm_disk(x, first_vm(x))


def test_enable_cbt_rules(sim: Sim) -> None:
    x = sim.session().xenapi
    vdi = disk(x)
    x.VDI.enable_cbt(vdi)
    x.VDI.enable_cbt(vdi)  # idempotent
    assert x.VDI.get_cbt_enabled(vdi) is True
    snap = x.VDI.snapshot(vdi)
    assert x.VDI.get_cbt_enabled(snap) is True  # inherited
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.enable_cbt(snap)
    assert failure(exc) == ["OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {snap}"]
    sr = x.VDI.get_SR(vdi)
    suspend = x.VDI.create(
        {
            "SR": sr,
            "virtual_size": str(2 * MIB),
            "type": "suspend",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.enable_cbt(suspend)
    assert failure(exc) == ["VDI_INCOMPATIBLE_TYPE", suspend, "suspend"]


def test_list_changed_blocks_and_data_destroy(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    vdi = disk(x)
    x.VDI.enable_cbt(vdi)
    snap1 = x.VDI.snapshot(vdi)
    uuid = x.VDI.get_uuid(vdi)
    x.sim.write(uuid, str(5 * CBT_BLOCK + 10), "100", "cbt-1")
    x.sim.write(uuid, str(40 * CBT_BLOCK - 1), "2", "cbt-2")  # straddles blocks 39 and 40
    snap2 = x.VDI.snapshot(vdi)
    bitmap = x.VDI.list_changed_blocks(snap1, snap2)
    assert len(base64.b64decode(bitmap)) == 8 * MIB // CBT_BLOCK // 8
    assert changed(bitmap) == [5, 39, 40]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.data_destroy(vdi)
    assert failure(exc) == ["OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {vdi}"]
    x.VDI.data_destroy(snap1)
    x.VDI.data_destroy(snap1)  # idempotent
    assert x.VDI.get_type(snap1) == "cbt_metadata"
    assert changed(x.VDI.list_changed_blocks(snap1, snap2)) == [5, 39, 40]  # still usable as vdi_from
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.clone(snap1)
    assert failure(exc) == ["VDI_INCOMPATIBLE_TYPE", snap1, "cbt_metadata"]
    status, _, _ = http_request(sim, "GET", export_path(s, snap1))
    assert status == 500
    plain = x.VDI.snapshot(vm_disk(x, first_vm(x, "vm1")))
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.data_destroy(plain)
    assert failure(exc) == ["VDI_NO_CBT_METADATA", plain]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.list_changed_blocks(plain, snap2)
    assert exc.value.details[0] == "SR_BACKEND_FAILURE_460"


def test_list_changed_blocks_refused_while_attached(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    vdi = vm_disk(x, vm)
    x.VDI.enable_cbt(vdi)
    snap = x.VDI.snapshot(vdi)
    x.VM.start(vm, False, False)
    try:
        with pytest.raises(XenAPI.Failure) as exc:
            x.VDI.list_changed_blocks(snap, vdi)
        assert failure(exc) == ["VDI_IN_USE", vdi, "list_changed_blocks"]
    finally:
        x.VM.hard_shutdown(vm)
