"""What xencr may destroy, and what it must leave alone: the one rule that every clean-up path
uses (runs, seed imports, retention, and DR test clean-up).

xencr destroys an object only when

(a) **it created it for an attempt that never committed.** Every object an attempt creates
    carries that attempt's id (`xencr:attempt`) from the call that creates it: in the record given
    to `VM.create`/`VDI.create`, through a marker on the base that a `VDI.clone` copies
    (`xencr:cloning`), and in the name of the source snapshot (`... #<attempt>`), written before the
    call. An attempt has committed when a replica VM carrying its id is marked complete. The object
    must also be the one xencr made, not a copy of it (`xencr:self`, written right after creation,
    is absent or its own UUID; a snapshot of one of the attempt's disks cut before the commit
    marked it is the attempt's too), and be unused: a VM halted and never started, a VDI attached to no
    VM but that attempt's replica. One such attempt is kept instead while the state database
    records it as resumable (`resume`: a transfer cut by a kill, a timeout or a dropped link):
    its replica and disks are set aside for the next try, which resumes them or, when anything
    it was made of changed, destroys them by this same rule (``keep`` of `survey`); or

(b) **it is a complete restore point that retention expires and that is still exactly as xencr
    left it**: its seal (`xencr:seal`, written by the commit over its UUID, name, description, tags,
    blocked operations and disks) still matches, it is halted and was never started
    (`VM_metrics.start_time`), it has no VM snapshots, its disks are its own (their `xencr:self`)
    and attached to nothing else, and they were not written since the commit. Retention marks it
    `xencr:expiring` before the first destroy, so an expiry cut short is finished by the next run.
    On the source, the same holds for this job's snapshots that the next deltas do not need: never
    one whose disks another VM uses; their disks are marked expiring before the snapshot goes.

On the source, with ``purge_snapshot_data``, the *data* of this job's kept snapshots is
    destroyed once every target has its restore point (`VDI.data_destroy`: the snapshot and its
    CBT log stay), never of a disk another VM uses (`purge_snapshot_data`).

(c) **it is a disposable object a health check or a test failover made for itself** and nothing
    else uses: a clone of a restore point named, in the very call that creates it, with the check's
    or test's attempt (`health_check_name`, `dr_test_name`), then marked with its role; its disks
    (the clone's own, attached to no other VM); a test's isolated network. These may be shut down
    first, since they are the check's or test's own; the check or test destroys them when it ends,
    and the next run (health checks) or the next test or `xencr failover --cleanup` (tests)
    destroys what a kill left (`remove_health_checks`, `dr_test_objects`). A native DR test
    (`xencr dr recover --test`) recovers VMs with their own UUIDs, which carry no key: what it may
    destroy is what its recorded attempt proves it made, and only in test mode: a VM, vApp or
    SR whose UUID the attempt recorded as absent from the pool before it changed anything, that
    it set out to recover (VMs, vApps) or that its DR task introduced (SRs, forgotten, never
    their disks), and its isolated network (`native_test_objects`).

Everything else that carries xencr's keys is **detached** (a replica a failover recovered says
"failed over by plan X"): a replica started, unprotected, renamed,
re-described, re-tagged or snapshotted by someone; a clone or copy of a replica or of its disks
(`VM.clone`, `VM.copy`, `VDI.clone`, `VDI.copy`, in any tool); a replica disk attached to another VM.
A detached object leaves the job's restore-point set (never counted by retention, never a base),
is never shut down or destroyed, is marked once (`xencr:detached = <time> <why>`), and is reported
by runs, `replica list`, `status`, `history` and the `xencr_detached_objects` metric, so that the
administrator decides. A destroy that XAPI refuses (`VDI_IN_USE`, `OPERATION_NOT_ALLOWED`, ...)
means the object is in use: it is detached, not counted as cleaned, and not retried.

Restore points made before seals existed (complete, no `xencr:self`, no seal) are adopted (sealed)
when they pass every other test of (b); otherwise they are detached like the rest."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from xencr.replication import metadata as md
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession
from xencr.xapi.transfer import changed_blocks

log = logging.getLogger("xencr.replication")
NULL = "OpaqueRef:NULL"
EPOCH_PREFIXES = ("19700101", "1970-01-01")


def new_attempt(job_id: str) -> str:
    """An attempt id: the job's id prefix (so a leftover names its job) and 12 random hex digits."""
    return f"{job_id[:8]}-{secrets.token_hex(6)}"


def snapshot_name(job_name: str, vm_name: str, attempt: str) -> str:
    """The source snapshot's name: it carries the attempt before any key can be written on it."""
    return f"[xencr {job_name}] {vm_name} #{attempt}"


_SNAPSHOT_ATTEMPT = re.compile(r"^\[xencr .*\] .* #([0-9a-f]{8}-[0-9a-f]{12})$")


def attempt_of_snapshot_name(name: str) -> str | None:
    m = _SNAPSHOT_ATTEMPT.match(name)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------- seals


def seal_of(rec: dict[str, Any], disks: dict[str, str]) -> str:
    """What "exactly as xencr left it" means for a replica VM: its UUID (a clone has another),
    name, description, tags, blocked operations and its disks (user device -> VDI UUID)."""
    parts = [
        rec["uuid"],
        rec["name_label"],
        rec["name_description"],
        "\x1f".join(sorted(rec.get("tags", []))),
        "\x1f".join(sorted(rec["blocked_operations"])),
        "\x1f".join(f"{k}={v}" for k, v in sorted(disks.items())),
    ]
    return "v1:" + hashlib.sha256("\x1e".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Detached:
    """An object carrying xencr's keys that xencr leaves alone from now on."""

    kind: str  # "VM", "snapshot" or "VDI"
    uuid: str
    name: str
    why: str  # a short reason: "started", "unprotected", "a copy of <uuid>", ...
    since: str = ""  # when it was first marked (empty: marked by this survey)

    def line(self) -> str:
        return f"{self.kind} {self.uuid} {self.name!r}: {self.why} (left alone)"


@dataclass
class RestorePoint:
    """A complete, intact restore point: a replica VM, its disks and their commit snapshots (the
    immutable copies the next delta is cloned from)."""

    ref: str
    uuid: str
    name: str
    snapshot_time: str
    copy_of: str  # source snapshot VM UUID
    record: dict[str, Any]
    # userdevice -> (live VDI ref, commit snapshot VDI ref or None, source snapshot VDI UUID)
    disks: dict[str, tuple[str, str | None, str]] = field(default_factory=dict)
    # Laid out by Xen Orchestra (classic keys): no commit snapshots, its live disks are the base.
    xo: bool = False

    @property
    def protected(self) -> bool:
        blocked = self.record["blocked_operations"]
        return all(op in blocked for op in md.PROTECTED_OPS)


@dataclass(frozen=True)
class Incomplete:
    """An uncommitted attempt's replica set aside for a resume: exactly as its attempt left it
    (unused, never started, snapshotted or copied; its disks attached to it alone)."""

    attempt: str
    vm: str  # the replica VM's ref
    uuid: str
    disks: dict[str, tuple[str, str]]  # userdevice -> (VDI ref, VDI uuid)


@dataclass
class Survey:
    """One job's objects for one source VM on one target SR, each with its verdict."""

    points: list[RestorePoint] = field(default_factory=list)  # intact restore points, oldest first
    expiring: list[RestorePoint] = field(default_factory=list)  # an expiry cut short: finish it
    detached: list[Detached] = field(default_factory=list)
    # Never-committed attempts' objects (and the disks of a finished expiry): `clean` destroys them.
    garbage_vms: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    garbage_vdis: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # other_config values to write, by (class, ref): detached marks, seals of adopted restore
    # points, cloning markers that outlived their attempt removed.
    marks: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    # The newest replica xencr made that is detached now (snapshot time, short why): why the next
    # run cannot continue it, when it is newer than every restore point.
    newest_detached: tuple[str, str] | None = None
    # The attempt `survey`'s ``keep`` named, set aside (not garbage), or why it cannot be.
    kept: Incomplete | None = None
    kept_problem: str | None = None

    def mark(self, cls: str, ref: str, oc: dict[str, str], **changes: str) -> None:
        current = self.marks.get((cls, ref), dict(oc))
        current.pop(md.CLONING, None)  # whatever we write, a marker that outlived its attempt goes
        current.update(changes)
        self.marks[(cls, ref)] = current


class _Pool:
    """The records one survey needs, read once."""

    def __init__(self, t: XapiSession) -> None:
        self.vms = {str(k): v for k, v in t.api.VM.get_all_records().items()}
        self.vdis = {str(k): v for k, v in t.api.VDI.get_all_records().items()}
        self.vbds = {str(k): v for k, v in t.api.VBD.get_all_records().items()}
        dom0 = {k for k, v in self.vms.items() if v["is_control_domain"]}
        self.users: dict[str, set[str]] = {}  # VDI ref -> VM refs with a VBD on it
        for b in self.vbds.values():
            # XAPI plugs a disk into the control domain for its own exports and imports: an
            # operation in flight, not a user (`settle` waits for it to end before a destroy).
            if str(b["VDI"]) != NULL and str(b["VM"]) not in dom0:
                self.users.setdefault(str(b["VDI"]), set()).add(str(b["VM"]))
        self._t = t

    def started(self, vm_rec: dict[str, Any]) -> bool:
        """Running, paused or suspended now, or started at some point (VM_metrics.start_time)."""
        if vm_rec["power_state"] != "Halted":
            return True
        metrics = str(vm_rec.get("metrics", NULL))
        if metrics == NULL:
            return False
        try:
            when = str(self._t.api.VM_metrics.get_start_time(metrics))
        except XapiError:
            return False
        return not when.startswith(EPOCH_PREFIXES)

    def disks_of(self, vm: str) -> dict[str, str]:
        """user device -> VDI ref of a VM's disk VBDs."""
        out = {}
        for ref in self.vms[vm]["VBDs"]:
            b = self.vbds.get(str(ref))
            if b is not None and b["type"] == "Disk" and str(b["VDI"]) != NULL:
                out[str(b["userdevice"])] = str(b["VDI"])
        return out

    def commit_snapshot(self, vdi: str) -> str | None:
        for s in self.vdis[vdi]["snapshots"]:
            r = self.vdis.get(str(s))
            if (
                r is not None
                and r["other_config"].get(md.ROLE) == "commit-snapshot"
                and _is_copy(r) is None
                and md.DETACHED not in r["other_config"]
            ):
                return str(s)
        return None


def _is_copy(rec: dict[str, Any]) -> str | None:
    """The UUID of the object this one is a copy of, when its `xencr:self` is another's."""
    me = rec["other_config"].get(md.SELF)
    return me if me is not None and me != rec["uuid"] else None


def survey(t: XapiSession, job_id: str, vm_uuid: str, sr_uuid: str, keep: str | None = None) -> Survey:
    """Classify every object of this job, source VM and target SR (see the module's rule);
    the uncommitted attempt ``keep`` is set aside (`Survey.kept`) when it would be garbage.
    Changes nothing: `clean` acts on the verdicts."""
    p = _Pool(t)
    out = Survey()
    sr = str(t.api.SR.get_by_uuid(sr_uuid))

    def ours(oc: dict[str, str]) -> bool:
        return oc.get(md.JOB) == job_id and oc.get(md.VM) == vm_uuid

    vms = {
        ref: r
        for ref, r in p.vms.items()
        if ours(r["other_config"])
        and r["other_config"].get(md.SR) == sr_uuid
        and r["other_config"].get(md.ROLE) == "replica"
    }
    vdis = {
        ref: r
        for ref, r in p.vdis.items()
        if r["managed"]
        and ours(r["other_config"])
        and r["other_config"].get(md.ROLE) in ("replica-disk", "commit-snapshot")
        and (r["other_config"].get(md.SR) == sr_uuid or str(r["SR"]) == sr)
    }
    committed = {
        r["other_config"].get(md.ATTEMPT)
        for r in vms.values()
        if r["other_config"].get(md.COMPLETE) == "true" and not r["is_a_snapshot"]
    }
    seen_vdis: set[str] = set()

    def detach(kind: str, ref: str, rec: dict[str, Any], why: str) -> None:
        oc = rec["other_config"]
        if md.DETACHED in oc:
            when, _, said = oc[md.DETACHED].partition(" ")
            out.detached.append(Detached(kind, rec["uuid"], rec["name_label"], said, when))
            return
        out.detached.append(Detached(kind, rec["uuid"], rec["name_label"], why))
        stamp = md.precise(datetime.now(UTC))
        out.mark("VDI" if kind == "VDI" else "VM", ref, oc, **{md.DETACHED: f"{stamp} {why}"})

    # --- replica VMs, oldest first
    garbage_vms: set[str] = set()
    for ref, rec in sorted(vms.items(), key=lambda x: x[1]["other_config"].get(md.SNAPSHOT_TIME, "")):
        oc = rec["other_config"]
        kind = "snapshot" if rec["is_a_snapshot"] else "VM"
        if md.DETACHED in oc:
            detach(kind, ref, rec, "")
            if not rec["is_a_snapshot"] and oc.get(md.COMPLETE) == "true" and _is_copy(rec) is None:
                out.newest_detached = (oc.get(md.SNAPSHOT_TIME, ""), out.detached[-1].why)
            continue
        if rec["is_a_snapshot"]:
            detach(kind, ref, rec, "a snapshot of a replica")
            continue
        copy = _is_copy(rec)
        if oc.get(md.COMPLETE) != "true":
            why = _attempt_vm_unusable(p, rec, copy)
            kept = keep is not None and oc.get(md.ATTEMPT) == keep
            if why is None and kept and out.kept is None:
                out.kept = Incomplete(str(keep), ref, rec["uuid"], {})
            elif why is None:
                out.garbage_vms.append((ref, rec))
                garbage_vms.add(ref)
            else:
                if kept:
                    out.kept_problem = f"its replica {rec['uuid']} was {why}"
                detach(kind, ref, rec, why)
            continue
        why = _point_problem(p, ref, rec, copy)
        if why is not None:
            detach(kind, ref, rec, why)
            if copy is None:
                out.newest_detached = (oc.get(md.SNAPSHOT_TIME, ""), why)
            continue
        point = RestorePoint(
            ref, rec["uuid"], rec["name_label"], oc.get(md.SNAPSHOT_TIME, ""), oc.get(md.COPY_OF, ""), rec
        )
        for dev, vdi in p.disks_of(ref).items():
            commit = p.commit_snapshot(vdi)
            point.disks[dev] = (vdi, commit, p.vdis[vdi]["other_config"].get(md.COPY_OF, ""))
            seen_vdis.update(v for v in (vdi, commit) if v is not None)
        if md.SEAL not in oc:
            # Made before seals existed and intact by every other test: adopt it.
            _adopt(p, out, ref, rec)
        (out.expiring if md.EXPIRING in oc else out.points).append(point)

    # --- their disks, parents before snapshots
    garbage_vdis: set[str] = set()
    kept_vdis: set[str] = set()  # the kept attempt's own disks (resumed, not destroyed)
    for ref, rec in sorted(vdis.items(), key=lambda x: bool(x[1]["is_a_snapshot"])):
        oc = rec["other_config"]
        if ref in seen_vdis:
            if md.CLONING in oc:  # a base whose clone marker outlived its attempt
                out.mark("VDI", ref, oc)
            continue
        if md.DETACHED in oc:
            detach("VDI", ref, rec, "")
            continue
        cloned = md.CLONING in oc and not rec["is_a_snapshot"]  # a clone of a base, made by an attempt
        attempt = oc.get(md.CLONING) if cloned else oc.get(md.ATTEMPT)
        copy = _is_copy(rec)
        # A snapshot the commit was taking of one of the attempt's own disks carries its self
        # (cut before it was marked): the attempt's, whether its disk goes or is kept to resume.
        snap_of_garbage = rec["is_a_snapshot"] and str(rec["snapshot_of"]) in garbage_vdis | kept_vdis
        users = p.users.get(ref, set())
        if (
            out.kept is not None
            and attempt == out.kept.attempt
            and not rec["is_a_snapshot"]
            and copy is None
            and users <= {out.kept.vm}
        ):
            kept_vdis.add(ref)
            continue  # the kept replica's disk (`kept_disks` below)
        if (
            attempt is not None
            and attempt not in committed
            and (cloned or copy is None or snap_of_garbage)
            and users <= garbage_vms
        ):
            out.garbage_vdis.append((ref, rec))
            garbage_vdis.add(ref)
            continue
        if md.EXPIRING in oc and copy is None and not users:
            # Retention had begun destroying its restore point (the VM is gone): finish it.
            out.garbage_vdis.append((ref, rec))
            garbage_vdis.add(ref)
            continue
        others = sorted(users - garbage_vms)
        if any(u in vms for u in others):
            why = f"a disk of detached replica {p.vms[others[0]]['uuid']}"
        elif others:
            why = f"attached to VM {p.vms[others[0]]['name_label']!r}" if others[0] in p.vms else "attached"
        elif copy is not None:
            why = f"a copy of {copy}"
        else:
            why = "not part of an intact restore point"
        detach("VDI", ref, rec, why)
    if out.kept is not None:
        disks = {
            dev: (vdi, p.vdis[vdi]["uuid"])
            for dev, vdi in p.disks_of(out.kept.vm).items()
            if vdi in p.vdis
            and p.vdis[vdi]["other_config"].get(md.ATTEMPT, p.vdis[vdi]["other_config"].get(md.CLONING))
            == out.kept.attempt
            and p.users.get(vdi, set()) <= {out.kept.vm}
        }
        out.kept = Incomplete(out.kept.attempt, out.kept.vm, out.kept.uuid, disks)
    return out


def _attempt_vm_unusable(p: _Pool, rec: dict[str, Any], copy: str | None) -> str | None:
    """Why an incomplete replica is not its attempt's to destroy (None: it is)."""
    if copy is not None:
        return f"a copy of {copy}"
    if p.started(rec):
        return "started"
    if rec["snapshots"]:
        return "snapshotted"
    return None


def _point_problem(p: _Pool, ref: str, rec: dict[str, Any], copy: str | None) -> str | None:
    """Why a complete replica is not an intact restore point (None: it is)."""
    oc = rec["other_config"]
    if copy is not None:
        return f"a copy of {copy}"
    if oc.get(FAILED_OVER):  # "<time> <plan>", written by a failover before it unprotects it
        return f"failed over by plan {oc[FAILED_OVER].partition(' ')[2]}"
    if p.started(rec):
        return "started"
    if not all(op in rec["blocked_operations"] for op in md.PROTECTED_OPS):
        return "unprotected"
    if rec["snapshots"]:
        return "snapshotted"
    disks = p.disks_of(ref)
    for dev, vdi in disks.items():
        v = p.vdis.get(vdi)
        if v is None or v["other_config"].get(md.ROLE) != "replica-disk":
            return f"disk {dev} replaced"
        if _is_copy(v) is not None:
            return f"disk {dev} replaced by a copy"
        if p.users.get(vdi, set()) - {ref}:
            return f"disk {dev} attached to another VM"
    sealed = oc.get(md.SEAL)
    if sealed is None:
        return None if md.SELF not in oc else "seal missing"
    if sealed != seal_of(rec, {d: p.vdis[v]["uuid"] for d, v in disks.items()}):
        return "changed (name, description, tags or disks)"
    return None


def _adopt(p: _Pool, out: Survey, ref: str, rec: dict[str, Any]) -> None:
    """Seal a restore point made before seals existed, and name its disks their own."""
    disks = p.disks_of(ref)
    for vdi in disks.values():
        out.mark("VDI", vdi, p.vdis[vdi]["other_config"], **{md.SELF: p.vdis[vdi]["uuid"]})
        commit = p.commit_snapshot(vdi)
        if commit is not None:
            out.mark("VDI", commit, p.vdis[commit]["other_config"], **{md.SELF: p.vdis[commit]["uuid"]})
    seal = seal_of(rec, {d: p.vdis[v]["uuid"] for d, v in disks.items()})
    out.mark("VM", ref, rec["other_config"], **{md.SELF: rec["uuid"], md.SEAL: seal})


# ----------------------------------------------------------------------------------- actions


@dataclass
class Cleaned:
    """What one clean-up did: lines for objects destroyed, and the detached objects found."""

    removed: list[str] = field(default_factory=list)
    detached: list[Detached] = field(default_factory=list)
    # Why the VM is not replicated here for now: its newest replica was failed over (it runs from
    # it on this target) and no restore point is newer. None: replicate as usual.
    failed_over: str | None = None
    kept: Incomplete | None = None  # the attempt set aside for a resume (`survey`'s ``keep``)
    kept_problem: str | None = None  # why the attempt to keep could not be


def clean(t: XapiSession, s: Survey) -> Cleaned:
    """Write the survey's marks, destroy the never-committed attempts' objects and finish cut-short
    expiries. A destroy XAPI refuses leaves the object detached (in use), reported, not retried."""
    out = Cleaned(detached=list(s.detached), kept=s.kept, kept_problem=s.kept_problem)
    taken = s.newest_detached
    newest = s.points[-1].snapshot_time if s.points else ""
    if taken is not None and taken[1].startswith("failed over") and taken[0] > newest:
        out.failed_over = taken[1]
    for (cls, ref), oc in s.marks.items():
        try:
            t.call(f"{cls}.set_other_config", ref, oc)
        except XapiError as e:
            log.warning("%s %s: mark not written: %s", cls, ref, e)
    for rp in s.expiring:
        gone = expire(t, rp)
        if gone is None:
            out.removed.append(f"expired restore point {rp.uuid} (its expiry had been cut short)")
        else:
            out.detached.append(gone)
    for ref, rec in s.garbage_vms:
        err = destroy(t, "VM", ref)
        if err is None:
            out.removed.append(f"incomplete replica {rec['uuid']} of an interrupted attempt")
        else:
            out.detached.append(_refused(t, "VM", ref, rec, err))
    settle(t, [ref for ref, _ in s.garbage_vdis])
    for ref, rec in reversed(s.garbage_vdis):  # snapshots before their parents
        err = destroy(t, "VDI", ref)
        if err is None:
            what = "disk of an expired restore point" if md.EXPIRING in rec["other_config"] else "disk"
            out.removed.append(f"{what} {rec['uuid']} of an interrupted attempt")
        else:
            out.detached.append(_refused(t, "VDI", ref, rec, err))
    return out


SETTLE_SECONDS = 15.0


def settle(t: XapiSession, vdis: list[str], seconds: float = SETTLE_SECONDS) -> None:
    """Wait (bounded) until XAPI's own use of these disks ends: the control domain's VBDs of an
    export or import still winding down after a transfer was cut."""
    deadline = time.monotonic() + seconds
    for vdi in vdis:
        while time.monotonic() < deadline:
            try:
                vbds = t.api.VDI.get_VBDs(vdi)
                if not any(t.api.VM.get_is_control_domain(t.api.VBD.get_VM(b)) for b in vbds):
                    break
            except XapiError:
                break  # gone, or the VBD went meanwhile: the destroy says what is true
            time.sleep(0.1)


def destroy(t: XapiSession, cls: str, ref: str) -> XapiError | None:
    """One destroy, never retried: a refusal means the object is in use. Gone already is done."""
    try:
        t.call_once(f"{cls}.destroy", ref)
    except XapiError as err:
        return None if err.code == "HANDLE_INVALID" else err
    return None


def _mark_detached(t: XapiSession, cls: str, ref: str, why: str) -> None:
    stamp = md.precise(datetime.now(UTC))
    try:
        oc = dict(t.call(f"{cls}.get_other_config", ref))
        oc.pop(md.EXPIRING, None)
        t.call(f"{cls}.set_other_config", ref, oc | {md.DETACHED: f"{stamp} {why}"})
    except XapiError as err:
        log.warning("%s %s: detached mark not written: %s", cls, ref, err)


def _refused(t: XapiSession, cls: str, ref: str, rec: dict[str, Any], err: XapiError) -> Detached:
    why = f"in use: XAPI refused to destroy it ({err.code})"
    _mark_detached(t, cls, ref, why)
    return Detached(cls, rec["uuid"], rec["name_label"], why)


def expire(t: XapiSession, rp: RestorePoint) -> Detached | None:
    """Retention's destroy of one intact restore point: checked once more (its disks unchanged
    since the commit), marked expiring, then its VM, its disks and their commit snapshots
    destroyed. Returns the detached object instead when it is not exactly as xencr left it."""
    for dev, (live, commit, _) in rp.disks.items():
        if commit is not None and changed_blocks(t, live, commit) > 0:
            why = f"disk {dev} written since the commit"
            _mark_detached(t, "VM", rp.ref, why)
            return Detached("VM", rp.uuid, rp.name, why)
    vdis = [v for live, commit, _ in rp.disks.values() for v in (commit, live) if v is not None]
    stamp = md.precise(datetime.now(UTC))
    for cls, ref in [*(("VDI", v) for v in vdis), ("VM", rp.ref)]:
        oc = dict(t.call(f"{cls}.get_other_config", ref))
        t.call(f"{cls}.set_other_config", ref, oc | {md.EXPIRING: stamp})
    err = destroy(t, "VM", rp.ref)
    if err is not None:
        # In use after all: its disks are no longer on their way out either.
        for vdi in vdis:
            _mark_detached(t, "VDI", vdi, f"a disk of replica {rp.uuid}, in use")
        return _refused(t, "VM", rp.ref, rp.record, err)
    for vdi in vdis:
        err = destroy(t, "VDI", vdi)
        if err is not None:
            return _refused(t, "VDI", vdi, t.api.VDI.get_record(vdi), err)
    return None


def discard(t: XapiSession, replica: str, vdis: list[str]) -> None:
    """Remove this process's own failed attempt at once, best effort: whatever stays carries the
    attempt's id, never committed, and the next survey removes it. Nothing is shut down."""
    for cls, ref in [("VM", replica), *(("VDI", v) for v in vdis)]:
        try:
            snaps = [str(x) for x in t.api.VDI.get_snapshots(ref)] if cls == "VDI" else []
            for snap in snaps:
                destroy(t, "VDI", snap)
            err = destroy(t, cls, ref)
        except (XapiError, PoolUnreachable) as e:
            log.warning("%s %s not destroyed: %s (the next run cleans it up)", cls, ref, e)
            continue
        if err is not None:
            log.warning("%s %s not destroyed: %s (the next run looks at it again)", cls, ref, err)


def tidy(t: XapiSession, job_id: str, vm_uuid: str, sr_uuid: str, keep: str | None = None) -> Cleaned:
    """The clean-up at the start of a run (or seed import) for one VM and target SR; the
    uncommitted attempt ``keep`` (recorded as resumable) is set aside rather than destroyed."""
    return clean(t, survey(t, job_id, vm_uuid, sr_uuid, keep))


# ----------------------------------------------------------------------------- health checks

# A health check (`health`) boots a clone of a new restore point, then destroys it. The clone is
# named by the call that creates it (`health_check_name`), so it carries the check's attempt from
# its first moment; right after, it and its disks are marked (`xencr:role`, `xencr:attempt`,
# `xencr:self`). Its other `xencr:` keys (job, source VM, SR) are the restore point's, copied.
HEALTH_CHECK_ROLE = "health-check"
HEALTH_CHECK_DISK_ROLE = "health-check-disk"
_HEALTH_CHECK_NAME = re.compile(r"^\[xencr health-check\] .* #([0-9a-f]{8}-[0-9a-f]{12})$")


def health_check_name(vm_name: str, attempt: str) -> str:
    return f"[xencr health-check] {vm_name} #{attempt}"


def remove_health_checks(
    t: XapiSession, job_id: str, vm_uuid: str, sr_uuid: str, *, attempt: str | None = None
) -> list[str]:
    """Destroy this job's health-check clones of the VM's restore points on the SR (only
    ``attempt``'s, when given: a check ending), shut down first if running (a clone is the check's
    own, booted by it), then their disks; also disks whose clone is already gone (a kill between
    the two destroys). A clone is recognised by its keys and name, and is either marked with the
    name's attempt and its own `xencr:self`, or not marked yet (a kill right after the clone: it
    still carries the restore point's keys). A disk another VM uses is left alone. Lines for what
    went; a refusal is logged and looked at again by the next run."""

    def ours(oc: dict[str, str]) -> bool:
        return oc.get(md.JOB) == job_id and oc.get(md.VM) == vm_uuid and oc.get(md.SR) == sr_uuid

    def wanted(found: str | None) -> bool:
        return found is not None and found.startswith(job_id[:8]) and attempt in (None, found)

    p = _Pool(t)
    out: list[str] = []
    gone_vms: set[str] = set()
    for ref, rec in p.vms.items():
        oc = rec["other_config"]
        named = (m := _HEALTH_CHECK_NAME.match(rec["name_label"])) and m.group(1)
        if rec["is_a_snapshot"] or rec["is_control_domain"] or not ours(oc) or not wanted(named or None):
            continue
        marked = (
            oc.get(md.ROLE) == HEALTH_CHECK_ROLE and oc.get(md.ATTEMPT) == named and _is_copy(rec) is None
        )
        unmarked = oc.get(md.ROLE) == "replica" and _is_copy(rec) is not None
        if not (marked or unmarked) or rec["snapshots"]:
            continue
        disks = [v for v in p.disks_of(ref).values() if p.users.get(v, set()) <= {ref}]
        for vdi in disks:
            # Findable if the kill falls between the VM's destroy and its disks'.
            doc = p.vdis[vdi]["other_config"]
            marks = {md.JOB: job_id, md.VM: vm_uuid, md.SR: sr_uuid, md.ROLE: HEALTH_CHECK_DISK_ROLE}
            marks |= {md.ATTEMPT: str(named), md.SELF: p.vdis[vdi]["uuid"]}
            t.api.VDI.set_other_config(vdi, dict(doc) | marks)
        if rec["power_state"] != "Halted":
            try:
                t.call_once("VM.hard_shutdown", ref)
            except XapiError as refused:
                log.warning("health-check clone %s not shut down: %s", rec["uuid"], refused)
        kept = destroy(t, "VM", ref)
        if kept is not None:
            log.warning("health-check clone %s not destroyed: %s", rec["uuid"], kept)
            continue
        gone_vms.add(ref)
        out.append(f"health-check clone {rec['uuid']} ({rec['name_label']})")
        settle(t, disks)
        for vdi in disks:
            if destroy(t, "VDI", vdi) is None:
                out.append(f"disk {p.vdis[vdi]['uuid']} of health-check clone {rec['uuid']}")
                p.vdis.pop(vdi)
            else:
                log.warning(
                    "disk %s of health-check clone %s not destroyed", p.vdis[vdi]["uuid"], rec["uuid"]
                )
    for ref, rec in p.vdis.items():
        oc = rec["other_config"]
        if (
            rec["managed"]
            and not rec["is_a_snapshot"]
            and ours(oc)
            and oc.get(md.ROLE) == HEALTH_CHECK_DISK_ROLE
            and wanted(oc.get(md.ATTEMPT))
            and _is_copy(rec) is None
            and p.users.get(ref, set()) <= gone_vms
            and destroy(t, "VDI", ref) is None
        ):
            out.append(f"disk {rec['uuid']} of an interrupted health check")
    return out


# ------------------------------------------------------------------------------- source side


def source_leftovers(s: XapiSession, vm: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Snapshots of the VM that an attempt of this job took and could not tag (killed between
    `VM.snapshot` and the write of its keys): found by the attempt id in their name."""
    out = []
    for snap in s.api.VM.get_snapshots(vm):
        rec = s.api.VM.get_record(snap)
        attempt = attempt_of_snapshot_name(rec["name_label"])
        if md.JOB not in rec["other_config"] and attempt and attempt.startswith(job_id[:8]):
            out.append((str(snap), rec))
    return out


def source_orphan_disks(s: XapiSession, vm_uuid: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Disks of this job's source snapshots whose destroy was cut short (their snapshot VM gone,
    marked expiring by `destroy_snapshot` before it), attached to nothing: finish it."""
    out = []
    for ref, rec in s.api.VDI.get_all_records().items():
        oc = rec["other_config"]
        if (
            oc.get(md.JOB) == job_id
            and oc.get(md.VM) == vm_uuid
            and oc.get(md.ROLE) == "source-snapshot"
            and md.EXPIRING in oc
            and not rec["VBDs"]
            and rec["managed"]
        ):
            out.append((str(ref), rec))
    return out


def destroy_snapshot(s: XapiSession, snap: str, job_id: str, vm_uuid: str) -> str | None:
    """A source snapshot of this job and its disks (VM.destroy keeps the disks), unless a disk is
    attached to another VM: then nothing is destroyed and the reason is returned. The disks are
    marked as this job's and expiring first, so a kill between the two destroys is finished by
    the next run (`source_orphan_disks`), even for a snapshot a kill left untagged."""
    vdis = []
    for vbd in s.api.VM.get_VBDs(snap):
        b = s.api.VBD.get_record(vbd)
        if b["type"] != "Disk" or str(b["VDI"]) == NULL:
            continue
        settle(s, [str(b["VDI"])])
        users = {str(s.api.VBD.get_VM(x)) for x in s.api.VDI.get_VBDs(b["VDI"])} - {snap}
        users = {u for u in users if not s.api.VM.get_is_control_domain(u)}
        if users:
            name = s.api.VM.get_name_label(sorted(users)[0])
            return f"its disk {b['userdevice']} is attached to VM {name!r}"
        vdis.append(str(b["VDI"]))
    for uuid in md.purged_disks(s.api.VM.get_other_config(snap)).values():
        try:
            vdis.append(str(s.api.VDI.get_by_uuid(uuid)))  # a purged snapshot's CBT logs
        except XapiError:
            continue
    vdis = list(dict.fromkeys(vdis))
    marks = {
        md.JOB: job_id,
        md.VM: vm_uuid,
        md.ROLE: "source-snapshot",
        md.EXPIRING: md.precise(datetime.now(UTC)),
    }
    for vdi in vdis:
        s.api.VDI.set_other_config(vdi, dict(s.api.VDI.get_other_config(vdi)) | marks)
    err = destroy(s, "VM", snap)
    if err is not None:
        return f"in use: XAPI refused to destroy it ({err.code})"
    for vdi in vdis:
        err = destroy(s, "VDI", vdi)
        if err is not None:
            log.warning("snapshot disk %s not destroyed: %s", vdi, err)
    return None


def purge_snapshot_data(s: XapiSession, snap: str, job_id: str, vm_uuid: str) -> str | None:
    """Reduce a source snapshot of this job that retention keeps as a base to its CBT logs
    (``purge_snapshot_data``, the NBD path): only this job's snapshot of this VM, only disks with
    CBT on that no other VM uses. XAPI destroys a VDI's data only once no VBD refers to it
    (`xapi_vdi.ml`, `VDI_IN_USE` otherwise): the snapshot's disks are recorded on it
    (``xencr:purged``, before anything changes, so a kill leaves it still known), its disk VBDs
    destroyed, then each VDI's data (`VDI.data_destroy`). The snapshot record stays as the next
    delta's base. A line saying what was freed, or None when there was nothing to do."""
    rec = s.api.VM.get_record(snap)
    oc = rec["other_config"]
    if not rec["is_a_snapshot"] or oc.get(md.JOB) != job_id or oc.get(md.VM) != vm_uuid:
        return None
    disks = dict(md.purged_disks(oc))
    vbds = {}
    for vbd in rec["VBDs"]:
        b = s.api.VBD.get_record(vbd)
        if b["type"] != "Disk" or str(b["VDI"]) == NULL:
            continue
        vdi = s.api.VDI.get_record(b["VDI"])
        if not vdi["cbt_enabled"]:
            continue
        users = {str(s.api.VBD.get_VM(x)) for x in vdi["VBDs"]} - {snap}
        if any(not s.api.VM.get_is_control_domain(u) for u in users):
            log.warning(
                "snapshot %s: disk %s is attached to another VM: data kept", rec["uuid"], b["userdevice"]
            )
            continue
        disks[str(b["userdevice"])] = str(vdi["uuid"])
        vbds[str(vbd)] = str(b["VDI"])
    if not disks:
        return None
    if md.purged_disks(oc) != disks:
        record = ";".join(f"{d}={u}" for d, u in sorted(disks.items()))
        s.api.VM.set_other_config(snap, dict(oc) | {md.PURGED: record})
    for vbd in vbds:
        s.call_once("VBD.destroy", vbd)
    freed, done = 0, 0
    for uuid in disks.values():
        try:
            ref = s.api.VDI.get_by_uuid(uuid)
            vdi = s.api.VDI.get_record(ref)
            if vdi["type"] == "cbt_metadata":
                continue
            s.call_once("VDI.data_destroy", ref)
        except XapiError as err:
            log.warning("snapshot %s: data of disk %s kept: %s", rec["uuid"], uuid, err)
            continue
        freed += int(vdi["physical_utilisation"])
        done += 1
    if not done:
        return None
    return f"snapshot {rec['uuid']}: data of {done} disk(s) destroyed, CBT log kept ({freed} bytes freed)"


# ------------------------------------------------------------------------ DR test objects

FAILED_OVER = "xencr:failed_over"  # on a replica a failover recovered: "<time> <plan>"
DR_TEST = "dr-test"  # `xencr:role` of a test failover's clones, their disks and its network
_DR_TEST_NAME = re.compile(r"^.* \[xencr test ([0-9a-f]{8}-[0-9a-f]{12})\]$")


def dr_test_name(name: str, attempt: str) -> str:
    """The name a test failover gives its clone in the `VM.clone` call: the attempt is on the
    object from its creation, before any key can be written on it."""
    return f"{name} [xencr test {attempt}]"


@dataclass
class DrTestObjects:
    """What test failovers left on a pool (ref, record): clones, their disks, isolated networks."""

    vms: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    vdis: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    networks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def dr_test_objects(t: XapiSession, keep: str | None = None) -> DrTestObjects:
    """(c) **The objects a test failover created**, which it destroys when done and which any later
    test or `xencr failover --cleanup` destroys when a test was cut short (all but attempt ``keep``):

    - a VM (never a snapshot) whose `xencr:role` is `dr-test` with a `xencr:attempt`, or whose name
      carries a test attempt (`dr_test_name`, given in the `VM.clone` call);
    - a disk of such a VM that no other VM uses and that is the clone's own: marked `dr-test`, or
      still carrying a replica disk's keys with another object's `xencr:self` (a clone's disk not
      yet re-marked). A replica's own disk is never one;
    - a network whose `xencr:role` is `dr-test` with a `xencr:attempt` (given to `network.create`).
    Such VMs may be shut down first: nothing but the test uses them."""
    out = DrTestObjects()
    p = _Pool(t)

    def attempt_of(rec: dict[str, Any]) -> str | None:
        oc = rec["other_config"]
        if oc.get(md.ROLE) == DR_TEST and oc.get(md.ATTEMPT):
            return str(oc[md.ATTEMPT])
        m = _DR_TEST_NAME.match(rec["name_label"])
        return m.group(1) if m else None

    test_vms = {
        ref
        for ref, rec in p.vms.items()
        if not rec["is_a_snapshot"] and not rec["is_control_domain"] and attempt_of(rec) not in (None, keep)
    }
    out.vms = [(ref, p.vms[ref]) for ref in sorted(test_vms)]
    for ref in sorted(test_vms):
        for vdi in p.disks_of(ref).values():
            rec = p.vdis.get(vdi)
            if rec is None or p.users.get(vdi, set()) - test_vms:
                continue
            oc = rec["other_config"]
            if oc.get(md.ROLE) == DR_TEST or _is_copy(rec) is not None:
                out.vdis.append((vdi, rec))
    for ref, rec in t.api.network.get_all_records().items():
        oc = rec["other_config"]
        if oc.get(md.ROLE) == DR_TEST and oc.get(md.ATTEMPT) not in (None, keep):
            out.networks.append((str(ref), rec))
    return out


@dataclass
class NativeTestObjects:
    """What a native DR test made in the recovery pool (refs with their records)."""

    vms: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # with their VM snapshots
    apps: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    srs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    networks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def native_test_objects(
    t: XapiSession,
    *,
    attempt: str,
    vms_before: set[str],
    apps_before: set[str],
    srs_before: set[str],
    selected: set[str],
    introduced: set[str],
) -> NativeTestObjects:
    """(c) for a native DR test: the VMs and vApps it recovered (UUID in ``selected`` and absent
    before), with the VM snapshots recovered along with the VMs, the SRs its DR
    tasks introduced (absent before), its network (`xencr:role` dr-test, this attempt), and the
    networks the import made for the recovered VMs (their `import_task`)."""
    out = NativeTestObjects()
    vms = t.api.VM.get_all_records()
    ours = {
        ref
        for ref, rec in vms.items()
        if rec["uuid"] in selected and rec["uuid"] not in vms_before and not rec["is_a_snapshot"]
    }
    for ref, rec in vms.items():
        if ref in ours or (
            rec["is_a_snapshot"] and rec["snapshot_of"] in ours and rec["uuid"] not in vms_before
        ):
            out.vms.append((str(ref), rec))
    for ref, rec in t.api.VM_appliance.get_all_records().items():
        if rec["uuid"] not in apps_before and rec["uuid"] in selected:
            out.apps.append((str(ref), rec))
    for ref, rec in t.api.SR.get_all_records().items():
        if rec["uuid"] in introduced and rec["uuid"] not in srs_before:
            out.srs.append((str(ref), rec))
    # A network the import made for a recovered VM (none matched by name or bridge) carries the
    # VM's own `import_task` (import.ml): it is the recovery's too, once no other VM uses it.
    imports = {vms[r]["other_config"].get("import_task") for r in ours} - {None}
    vifs = t.api.VIF.get_all_records()
    for ref, rec in t.api.network.get_all_records().items():
        oc = rec["other_config"]
        users = {vifs[v]["VM"] for v in rec["VIFs"] if v in vifs}
        tests = oc.get(md.ROLE) == DR_TEST and oc.get(md.ATTEMPT) == attempt
        if tests or (oc.get("import_task") in imports and users <= ours):
            out.networks.append((str(ref), rec))
    return out
