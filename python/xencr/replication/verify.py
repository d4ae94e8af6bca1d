"""`xencr verify`: re-read a restore point's disks and compare each block it was sent with the
digest recorded at transfer; also say whether a disk changed since the commit."""

from __future__ import annotations

from dataclasses import dataclass

from xencr.replication import metadata as md
from xencr.replication.target import NULL
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import changed_blocks, read_digests


@dataclass
class DiskCheck:
    userdevice: str
    blocks: int  # blocks the transfer carried, re-read now
    ok: bool
    detail: str


def verify_replica(t: XapiSession, replica: str) -> list[DiskCheck]:
    out = []
    for vbd in t.api.VM.get_VBDs(replica):
        b = t.api.VBD.get_record(vbd)
        if b["type"] != "Disk" or b["VDI"] == NULL:
            continue
        vdi = str(b["VDI"])
        oc = t.api.VDI.get_other_config(vdi)
        recorded, blocks = oc.get(md.DIGEST), oc.get(md.BLOCKS)
        if recorded is None or blocks is None:
            out.append(DiskCheck(b["userdevice"], 0, False, "no digests were recorded for this disk"))
            continue
        indices = md.parse_ranges(blocks)
        report = read_digests(t, vdi)
        now = dict(report["digests"])
        missing = [i for i in indices if i not in now]
        again = md.digest_of_list(report["digest_algorithm"], [(i, now[i]) for i in indices if i in now])
        ok = not missing and again == recorded
        detail = (
            "every block equals what was sent"
            if ok
            else (
                f"blocks {md.ranges(missing)} are gone"
                if missing
                else "the blocks sent no longer read back the same"
            )
        )
        snaps = [
            x
            for x in t.api.VDI.get_snapshots(vdi)
            if t.api.VDI.get_other_config(x).get(md.ROLE) == "commit-snapshot"
        ]
        if snaps and changed_blocks(t, vdi, str(snaps[0])) > 0:
            ok = False
            detail += "; the disk was written since the commit"
        out.append(DiskCheck(str(b["userdevice"]), len(indices), ok, detail))
    return out
