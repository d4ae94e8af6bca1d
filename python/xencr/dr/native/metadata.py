"""Pool metadata replication (`SR.enable_database_replication`): which SRs of a pool receive its
database, turned on and off by XAPI's own calls, whose limits and errors stand as XAPI sends them
(at most 8 SRs: `NO_MORE_REDO_LOGS_ALLOWED`; an SR type without the SR_METADATA capability:
`SR_OPERATION_NOT_SUPPORTED [sr]`; an SR without a plugged PBD: `SR_HAS_NO_PBDS [sr]`).

A metadata VDI is written continuously by xapi's redo log while it is attached to the control
domain: the state shown per SR is whether the pool lists the VDI in `pool.metadata_VDIs` (this pool
replicates there) and whether it is plugged now (being written)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xencr.config import ConfigError
from xencr.xapi.errors import XapiError
from xencr.xapi.session import XapiSession

# SM types with the SR_METADATA capability (xapi.md §5.1): the only ones XAPI accepts.
METADATA_SR_TYPES = frozenset({"lvmoiscsi", "lvmohba"})


@dataclass(frozen=True)
class MetadataSr:
    """One SR of a pool as metadata replication sees it."""

    pool: str  # the pool's name in the configuration
    sr_uuid: str
    sr_name: str
    sr_type: str
    vdi_uuid: str | None  # this pool's metadata VDI on the SR (None: not replicating there)
    written: bool  # the VDI is plugged to a control domain (the redo log writes it)

    @property
    def replicating(self) -> bool:
        return self.vdi_uuid is not None

    def line(self) -> str:
        if self.vdi_uuid is None:
            return f"pool {self.pool}: SR {self.sr_name} ({self.sr_type}): no metadata replication"
        state = "written continuously" if self.written else "NOT being written (VDI not plugged)"
        return f"pool {self.pool}: SR {self.sr_name}: metadata VDI {self.vdi_uuid}, {state}"


def find_sr(t: XapiSession, pool: str, sr: str) -> tuple[str, dict[str, Any]]:
    """(ref, record) of the SR named by UUID or name on ``pool``; one error line otherwise."""
    found = [(str(r), v) for r, v in t.api.SR.get_all_records().items() if sr in (v["uuid"], v["name_label"])]
    if not found:
        raise ConfigError(f"pool {pool}: no SR {sr!r}")
    if len(found) > 1:
        raise ConfigError(f"pool {pool}: {len(found)} SRs are named {sr!r}: give its UUID")
    return found[0]


def _switch(t: XapiSession, pool: str, srs: Sequence[str], on: bool) -> list[str]:
    call, done = ("enable", "enabled") if on else ("disable", "disabled")
    out = []
    for name in srs:
        ref, rec = find_sr(t, pool, name)
        try:
            t.call_once(f"SR.{call}_database_replication", ref)
        except XapiError as err:
            raise err.about(f"pool {pool}: SR {rec['name_label']}") from None
        out.append(f"pool {pool}: metadata replication to SR {rec['name_label']} ({rec['uuid']}) {done}")
    return out


def enable(t: XapiSession, pool: str, srs: Sequence[str]) -> list[str]:
    """Turn on replication to each SR (XAPI's errors propagate, the SR named)."""
    return _switch(t, pool, srs, True)


def disable(t: XapiSession, pool: str, srs: Sequence[str]) -> list[str]:
    """Turn it off (XAPI destroys this pool's metadata VDI on the SR)."""
    return _switch(t, pool, srs, False)


def status(t: XapiSession, pool: str) -> list[MetadataSr]:
    """Every SR that holds this pool's metadata or could (a metadata-capable type), by name."""
    pool_ref = t.api.pool.get_all()[0]
    mine = {str(v) for v in t.api.pool.get_metadata_VDIs(pool_ref)}
    vdis = t.api.VDI.get_all_records()
    vbds = t.api.VBD.get_all_records()
    out = []
    for rec in t.api.SR.get_all_records().values():
        vdi = next((v for v in rec["VDIs"] if v in mine and v in vdis), None)
        if vdi is None and rec["type"] not in METADATA_SR_TYPES:
            continue
        written = vdi is not None and any(
            vbds[b]["currently_attached"] for b in vdis[vdi]["VBDs"] if b in vbds
        )
        out.append(
            MetadataSr(
                pool,
                str(rec["uuid"]),
                str(rec["name_label"]),
                str(rec["type"]),
                str(vdis[vdi]["uuid"]) if vdi else None,
                written,
            )
        )
    return sorted(out, key=lambda m: (m.sr_name, m.sr_uuid))
