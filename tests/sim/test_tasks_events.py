"""Async calls, tasks and event.from (xapi.md 1.10, 1.11)."""

from __future__ import annotations

import pytest
import XenAPI
from simtest import Sim, failure, first_vm, wait_task


def test_async_snapshot_result_is_xml_fragment(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    task = x.Async.VM.snapshot(vm, "async-snap")
    assert task.startswith("OpaqueRef:")
    rec = wait_task(x, task)
    assert rec["status"] == "success" and rec["progress"] == 1.0
    assert rec["name_label"] == "Async.VM.snapshot" and rec["type"] == "<none/>"
    assert rec["result"].startswith("<value>OpaqueRef:") and rec["result"].endswith("</value>")
    snap = rec["result"][len("<value>") : -len("</value>")]
    assert x.VM.get_is_a_snapshot(snap) is True
    assert rec["finished"].value != "19700101T00:00:00Z"
    x.task.destroy(task)
    with pytest.raises(XenAPI.Failure) as exc:
        x.task.get_record(task)
    assert failure(exc) == ["HANDLE_INVALID", "task", task]


def test_async_void_and_failure(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    rec = wait_task(x, x.Async.VM.start(vm, False, False))
    assert rec["status"] == "success" and rec["result"] == "<value></value>"
    rec = wait_task(x, x.Async.VM.start(vm, False, False))
    assert rec["status"] == "failure" and rec["error_info"] == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    x.VM.hard_shutdown(vm)
    # HANDLE_INVALID lands in the task for async calls
    rec = wait_task(x, x.Async.VM.clean_shutdown("OpaqueRef:gone"))
    assert rec["error_info"] == ["HANDLE_INVALID", "VM", "OpaqueRef:gone"]


def test_async_arity_is_synchronous(sim: Sim) -> None:
    x = sim.session().xenapi
    with pytest.raises(XenAPI.Failure) as exc:
        x.Async.VM.start(first_vm(x))
    assert failure(exc) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.start", "3", "1"]


def test_task_create_cancel_and_owner(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    task = x.task.create("mine", "a client task")
    rec = x.task.get_record(task)
    assert rec["status"] == "pending" and rec["name_label"] == "mine"
    assert task in x.session.get_tasks(s._session)
    x.task.cancel(task)
    assert list(x.task.get_current_operations(task).values()) == ["cancel"]
    x.task.destroy(task)  # pending: only marked
    assert x.task.get_current_operations(task)["task"] == "destroy"
    x.task.set_status(task, "cancelled")


def test_event_from_tokens_and_subscriptions(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    everything = x.event_from(["*"], "", 0.0)
    assert {ev["operation"] for ev in everything["events"]} == {"add"}
    assert everything["valid_ref_counts"]["vm"] == len(x.VM.get_all())
    token = everything["token"]
    assert len(token) == 41 and token[20] == ","
    x.VM.set_name_description(vm, "changed")
    batch = x.event_from(["vm"], token, 5.0)
    mods = [ev for ev in batch["events"] if ev["ref"] == vm]
    assert mods and mods[0]["operation"] == "mod" and mods[0]["class"] == "vm"
    assert mods[0]["snapshot"]["name_description"] == "changed"
    # an empty batch comes back only at the timeout
    quiet = x.event_from([f"vm/{vm}"], batch["token"], 0.2)
    assert quiet["events"] == []
    net = x.network.create({"name_label": "ephemeral", "other_config": {}})
    x.network.destroy(net)
    batch2 = x.event_from(["network"], quiet["token"], 0.1)
    # created and destroyed after the token: nothing to report
    assert batch2["events"] == []
    t2 = batch2["token"]
    net2 = x.network.create({"name_label": "kept", "other_config": {}})
    batch3 = x.event_from(["NETWORK"], t2, 5.0)
    assert [(e["operation"], e["ref"]) for e in batch3["events"]] == [("add", net2)]
    x.network.destroy(net2)
    batch4 = x.event_from(["network"], batch3["token"], 5.0)
    assert [(e["operation"], e["ref"]) for e in batch4["events"]] == [("del", net2)]
    assert "snapshot" not in batch4["events"][0]


def test_event_errors(sim: Sim) -> None:
    x = sim.session().xenapi
    with pytest.raises(XenAPI.Failure) as exc:
        x.event_from(["nosuchclass"], "", 0.0)
    assert failure(exc) == ["EVENT_SUBSCRIPTION_PARSE_FAILURE", "nosuchclass"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.event_from(["vm"], "garbage", 0.0)
    assert failure(exc) == ["EVENT_FROM_TOKEN_PARSE_FAILURE", "garbage"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.event.inject("vm", "OpaqueRef:nope")
    assert failure(exc) == ["HANDLE_INVALID", "vm", "OpaqueRef:nope"]


def test_event_inject_and_current_id(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    token = x.event.inject("vm", vm)
    batch = x.event_from([f"vm/{vm}"], token, 5.0)
    assert [e["ref"] for e in batch["events"]] == [vm]
    assert int(x.event.get_current_id()) >= int(token.split(",")[0])


def test_wait_on_task_with_event_from(sim: Sim) -> None:
    x = sim.session().xenapi
    task = x.Async.VM.clone(first_vm(x), "evented")
    token = ""
    status = "pending"
    while status == "pending":
        batch = x.event_from([f"task/{task}"], token, 5.0)
        token = batch["token"]
        for ev in batch["events"]:
            status = ev["snapshot"]["status"]
    assert status == "success"
