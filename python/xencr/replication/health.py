"""The health check of a new restore point (SPEC 8): does it boot?

Rule: the restore point itself is never started. Its clone is: `VM.clone` beside it (or
`VM.copy` onto the job's health-check SR), named by that call after the check's attempt
(`ownership.health_check_name`) and marked right after, its VIFs destroyed before it starts (it
boots with no network: a second copy of a production VM must not answer on its addresses), then
started and waited for (`dr.gates`), then shut down and destroyed with its disks whatever
happened, interrupts included. A check killed midway leaves a clone that the next run removes
(`ownership.remove_health_checks`, called where the run cleans up).

The outcome is the check's, not the run's: a clone that does not boot, or cannot be made or
started, is a failed check of a committed restore point, recorded and reported as such."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from xencr.config import HealthCheckConfig
from xencr.dr import gates
from xencr.replication import metadata as md
from xencr.replication import ownership
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession

log = logging.getLogger("xencr.replication")
NULL = "OpaqueRef:NULL"


@dataclass(frozen=True)
class HealthResult:
    passed: bool
    detail: str  # one line: what was seen (the gate's word, or why the clone never got there)
    seconds: float  # from the start of the clone until the gate was decided (0: never started)

    def line(self) -> str:
        """``passed: guest tools reported after 3.2s`` / ``failed: ...``: what history keeps."""
        took = f" after {self.seconds:.1f}s" if self.seconds > 0 else ""
        return f"{'passed' if self.passed else 'failed'}: {self.detail}{took}"


def check(
    t: XapiSession,
    restore_point: str,
    vm_name: str,
    job_id: str,
    settings: HealthCheckConfig,
    *,
    cancel: threading.Event | None = None,
) -> HealthResult:
    """Check the restore point (its VM UUID on the session's pool) of ``vm_name``; the clone is
    gone when this returns or raises."""
    attempt = ownership.new_attempt(job_id)
    keys: tuple[str, str] | None = None  # the restore point's source VM and SR: the clone's too
    try:
        rp = str(t.api.VM.get_by_uuid(restore_point))
        oc = t.api.VM.get_other_config(rp)
        keys = (oc.get(md.VM, ""), oc.get(md.SR, ""))
        return _boot(t, rp, vm_name, attempt, settings, cancel)
    except (XapiError, PoolUnreachable, OSError) as err:
        # The restore point is committed whatever happens here: the check failed, not the run.
        return HealthResult(False, f"the check itself failed: {err}", 0.0)
    finally:
        try:
            if keys is not None:
                for line in ownership.remove_health_checks(t, job_id, *keys, attempt=attempt):
                    log.debug("health check of %s: removed %s", vm_name, line)
        except (XapiError, PoolUnreachable, OSError) as err:
            log.warning("health check of %s: clone not removed (the next run removes it): %s", vm_name, err)


def _boot(
    t: XapiSession,
    rp: str,
    vm_name: str,
    attempt: str,
    settings: HealthCheckConfig,
    cancel: threading.Event | None,
) -> HealthResult:
    name = ownership.health_check_name(vm_name, attempt)
    if settings.sr is None:
        clone = str(t.call_once("VM.clone", rp, name))
    else:
        sr = _sr(t, settings.sr)
        if sr is None:
            return HealthResult(False, f"no SR {settings.sr!r} on the target pool for the clone", 0.0)
        clone = t.call_async("VM.copy", rp, name, sr)
    _mark(t, clone, attempt)
    for vif in t.api.VM.get_VIFs(clone):
        t.api.VIF.destroy(vif)
    # A clone may keep the restore point's protection (xapi copies blocked_operations).
    for op in md.PROTECTED_OPS:
        t.api.VM.remove_from_blocked_operations(clone, op)
    gates.prepare(t, clone, settings.gate)
    start = time.monotonic()
    try:
        t.call_once("VM.start", clone, False, False)
    except XapiError as err:
        return HealthResult(False, f"the clone did not start: {err}", 0.0)
    result = gates.wait(t, clone, settings.gate, cancel=cancel)
    return HealthResult(result.ok, result.detail, time.monotonic() - start)


def _mark(t: XapiSession, clone: str, attempt: str) -> None:
    """The clone is the check's own from now on (`ownership.remove_health_checks`), and no longer
    looks like a copy of the restore point to a survey."""
    oc = dict(t.api.VM.get_other_config(clone))
    for key in (md.COMPLETE, md.SEAL, md.COPY_OF):
        oc.pop(key, None)
    uuid = str(t.api.VM.get_uuid(clone))
    t.api.VM.set_other_config(
        clone, oc | {md.ROLE: ownership.HEALTH_CHECK_ROLE, md.ATTEMPT: attempt, md.SELF: uuid}
    )
    for vbd in t.api.VM.get_VBDs(clone):
        vdi = str(t.api.VBD.get_VDI(vbd))
        if vdi == NULL or t.api.VBD.get_type(vbd) != "Disk":
            continue
        doc = dict(t.api.VDI.get_other_config(vdi))
        # The job, VM and SR keys too: a copy onto another SR need not carry the disk's.
        marks = {
            **{k: oc[k] for k in (md.JOB, md.VM, md.SR) if k in oc},
            md.ROLE: ownership.HEALTH_CHECK_DISK_ROLE,
            md.ATTEMPT: attempt,
            md.SELF: str(t.api.VDI.get_uuid(vdi)),
        }
        t.api.VDI.set_other_config(vdi, doc | marks)


def _sr(t: XapiSession, sr: str) -> str | None:
    for ref, rec in t.api.SR.get_all_records().items():
        if sr in (rec["uuid"], rec["name_label"]):
            return str(ref)
    return None
