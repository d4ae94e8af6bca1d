"""Wire protocol and SDK conformance (xapi.md 0, 1): envelopes, types, errors, sessions."""

from __future__ import annotations

import http.client
import json
import threading
import xmlrpc.client
from typing import Any
from urllib.parse import urlsplit

import pytest
import XenAPI
from simtest import Sim, failure, first_vm


def post(
    sim: Sim, path: str, body: bytes, content_type: str = "text/xml"
) -> tuple[int, dict[str, str], bytes]:
    u = urlsplit(sim.urls[0])
    conn = http.client.HTTPConnection(u.hostname or "", u.port)
    conn.request("POST", path, body, {"Content-Type": content_type})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def login_raw(sim: Sim) -> str:
    reply = sim.raw().session.login_with_password("root", sim.password)
    assert reply["Status"] == "Success"
    return str(reply["Value"])


def test_login_logout_and_api_version(sim: Sim) -> None:
    s = XenAPI.Session(sim.urls[0])
    s.xenapi.login_with_password("root", sim.password, "2.0", "tests")
    assert s._session.startswith("OpaqueRef:")
    assert s.API_version == "2.21"
    record = s.xenapi.session.get_record(s._session)
    assert record["originator"] == "tests" and record["is_local_superuser"] is True
    s.xenapi.session.logout()


def test_bad_password(sim: Sim) -> None:
    s = XenAPI.Session(sim.urls[0])
    with pytest.raises(XenAPI.Failure) as exc:
        s.xenapi.login_with_password("root", "wrong", "1.0", "tests")
    assert failure(exc) == ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"]
    assert "wrong" not in str(exc.value)


def test_session_invalid_raw_and_sdk_relogin(sim: Sim) -> None:
    reply = sim.raw().VM.get_all("OpaqueRef:nonsense")
    assert reply == {"Status": "Failure", "ErrorDescription": ["SESSION_INVALID", "OpaqueRef:nonsense"]}
    s = sim.session()
    old = s._session
    sim.raw().session.logout(old)
    assert isinstance(s.xenapi.VM.get_all(), list)  # the SDK silently logged in again
    assert s._session != old


def test_envelope_types(sim: Sim) -> None:
    ref = login_raw(sim)
    body = xmlrpc.client.dumps((ref,), "VM.get_all_records").encode()
    status, headers, data = post(sim, "/", body)
    assert status == 200 and headers["Content-Type"] == "text/xml"
    assert headers["Access-Control-Allow-Origin"] == "*"
    text = data.decode()
    assert "<member><name>Status</name><value>Success</value></member>" in text
    assert "<fault>" not in text and "<string>" not in text and "<int>" not in text
    assert "<value>1073741824</value>" in text  # int64 as an untyped string
    assert "<dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601>" in text
    assert "<boolean>0</boolean>" in text
    s = sim.session()
    vm = first_vm(s.xenapi)
    assert s.xenapi.VM.get_memory_static_max(vm) == "1073741824"
    assert s.xenapi.VM.get_VCPUs_max(vm) == "2"
    assert s.xenapi.VM.get_HVM_shadow_multiplier(vm) == 1.0
    void = sim.raw().VM.set_name_description(ref, vm, "described")
    assert void == {"Status": "Success", "Value": ""}


def test_ints_accepted_as_strings_or_ints(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x, "vm1")
    x.VM.set_start_delay(vm, "7")
    assert x.VM.get_start_delay(vm) == "7"
    x.VM.set_start_delay(vm, 3)
    assert x.VM.get_start_delay(vm) == "3"
    proxy = sim.raw()
    ref = login_raw(sim)
    body = (
        f"<?xml version='1.0'?><methodCall><methodName>VM.set_order</methodName><params>"
        f"<param><value>{ref}</value></param><param><value>{vm}</value></param>"
        f"<param><value><i8>5</i8></value></param></params></methodCall>"
    ).encode()
    status, _, data = post(sim, "/RPC2", body)
    assert status == 200 and b"Success" in data
    assert x.VM.get_order(vm) == "5"
    assert proxy.VM.get_order(ref, vm)["Value"] == "5"


def test_paths_rpc2_and_slash_and_other(sim: Sim) -> None:
    ref = login_raw(sim)
    for path in ("/", "/RPC2", "/anything"):
        reply = xmlrpc.client.ServerProxy(sim.urls[0] + path).pool.get_all(ref)
        assert reply["Status"] == "Success" and len(reply["Value"]) == 1


def test_handle_invalid(sim: Sim) -> None:
    x = sim.session().xenapi
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.get_record("OpaqueRef:NULL")
    assert failure(exc) == ["HANDLE_INVALID", "VM", "OpaqueRef:NULL"]
    vm = first_vm(x)
    uuid = x.VM.get_uuid(vm)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VDI.get_record(uuid)  # a UUID where a ref is expected is just a bad ref
    assert failure(exc) == ["HANDLE_INVALID", "VDI", uuid]


def test_uuid_invalid(sim: Sim) -> None:
    x = sim.session().xenapi
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.get_by_uuid("00000000-0000-0000-0000-000000000000")
    assert failure(exc) == ["UUID_INVALID", "VM", "00000000-0000-0000-0000-000000000000"]


def test_method_unknown(sim: Sim) -> None:
    x = sim.session().xenapi
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.fly_to_the_moon("x")
    assert failure(exc) == ["MESSAGE_METHOD_UNKNOWN", "VM.fly_to_the_moon"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.Async.VM.fly_to_the_moon("x")
    assert failure(exc) == ["MESSAGE_METHOD_UNKNOWN", "VM.fly_to_the_moon"]
    # the session is checked first when there is one
    reply = sim.raw().Nope.nothing("OpaqueRef:bad")
    assert reply["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:bad"]


def test_parameter_count_mismatch(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start(vm)
    assert failure(exc) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.start", "3", "1"]
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.get_record()
    assert failure(exc) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record", "1", "0"]
    # trailing defaulted params may be omitted
    reply = sim.raw().session.login_with_password("root", sim.password)
    assert reply["Status"] == "Success"


def test_unmarshal_error_is_internal_error(sim: Sim) -> None:
    x = sim.session().xenapi
    vm = first_vm(x)
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.start(vm, "yes", False)
    assert exc.value.details[0] == "INTERNAL_ERROR" and len(exc.value.details) == 2
    with pytest.raises(XenAPI.Failure) as exc:
        x.VM.add_to_blocked_operations(vm, "fly", "msg")  # not a vm_operations value
    assert exc.value.details[0] == "INTERNAL_ERROR"


def test_alternative_names_and_no_async(sim: Sim) -> None:
    s = sim.session()
    ref = s._session
    reply = sim.raw().VM_get_all(ref)
    assert reply["Status"] == "Success"
    with pytest.raises(XenAPI.Failure) as exc:
        s.xenapi.Async.VM.get_all()
    assert failure(exc) == ["Fault", "No async mode for this operation (rpc: VM.get_all)"]


def test_system_methods_and_malformed_body(sim: Sim) -> None:
    methods = sim.raw().system.listMethods()
    assert "VM.snapshot" in methods and "VDI.copy" in methods
    status, headers, data = post(sim, "/", b"<methodCall><methodName>x</methodName></methodCall")
    assert status == 500 and b"HTTP 500" in data and headers["Connection"] == "close"


def jsonrpc(sim: Sim, doc: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    status, headers, data = post(sim, "/jsonrpc", json.dumps(doc).encode(), "application/json")
    return status, headers, json.loads(data) if status == 200 else data


def test_jsonrpc_v1_and_v2(sim: Sim) -> None:
    status, headers, doc = jsonrpc(
        sim, {"method": "session.login_with_password", "params": ["root", sim.password], "id": 1}
    )
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert doc["error"] is None and doc["id"] == 1
    ref = doc["result"]
    _, _, doc = jsonrpc(sim, {"jsonrpc": "2.0", "method": "VM.get_all_records", "params": [ref], "id": "a"})
    records = doc["result"]
    vm = next(v for v in records.values() if v["name_label"] == "vm0")
    assert vm["memory_static_max"] == 1073741824  # a JSON number, not a string
    assert vm["snapshot_time"] == "19700101T00:00:00Z"
    _, _, doc = jsonrpc(sim, {"method": "VM.get_record", "params": [ref, "OpaqueRef:x"], "id": 2})
    assert doc == {"result": None, "error": ["HANDLE_INVALID", "VM", "OpaqueRef:x"], "id": 2}
    _, _, doc = jsonrpc(
        sim, {"jsonrpc": "2.0", "method": "VM.get_record", "params": [ref, "OpaqueRef:x"], "id": 0}
    )
    assert doc == {
        "jsonrpc": "2.0",
        "error": {"code": 1, "message": "HANDLE_INVALID", "data": ["VM", "OpaqueRef:x"]},
        "id": 0,
    }
    status, _, _ = jsonrpc(sim, {"method": "VM.get_all", "params": [ref]})  # no id: notification
    assert status == 500


def test_xmlrpc_session_valid_over_jsonrpc(sim: Sim) -> None:
    s = sim.session()
    _, _, doc = jsonrpc(sim, {"method": "pool.get_all", "params": [s._session], "id": 3})
    assert doc["result"] == s.xenapi.pool.get_all()


def test_concurrent_keepalive_sessions(sim: Sim) -> None:
    sessions = [sim.session() for _ in range(4)]
    results: list[int] = []

    def work(s: Any) -> None:
        for _ in range(5):
            results.append(len(s.xenapi.VM.get_all()))

    threads = [threading.Thread(target=work, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 20 and len(set(results)) == 1


def test_async_modes_follow_datamodel_flags(sim: Sim) -> None:
    s = sim.session()
    vm = first_vm(s.xenapi)
    with pytest.raises(XenAPI.Failure) as exc:
        s.xenapi.Async.VM.set_VCPUs_max(vm, "2")  # flagged without `Async in datamodel_vm.ml
    assert failure(exc) == ["Fault", "No async mode for this operation (rpc: VM.set_VCPUs_max)"]
    with pytest.raises(XenAPI.Failure) as exc:
        s.xenapi.Async.task.create("t", "")
    assert failure(exc) == ["Fault", "No async mode for this operation (rpc: task.create)"]
    task = s.xenapi.Async.VM.set_order(vm, "1")  # custom setter with an async mode
    assert task.startswith("OpaqueRef:")
    # the session is checked before the async mode
    reply = sim.raw().Async.VM.get_all("OpaqueRef:nope")
    assert reply["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:nope"]


def test_password_never_echoed(sim: Sim) -> None:
    reply = sim.raw().session.login_with_password("root", ["s3cret-in-a-list"])
    assert reply["ErrorDescription"][0] == "INTERNAL_ERROR"
    assert "s3cret" not in str(reply)
