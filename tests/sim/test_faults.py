"""Fault injection knobs (SPEC §10), each acting where a real host fails, each logged."""

from __future__ import annotations

import http.client
import logging
import time
from typing import Any

import pytest
import XenAPI
from simtest import (
    MIB,
    Sim,
    export_path,
    failure,
    first_vm,
    http_request,
    import_path,
    put_stream,
    vm_disk,
    wait_task,
)

from xencr import _engine


def small_vdi(x: Any, size: int = 2 * MIB) -> str:
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    vdi = x.VDI.create(
        {
            "SR": sr,
            "virtual_size": str(size),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    x.sim.write(x.VDI.get_uuid(vdi), "0", str(size), "fault-data")
    return str(vdi)


@pytest.fixture(autouse=True)
def clear_faults(sim: Sim) -> Any:
    yield
    x = sim.session().xenapi
    x.sim.fault_clear()


def test_fail_next_call(sim: Sim, caplog: pytest.LogCaptureFixture) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    error = ["SR_BACKEND_FAILURE_44", "", "There is insufficient space", ""]
    with caplog.at_level(logging.WARNING, logger="xencr.sim"):
        x.sim.fault_fail_next_call("VM.snapshot", error)
        assert x.sim.faults()["call_failures"] == {"VM.snapshot": [error]}
        with pytest.raises(XenAPI.Failure) as exc:
            x.VM.snapshot(vm, "fails")
        assert failure(exc) == error
    assert x.VM.snapshot(vm, "works")  # one-shot
    messages = [r.getMessage() for r in caplog.records]
    assert any("fault armed: next call of VM.snapshot" in m for m in messages)
    assert any("fault fired: VM.snapshot" in m for m in messages)
    # async: the failure lands in the task
    x.sim.fault_fail_next_call("VM.clone", ["OPERATION_NOT_ALLOWED", "injected"])
    rec = wait_task(x, x.Async.VM.clone(vm, "async"))
    assert rec["status"] == "failure" and rec["error_info"] == ["OPERATION_NOT_ALLOWED", "injected"]


def test_drop_export_after_n_bytes(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    vdi = small_vdi(x)
    x.sim.fault_drop_after("export", "100000")
    status, headers, body = http_request(sim, "GET", export_path(s, vdi, "raw"))
    assert status == 200 and len(body) == 100000
    rec = x.task.get_record(headers["task-id"])
    assert rec["status"] == "failure" and rec["error_info"] == ["VDI_IO_ERROR", "Device I/O errors"]
    _, _, whole = http_request(sim, "GET", export_path(s, vdi, "raw"))
    assert len(whole) == 2 * MIB and whole[:100000] == body  # one-shot


def test_drop_import_after_n_bytes(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    src = small_vdi(x)
    target = x.VDI.create(
        {
            "SR": x.VDI.get_SR(src),
            "virtual_size": str(2 * MIB),
            "type": "user",
            "sharable": False,
            "read_only": False,
            "other_config": {},
        }
    )
    _, _, stream = http_request(sim, "GET", export_path(s, src, "vhd"))
    x.sim.fault_drop_after("import", "5000")
    status, headers = put_stream(sim, import_path(s, target, "vhd"), stream)
    assert status == 200
    rec = wait_task(x, headers["task-id"])
    assert rec["status"] == "failure" and rec["error_info"] == ["VDI_IO_ERROR", "Device I/O errors"]


def test_flip_byte_in_export(sim: Sim, tmp_path: Any) -> None:
    s = sim.session()
    x = s.xenapi
    vdi = small_vdi(x)
    query = f"/export_raw_vdi?session_id={s._session}&vdi={vdi}&format="
    _, _, good = http_request(sim, "GET", query + "raw")
    x.sim.fault_flip_byte("export", "12345")
    _, headers, bad = http_request(sim, "GET", query + "raw")
    assert len(bad) == len(good)
    assert [i for i in range(len(good)) if good[i] != bad[i]] == [12345]
    assert bad[12345] == good[12345] ^ 0xFF
    assert x.task.get_status(headers["task-id"]) == "success"  # the host does not know
    x.sim.fault_flip_byte("export", "600")  # inside the VHD header: the engine must reject it
    _, _, stream = http_request(sim, "GET", query + "vhd")
    f = tmp_path / "bad.vhd"
    f.write_bytes(stream)
    with pytest.raises(_engine.VhdError):
        _engine.transform(str(f), str(tmp_path / "out.vhd"))


def test_flip_byte_in_import(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    src = small_vdi(x)
    target = x.VDI.clone(src)
    before = x.sim.hash(x.VDI.get_uuid(target))
    x.sim.write(x.VDI.get_uuid(src), "0", "512", "changed")
    _, _, stream = http_request(sim, "GET", export_path(s, src, "vhd"))
    x.sim.fault_flip_byte("import", "520")  # header checksum area: the import must fail
    _, headers, _ = http_request(sim, "PUT", import_path(s, target, "vhd"), stream)
    rec = wait_task(x, headers["task-id"])
    assert rec["error_info"] == ["VDI_IO_ERROR", "Device I/O errors"]
    assert x.sim.hash(x.VDI.get_uuid(target)) == before


def test_slow_transfers(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    vdi = small_vdi(x)
    rate = 8 * MIB
    x.sim.fault_rate(str(rate))
    assert x.sim.faults()["rate"] == str(rate)
    started = time.monotonic()
    _, _, body = http_request(sim, "GET", export_path(s, vdi, "raw"))
    elapsed = time.monotonic() - started
    assert len(body) == 2 * MIB
    assert elapsed >= (2 * MIB / rate) * 0.9  # cannot be faster than the limit
    x.sim.fault_rate("0")
    assert x.sim.faults()["rate"] == "0"


def test_fill_sr(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    vm = first_vm(x)
    sr = x.pool.get_default_SR(x.pool.get_all()[0])
    disk = vm_disk(x, vm)
    x.sim.fault_fill_sr(x.SR.get_uuid(sr), "-1")
    rec = x.SR.get_record(sr)
    assert rec["physical_utilisation"] == rec["physical_size"]
    no_space = ["SR_BACKEND_FAILURE_44", "", "There is insufficient space", ""]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.create(
            {
                "SR": sr,
                "virtual_size": str(2 * MIB),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
            }
        )
    assert failure(exc) == no_space
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.copy(vm, "full", sr)
    assert failure(exc) == no_space
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.snapshot(vm, "full")
    assert failure(exc) == no_space
    _, _, stream = http_request(sim, "GET", export_path(s, disk, "vhd"))
    _, headers = put_stream(sim, import_path(s, disk, "vhd"), stream)
    assert wait_task(x, headers["task-id"])["error_info"] == ["VDI_IO_ERROR", "Device I/O errors"]
    x.sim.fault_fill_sr(x.SR.get_uuid(sr), "0")
    assert int(x.SR.get_physical_utilisation(sr)) < int(x.SR.get_physical_size(sr))
    assert x.VM.snapshot(vm, "room again")


def test_host_unreachable(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    other = sim.session(1).xenapi
    x.sim.fault_unreachable(True)
    assert x.sim.faults()["unreachable"] is True
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        XenAPI.Session(sim.urls[0]).xenapi.login_with_password("root", sim.password, "1.0", "t")
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        http_request(sim, "GET", f"/export_raw_vdi?session_id={s._session}&vdi=x&format=raw")
    assert other.pool.get_all()  # the other pool is unaffected
    x.sim.fault_unreachable(False)
    assert x.pool.get_all()


def test_http_handler_faults_before_and_after(sim: Sim) -> None:
    s = sim.session()
    x = s.xenapi
    vdi = small_vdi(x)
    error = ["SR_BACKEND_FAILURE_46", "", "The VDI is not available", ""]
    x.sim.fault_fail_next_call("export_raw_vdi", error)
    task = x.task.create("client", "")
    status, _, _ = http_request(sim, "GET", export_path(s, vdi, "raw", f"&task_id={task}"))
    assert status == 500 and x.task.get_error_info(task) == error
    x.sim.fault_fail_next_call("export_raw_vdi:after", error)
    status, headers, body = http_request(sim, "GET", export_path(s, vdi, "raw"))
    assert status == 200 and len(body) == 2 * MIB
    assert x.task.get_error_info(headers["task-id"]) == error
    _, _, stream = http_request(sim, "GET", export_path(s, vdi, "vhd"))
    target = x.VDI.clone(vdi)
    no_space = ["SR_BACKEND_FAILURE_44", "", "There is insufficient space", ""]
    x.sim.fault_fail_next_call("import_raw_vdi:after", no_space)
    status, headers = put_stream(sim, import_path(s, target, "vhd"), stream)
    assert status == 200
    assert wait_task(x, headers["task-id"])["error_info"] == no_space
