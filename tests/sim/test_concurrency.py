"""Chains under concurrent use: exports of snapshots while other snapshots are destroyed (and the GC
coalesces), guest writes go on, and new snapshots are taken. Every snapshot keeps its content."""

from __future__ import annotations

import threading
from typing import Any

from simtest import MIB, Sim, export_path, first_vm, http_request, vm_disk


def test_snapshots_exports_and_gc_in_parallel(sim: Sim) -> None:
    s = sim.session()
    x: Any = s.xenapi
    disk = vm_disk(x, first_vm(x))
    uuid = x.VDI.get_uuid(disk)
    sr_uuid = x.SR.get_uuid(x.VDI.get_SR(disk))
    expected: dict[str, str] = {}
    snaps: list[str] = []
    errors: list[BaseException] = []
    exported: dict[str, bytes] = {}

    def export(snap: str) -> None:
        try:
            _, _, exported[snap] = http_request(sim, "GET", export_path(s, snap, "raw"))
        except BaseException as err:
            errors.append(err)

    def writer(round_: int) -> None:
        try:
            y = sim.session().xenapi
            for k in range(4):
                y.sim.write(uuid, str((k * 2 + round_ % 2) * MIB), str(MIB // 2), f"w{round_}.{k}")
        except BaseException as err:
            errors.append(err)

    for round_ in range(5):
        snap = x.VDI.snapshot(disk)
        snaps.append(snap)
        expected[snap] = x.sim.hash(x.VDI.get_uuid(snap))
        threads = [
            threading.Thread(target=export, args=(snap,)),
            threading.Thread(target=writer, args=(round_,)),
        ]
        if len(snaps) > 2:
            old = snaps.pop(0)
            expected.pop(old)
            threads.append(threading.Thread(target=x.VDI.destroy, args=(old,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
    x.sim.gc(sr_uuid)
    for snap, digest in expected.items():
        assert x.sim.hash(x.VDI.get_uuid(snap)) == digest
    import hashlib

    for snap, body in exported.items():
        if snap in expected:
            assert hashlib.sha256(body).hexdigest() == expected[snap]
    # the chain stays short: the base copies of destroyed snapshots were coalesced away
    chain_bases = [
        v
        for v in x.SR.get_VDIs(x.VDI.get_SR(disk))
        if not x.VDI.get_managed(v) and x.VDI.get_name_label(v) == "base copy"
    ]
    assert len(chain_bases) == len(expected)  # one base copy per surviving snapshot
