"""Starting a failover's VMs group by group: each VM of a group is started (`VM.start`, never
`start_on`: XAPI places a VM on a host that sees its SR), its gate prepared before and awaited
after, then its hooks run (their exit code is part of the gate); the next group starts after the
group's start delay. A VM whose gate fails stops the plan at its group (the later groups are not
started) unless ``continue_on_failure``.

Exactly once: a VM is started only when the caller's ``Progress`` says it was never started and it
is not running; a VM found running was started by an earlier, interrupted attempt and is not
started again."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from xencr.config import HealthGate, PlanConfig, PlanHook
from xencr.dr import gates
from xencr.dr.gates import GateResult
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession

NULL = "OpaqueRef:NULL"


@dataclass(frozen=True)
class StartVm:
    """One VM to start: the source VM it recovers, and the VM to start on ``pool``."""

    vm_uuid: str  # the source VM
    name: str
    pool: str
    vm: str  # the UUID of the VM started (a replica, or a clone of one)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class StartGroup:
    number: int
    vms: tuple[StartVm, ...]
    start_delay: int
    gate: HealthGate | None


@dataclass
class VmResult:
    vm_uuid: str
    name: str
    vm: str
    ok: bool
    detail: str  # one line: the gate's and the hooks' outcome, or why it did not start
    started: bool  # it was started (by this call or an earlier, interrupted one)
    boot_seconds: float | None = None  # from `VM.start` to the gate passed
    group: int | None = None  # the start group it belongs to
    started_at: datetime | None = None  # when this call started it (None: not by this call)


@dataclass
class StartReport:
    results: list[VmResult] = field(default_factory=list)
    stopped_at: int | None = None  # the group whose failure stopped the plan
    not_started: list[str] = field(default_factory=list)  # names of the VMs of later groups

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results) and not self.not_started


class Progress(Protocol):
    """What the caller records (the failover's state DB rows; nothing for a test)."""

    def prepare(self, vm: StartVm) -> StartVm:
        """Make the VM startable (unprotect or clone it, map its networks), once; the VM to start."""

    def done(self, vm: StartVm) -> VmResult | None:
        """The result recorded for a VM already through its gate (then it is skipped)."""

    def was_started(self, vm: StartVm) -> bool:
        """Whether an earlier attempt recorded starting it."""

    def started(self, vm: StartVm, when: datetime) -> None: ...

    def finished(self, vm: StartVm, result: VmResult) -> None: ...


def group_gate(plan: PlanConfig, number: int) -> HealthGate | None:
    """The gate of a group, by its number: a plan's group's own (else the plan's), the plan's for a
    group from carried order (`groups.start_order`'s rule)."""
    if 1 <= number <= len(plan.groups):
        return plan.groups[number - 1].gate or plan.gate
    return plan.gate


def hooks_for(plan: PlanConfig, vm: StartVm) -> list[PlanHook]:
    return [h for h in plan.hooks if h.selector.matches(vm.vm_uuid, vm.name, vm.tags)]


def guest_ips(t: XapiSession, ref: str) -> list[str]:
    """The IPs the guest agent reported (`VM_guest_metrics.networks`, "0/ip" -> "10.0.0.5")."""
    metrics = str(t.api.VM.get_guest_metrics(ref))
    if metrics == NULL:
        return []
    nets = t.api.VM_guest_metrics.get_networks(metrics)
    return [str(v) for k, v in sorted(nets.items()) if "/ip" in k]


def run_hook(hook: PlanHook, plan: str, vm: StartVm, ips: Sequence[str]) -> tuple[bool, str]:
    """Run one hook (argv, no shell) with the VM in its environment; (passed, one line)."""
    env = os.environ | {
        "XENCR_PLAN": plan,
        "XENCR_VM_UUID": vm.vm,
        "XENCR_VM_NAME": vm.name,
        "XENCR_SOURCE_VM_UUID": vm.vm_uuid,
        "XENCR_VM_IPS": " ".join(ips),
    }
    what = f"hook {hook.command[0]!r}"
    try:
        done = subprocess.run(
            hook.command, env=env, timeout=hook.timeout, capture_output=True, text=True, check=False
        )
    except subprocess.TimeoutExpired:
        return False, f"{what} still running after {hook.timeout}s (killed)"
    except OSError as err:
        return False, f"{what} could not run: {err.strerror or err}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        return False, f"{what} exited {done.returncode}" + (f": {tail[-1]}" if tail else "")
    return True, f"{what} exited 0"


Sessions = Callable[[str], XapiSession]


def start_groups(
    plan: PlanConfig,
    groups: Sequence[StartGroup],
    session: Sessions,
    progress: Progress,
    *,
    continue_on_failure: bool = False,
    run_hooks: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> StartReport:
    """Start ``groups`` in order (see the module's rule); ``session(pool)`` gives each VM's pool."""
    out = StartReport()
    for i, group in enumerate(groups):
        fresh = False  # whether this call started anything in the group (else no delay owed)
        pending: list[tuple[StartVm, str, float, datetime | None]] = []
        launched: list[tuple[StartVm, str, float, str, datetime]] = []
        for vm in group.vms:
            done = progress.done(vm)
            if done is not None:
                out.results.append(done)
                say(f"group {group.number}: {vm.name} already done ({done.detail})")
                continue
            t = session(vm.pool)
            try:
                vm = progress.prepare(vm)
                ref = str(t.api.VM.get_by_uuid(vm.vm))
                state = str(t.api.VM.get_power_state(ref))
                if progress.was_started(vm) or state != "Halted":
                    # Started by an earlier, interrupted attempt: never a second time.
                    if not progress.was_started(vm):
                        progress.started(vm, datetime.now(UTC))
                    say(f"group {group.number}: {vm.name} was started already ({state})")
                    pending.append((vm, ref, time.monotonic(), None))
                    continue
                gates.prepare(t, ref, group.gate)
                began = time.monotonic()
                # The VMs of a group start together, as `VM_appliance.start` does (xapi.md 5.4):
                # every task first, then the waits (a `VM.start` also sleeps its start_delay).
                task = str(t.call("Async.VM.start", ref, False, False))
                now = datetime.now(UTC)
                progress.started(vm, now)
                fresh = True
                launched.append((vm, ref, began, task, now))
            except (XapiError, PoolUnreachable) as err:
                r = VmResult(
                    vm.vm_uuid, vm.name, vm.vm, False, f"not started: {err}", False, group=group.number
                )
                progress.finished(vm, r)
                out.results.append(r)
        for vm, ref, began, task, at in launched:
            try:
                session(vm.pool).wait_task(task)
                say(f"group {group.number}: started {vm.name}")
                pending.append((vm, ref, began, at))
            except (XapiError, PoolUnreachable) as err:
                r = VmResult(
                    vm.vm_uuid, vm.name, vm.vm, False, f"not started: {err}", False, group=group.number
                )
                progress.finished(vm, r)
                out.results.append(r)
        for vm, ref, began, when in pending:
            out.results.append(
                _gate(plan, vm, session(vm.pool), ref, began, group, when, run_hooks, progress)
            )
        failed = [r for r in out.results if not r.ok and r.vm_uuid in {v.vm_uuid for v in group.vms}]
        if failed and not continue_on_failure:
            out.stopped_at = group.number
            out.not_started = [v.name for g in groups[i + 1 :] for v in g.vms]
            return out
        if fresh and group.start_delay and i + 1 < len(groups):
            time.sleep(group.start_delay)
    return out


def _gate(
    plan: PlanConfig,
    vm: StartVm,
    t: XapiSession,
    ref: str,
    began: float,
    group: StartGroup,
    when: datetime | None,
    run_hooks: bool,
    progress: Progress,
) -> VmResult:
    try:
        g: GateResult = gates.wait(t, ref, group.gate)
        ok, detail = g.ok, g.detail
        boot = time.monotonic() - began if g.ok else None
        if ok and run_hooks:
            ips = guest_ips(t, ref)
            for hook in hooks_for(plan, vm):
                passed, line = run_hook(hook, plan.name, vm, ips)
                detail += f"; {line}"
                ok = ok and passed
                if not passed:
                    break
    except (XapiError, PoolUnreachable) as err:
        ok, detail, boot = False, f"gate not checked: {err}", None
    r = VmResult(vm.vm_uuid, vm.name, vm.vm, ok, detail, True, boot, group.number, when)
    progress.finished(vm, r)
    return r
