"""CBT write logs as sm keeps them: exact 64 KiB bitmaps for guest writes (identical rewrites
included), logs chained through snapshots, kept across restarts, data_destroy, and every
operation that breaks or keeps a chain (xapi.md 3.6; FIDELITY.md)."""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import XenAPI
from simtest import MIB, Sim, export_path, failure, first_vm, http_request, import_path, put_stream, vm_disk

from xencr.sim.api.vdi import snapshot_vdi
from xencr.sim.dispatch import Ctx
from xencr.sim.guest import pattern_bytes
from xencr.sim.layout import init_state
from xencr.sim.pool_state import PoolState

BLOCK = 64 * 1024
DISK = 16 * MIB


@pytest.fixture(scope="module")
def csim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    state = tmp_path_factory.mktemp("cbtsim")
    init_state(state, 1, vms=3, disk_size=DISK, sr_size=1024 * MIB, password="s3cret-pw")
    s = Sim(state)
    s.start()
    yield s
    s.shutdown()


def changed(bitmap_b64: str) -> list[int]:
    data = base64.b64decode(bitmap_b64)
    return [i for i in range(len(data) * 8) if data[i >> 3] & (0x80 >> (i & 7))]


def blocks(offset: int, length: int) -> set[int]:
    return set(range(offset // BLOCK, (offset + length - 1) // BLOCK + 1))


def fresh_disk(x: Any, name: str = "cbt disk") -> str:
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    return str(
        x.VDI.create(
            {
                "SR": sr,
                "virtual_size": str(DISK),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
                "name_label": name,
            }
        )
    )


def sr_failure(exc: pytest.ExceptionInfo[Any]) -> tuple[str, str]:
    code, _, description, _ = failure(exc)
    return code, description


UNRELATED = "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are unrelated]"


def test_identical_rewrites_are_reported(csim: Sim) -> None:
    x = csim.session().xenapi
    vdi = fresh_disk(x)
    uuid = x.VDI.get_uuid(vdi)
    x.sim.write(uuid, str(3 * BLOCK), str(2 * BLOCK), "seed")
    x.VDI.enable_cbt(vdi)
    snap1 = x.VDI.snapshot(vdi)
    x.sim.write(uuid, str(3 * BLOCK), str(2 * BLOCK), "seed")  # the same bytes again
    x.sim.write(uuid, str(100 * BLOCK - 1), "2", "edge")  # straddles blocks 99 and 100
    x.sim.write(uuid, str(200 * BLOCK + 512), "512", "x")
    snap2 = x.VDI.snapshot(vdi)
    bitmap = x.VDI.list_changed_blocks(snap1, snap2)
    assert len(base64.b64decode(bitmap)) == DISK // BLOCK // 8
    assert changed(bitmap) == [3, 4, 99, 100, 200]
    assert x.sim.hash(x.VDI.get_uuid(snap1)) != x.sim.hash(x.VDI.get_uuid(snap2))
    # the live VDI's own log: nothing since snap2, then one write
    assert changed(x.VDI.list_changed_blocks(snap2, vdi)) == []
    x.sim.write(uuid, str(7 * BLOCK), "1", "live")
    assert changed(x.VDI.list_changed_blocks(snap2, vdi)) == [7]
    assert changed(x.VDI.list_changed_blocks(snap1, vdi)) == [3, 4, 7, 99, 100, 200]


def test_guest_writes_are_logged_exactly(csim: Sim) -> None:
    x = csim.session().xenapi
    vm = first_vm(x, "vm2")
    vdi = vm_disk(x, vm)
    x.VDI.enable_cbt(vdi)
    snap1 = x.VDI.snapshot(vdi)
    # so slow that the background ticks add nothing: the writes are the explicit tick's
    x.VM.add_to_other_config(vm, "sim_writes_per_minute", "0.001")
    x.VM.start(vm, False, False)
    try:
        done = int(x.sim.guest_tick("300000"))
        snap2 = x.VDI.snapshot(vdi)
    finally:
        x.VM.hard_shutdown(vm)
        x.VM.remove_from_other_config(vm, "sim_writes_per_minute")
    # activity.py's writes: 64 KiB at a seeded 512-aligned offset each
    vm_uuid = x.VM.get_uuid(vm)
    expected: set[int] = set()
    for n in range(done):
        offset = random.Random(f"{vm_uuid}/{n}").randrange(0, DISK - BLOCK) & ~511
        expected |= blocks(offset, BLOCK)
    assert done >= 4 and changed(x.VDI.list_changed_blocks(snap1, snap2)) == sorted(expected)


def test_logs_survive_a_restart(csim: Sim) -> None:
    x = csim.session().xenapi
    vdi = fresh_disk(x)
    x.VDI.enable_cbt(vdi)
    snap1 = x.VDI.snapshot(vdi)
    x.sim.write(x.VDI.get_uuid(vdi), str(9 * BLOCK), str(BLOCK), "r")
    snap2 = x.VDI.snapshot(vdi)
    before = x.VDI.list_changed_blocks(snap1, snap2)
    csim.restart()
    x = csim.session().xenapi
    assert x.VDI.list_changed_blocks(snap1, snap2) == before
    assert changed(before) == [9]


def test_imports_are_logged(csim: Sim) -> None:
    s = csim.session()
    x = s.xenapi
    source = fresh_disk(x, "source")
    target = fresh_disk(x, "target")
    x.VDI.enable_cbt(target)
    snap1 = x.VDI.snapshot(target)
    x.sim.write(x.VDI.get_uuid(source), str(5 * MIB + 7), "100", "imp")
    status, _, stream = http_request(csim, "GET", export_path(s, source, "vhd"))
    assert status == 200
    status, _ = put_stream(csim, import_path(s, target, "vhd"), stream)
    assert status == 200
    raw = pattern_bytes("raw", 0, BLOCK)
    put_stream(csim, import_path(s, target, "raw"), raw)  # from offset 0
    snap2 = x.VDI.snapshot(target)
    # a VHD import is logged by the 2 MiB blocks it carries (the engine reports no finer extent)
    assert changed(x.VDI.list_changed_blocks(snap1, snap2)) == [0, *range(64, 96)]


def test_data_destroy_waits_for_the_snapshot_vm(csim: Sim) -> None:
    x = csim.session().xenapi
    pool = x.pool.get_all()[0]
    x.pool.add_to_other_config(pool, "sim_delay_scale", "0.01")
    vm = first_vm(x, "vm1")
    vdi = vm_disk(x, vm)
    x.VDI.enable_cbt(vdi)
    snapshot_vm = x.VM.snapshot(vm, "cbt base")
    snap = vm_disk(x, snapshot_vm)
    assert x.VDI.get_cbt_enabled(snap) is True
    try:
        with pytest.raises(XenAPI.Failure) as exc:
            x.VDI.data_destroy(snap)  # the snapshot VM still has a VBD on it
        assert failure(exc) == ["VDI_IN_USE", snap, "data_destroy"]
        assert x.VDI.get_type(snap) == "user"
        x.VM.destroy(snapshot_vm)  # what Xen Orchestra does first
        x.VDI.data_destroy(snap)
    finally:
        x.pool.remove_from_other_config(pool, "sim_delay_scale")
    assert x.VDI.get_type(snap) == "cbt_metadata"
    assert int(x.VDI.get_physical_utilisation(snap)) == 0  # the data is gone, the record stays
    x.sim.write(x.VDI.get_uuid(vdi), str(BLOCK), "1", "after")
    later = x.VDI.snapshot(vdi)
    assert changed(x.VDI.list_changed_blocks(snap, later)) == [1]
    for call in (x.VDI.snapshot, x.VDI.clone, x.VDI.get_nbd_info):
        with pytest.raises(XenAPI.Failure) as exc:
            call(snap)
        assert failure(exc) == ["VDI_INCOMPATIBLE_TYPE", snap, "cbt_metadata"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.enable_cbt(snap)
    assert failure(exc) == ["VDI_INCOMPATIBLE_TYPE", snap, "cbt_metadata"]
    sr = x.SR.get_uuid(x.VDI.get_SR(vdi))
    x.sim.gc(sr)  # the base copy is left with the live VDI and `later`: nothing to coalesce
    assert x.sim.hash(x.VDI.get_uuid(vdi)) == x.sim.hash(x.VDI.get_uuid(later))


def test_chain_breakers_and_keepers(csim: Sim) -> None:
    x = csim.session().xenapi
    vdi = fresh_disk(x)
    uuid = x.VDI.get_uuid(vdi)
    x.VDI.enable_cbt(vdi)
    s1 = x.VDI.snapshot(vdi)
    x.sim.write(uuid, str(2 * BLOCK), "1", "a")
    s2 = x.VDI.snapshot(vdi)
    x.sim.write(uuid, str(6 * BLOCK), "1", "b")
    s3 = x.VDI.snapshot(vdi)
    # same VDI twice, reversed order, a VDI without a log
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.list_changed_blocks(s2, s2)
    assert sr_failure(exc) == (
        "SR_BACKEND_FAILURE_460",
        "Failed to calculate changed blocks for given VDIs. [opterr=Source and target VDI are same]",
    )
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.list_changed_blocks(s3, s1)
    assert sr_failure(exc) == ("SR_BACKEND_FAILURE_460", UNRELATED)
    # deleting a middle snapshot keeps the chain: its blocks pass to the next log
    x.VDI.destroy(s2)
    assert changed(x.VDI.list_changed_blocks(s1, s3)) == [2, 6]
    # a resize keeps CBT (sm resize_cbt): the bitmap grows
    x.VDI.resize(vdi, str(DISK + 2 * MIB))
    x.sim.write(uuid, str(DISK + BLOCK), "1", "c")
    s4 = x.VDI.snapshot(vdi)
    bitmap = x.VDI.list_changed_blocks(s3, s4)
    assert len(base64.b64decode(bitmap)) == (DISK + 2 * MIB) // BLOCK // 8
    assert changed(bitmap) == [DISK // BLOCK + 1]
    assert changed(x.VDI.list_changed_blocks(s1, s4)) == [2, 6, DISK // BLOCK + 1]
    # clones and copies start without CBT
    clone = x.VDI.clone(s4)
    copy = x.VDI.copy(vdi, x.VDI.get_SR(vdi))
    assert x.VDI.get_cbt_enabled(clone) is False and x.VDI.get_cbt_enabled(copy) is False
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.list_changed_blocks(s4, clone)
    assert sr_failure(exc) == ("SR_BACKEND_FAILURE_460", UNRELATED)
    plain = x.VDI.snapshot(copy)  # a snapshot of a VDI without CBT has none
    assert x.VDI.get_cbt_enabled(plain) is False
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.data_destroy(plain)
    assert failure(exc) == ["VDI_NO_CBT_METADATA", plain]
    # a user disabling CBT (then enabling it again) breaks the chain for good
    x.VDI.disable_cbt(vdi)
    x.VDI.disable_cbt(vdi)  # idempotent
    assert x.VDI.get_cbt_enabled(vdi) is False
    x.VDI.enable_cbt(vdi)
    s5 = x.VDI.snapshot(vdi)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.list_changed_blocks(s4, s5)
    assert sr_failure(exc) == ("SR_BACKEND_FAILURE_460", UNRELATED)
    # a log found inconsistent (tapdisk died with it open): sm disables CBT
    x.sim.write(uuid, str(3 * BLOCK), "1", "d")
    s6 = x.VDI.snapshot(vdi)
    assert changed(x.VDI.list_changed_blocks(s5, s6)) == [3]
    x.sim.fault_cbt_inconsistent(uuid)
    assert x.VDI.get_cbt_enabled(vdi) is False
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.list_changed_blocks(s6, vdi)
    assert sr_failure(exc) == ("SR_BACKEND_FAILURE_460", UNRELATED)
    for v in (s1, s3, s4, s5, s6, clone, copy, plain):
        x.VDI.destroy(v)


def test_snapshot_crash_recovery_keeps_the_log(tmp_path: Path) -> None:
    """A snapshot whose database record was never saved is undone with its CBT log step."""
    root = tmp_path / "state"
    init_state(root, 1, vms=1, disk_size=4 * MIB, password="pw")
    pool = PoolState(root, 0, "pw")
    with pool.db.lock:
        vdi = next(r for r, v in pool.db.items("VDI") if v["name_label"] == "vm0 disk 0")
        directory = pool.storage.sr_dir(pool.db.get("VDI", vdi)["SR"])
        uuid = pool.db.get("VDI", vdi)["uuid"]
        pool.storage.cbt.enable(directory, uuid, 4 * MIB)
        pool.db.update("VDI", vdi, cbt_enabled=True)
        pool.save()
        pool.storage.write(vdi, 2 * BLOCK, b"x")
        snapshot_vdi(Ctx(pool, None, "VDI.snapshot"), vdi)  # never saved: the process dies here
    again = PoolState(root, 0, "pw")  # recovery at start
    with again.db.lock:
        assert again.storage.cbt.has_log(directory, uuid)
        assert [p.name for p in directory.glob("*.cbtlog")] == [f"{uuid}.cbtlog"]
        # the write made before the lost snapshot is still recorded in the VDI's own log
        bitmap = (directory / f"{uuid}.cbtlog").read_bytes()[512:]
        assert bitmap[0] == 0x20
