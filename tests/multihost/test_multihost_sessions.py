"""Sessions on pools of several hosts (plain HTTP): a login on a member follows HOST_IS_SLAVE to
the master, the hosts are recorded after a configured login, a run after the master moved
follows it and is a delta, a run with the configured master down goes through a recorded host,
and `xencr pool test` lists the hosts and where each SR is plugged."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xmlrpc.server import SimpleXMLRPCServer

import pytest
from multihosttest import (
    JOB,
    PASSWORD,
    VM,
    Pools,
    guest_write,
    replica_equals_snapshot,
    write_config,
    xencr,
)

from xencr.xapi.errors import PoolDown, PoolUnreachable
from xencr.xapi.session import Endpoint, XapiSession


def login(url: str, name: str = "") -> XapiSession:
    return XapiSession(Endpoint(url, name=name), "root", PASSWORD, retries=0)


def test_login_on_a_member_follows_to_the_master(pools: Pools) -> None:
    m0, m1, m2 = (pools.url(0, j) for j in range(3))
    with login(m1, "a") as s:
        assert s.endpoint.url == m0 and s.configured.url == m1
        assert s.endpoint.where == f"pool 'a' ({m0})"  # errors and data transfers: where it is now
        assert s.followed == [f"pool 'a': {m1} is not the master; followed to {m0}"]
        assert s.api.host.get_name_label(s.api.pool.get_master(s.api.pool.get_all()[0])) == "sim-host-0-0"
        hosts = s.pool_hosts()
    with login(m2) as s:
        assert s.followed == [f"{m2} is not the master; followed to {m0}"]
    with login(m0, "a") as s:
        assert s.followed == [] and s.endpoint.url == m0
    assert hosts.pool_uuid == pools.pool_uuids[0]
    assert not hosts.verified  # plain HTTP verifies nothing: its fingerprints are never trusted
    assert [(h.name, h.address, h.master, h.enabled, h.fingerprint) for h in hosts.hosts] == [
        (f"sim-host-0-{j}", pools.address(0, j), j == 0, True, pools.fingerprint(0, j)) for j in range(3)
    ]


def test_master_down_without_an_election_is_one_line(pools: Pools) -> None:
    pools.host_down(0, 0)
    with pytest.raises(PoolDown) as e:
        login(pools.url(0, 1), "a")
    a0, a1 = pools.url(0, 0), pools.url(0, 1)
    assert str(e.value) == f"pool 'a': {a1} is not the master; the master it names, {a0}: connection refused"


@contextmanager
def slaves(count: int, names: list[int]) -> Iterator[list[str]]:
    """``count`` XML-RPC servers whose login answers HOST_IS_SLAVE naming server ``names[i]``."""
    servers = [SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False) for _ in range(count)]
    urls = [f"http://127.0.0.1:{srv.server_address[1]}" for srv in servers]
    for srv, named in zip(servers, names, strict=True):
        address = f"127.0.0.1:{servers[named].server_address[1]}"
        srv.register_function(
            lambda *_, a=address: {"Status": "Failure", "ErrorDescription": ["HOST_IS_SLAVE", a]},
            "session.login_with_password",
        )
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    try:
        yield urls
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


def test_a_host_is_slave_loop_and_a_long_chain_are_refused() -> None:
    with slaves(2, [1, 0]) as (u0, u1), pytest.raises(PoolUnreachable) as e:
        login(u0, "x")
    assert str(e.value) == f"pool 'x': HOST_IS_SLAVE loop: {u0} -> {u1} -> {u0}"
    with slaves(5, [1, 2, 3, 4, 0]) as urls, pytest.raises(PoolUnreachable) as e:
        login(urls[0])
    assert str(e.value) == f"no master after 3 HOST_IS_SLAVE answers: {' -> '.join(urls)}"


def _ok_line(out: str, kind: str) -> str:
    """The restore point of the run's one VM/target line, checking the line's form and kind."""
    (line,) = [x for x in out.splitlines() if x.startswith(f"{VM} -> b/")]
    assert line.startswith(f"{VM} -> b/Second storage: ok, restore point ") and line.endswith(kind), out
    return line.split("restore point ")[1].split(",")[0]


def test_run_after_the_master_moved_follows_and_is_a_delta(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools)
    code, out, err = xencr("run", JOB, "--config", str(cfg))
    assert code == 0, out + err
    replica_equals_snapshot(pools, _ok_line(out, "full (first run)"))
    record = json.loads((tmp_path / "hosts" / "a.json").read_text())
    assert [(h["name"], h["address"], h["master"]) for h in record["hosts"]] == [
        (f"sim-host-0-{j}", pools.address(0, j), j == 0) for j in range(3)
    ]
    assert record["pool_uuid"] == pools.pool_uuids[0] and record["verified"] is False
    assert PASSWORD not in (tmp_path / "hosts" / "a.json").read_text()
    assert "OpaqueRef" not in (tmp_path / "hosts" / "a.json").read_text()  # no session, no ref

    pools.move_master(0, 1)
    guest_write(pools, "after-move")
    code, out, err = xencr("run", JOB, "--config", str(cfg))
    assert code == 0, out + err
    assert f"  warning: pool 'a': {pools.url(0, 0)} is not the master; followed to {pools.url(0, 1)}" in (
        out.splitlines()
    )
    replica_equals_snapshot(pools, _ok_line(out, "delta"))
    record = json.loads((tmp_path / "hosts" / "a.json").read_text())
    assert [h["name"] for h in record["hosts"] if h["master"]] == ["sim-host-0-1"]


def test_run_with_the_master_down_goes_through_a_recorded_member(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools)
    code, out, err = xencr("run", JOB, "--config", str(cfg))
    assert code == 0, out + err
    # The master moves to host 2, then host 0 goes down: host 1 (recorded as a member) is tried
    # first and names the new master.
    pools.move_master(0, 2)
    guest_write(pools, "master-down")
    pools.host_down(0, 0)
    code, out, err = xencr("run", JOB, "--config", str(cfg), "--json")
    assert code == 0, out + err
    target = json.loads(out)["vms"][0]["targets"][0]
    a0, a1, a2 = (pools.url(0, j) for j in range(3))
    assert target["warnings"] == [
        f"pool 'a': {a0} unreachable (connection refused); reached the pool through recorded member {a1}",
        f"pool 'a': {a1} is not the master; followed to {a2}",
    ]
    assert target["kind"] == "delta"
    replica_equals_snapshot(pools, target["restore_point"])


def test_a_recorded_member_of_another_pool_is_not_used(pools: Pools, tmp_path: Path) -> None:
    """A recorded address now answering for another pool (pool 1's host 1 here) is refused."""
    known = pools.known(0)
    moved = dataclasses.replace(known.hosts[1], address=pools.address(1, 1))
    endpoint = Endpoint(
        pools.url(0, 0), name="a", known=dataclasses.replace(known, hosts=(known.hosts[0], moved))
    )
    pools.host_down(0, 0)
    with pytest.raises(PoolUnreachable) as e:
        XapiSession(endpoint, "root", PASSWORD, retries=0)
    assert str(e.value) == (
        f"pool 'a' ({pools.url(0, 0)}): connection refused; recorded member {pools.url(1, 1)}: now a host "
        f"of pool {pools.pool_uuids[1]}, not of this pool ({pools.pool_uuids[0]})"
    )


def test_pool_test_lists_hosts_and_where_each_sr_is_plugged(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools)
    with pools.session(0) as s:
        s.api.host.disable(pools.host_ref(s, 2))
        srs = {r["name_label"]: r["uuid"] for r in s.api.SR.get_all_records().values()}
    code, out, err = xencr("pool", "test", "a", "--config", str(cfg))
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith("a: pool ") and lines[0].endswith(", master 'sim-host-0-0', XAPI 2.21: ok")
    for j, state in enumerate(["master, enabled", "member, enabled", "member, disabled"]):
        i = lines.index(f"  host sim-host-0-{j} ({pools.address(0, j)}): {state}")
        assert lines[i + 1] == f"    certificate {pools.shown(0, j)}: not checked (plain HTTP)"
    i = next(
        k
        for k, x in enumerate(lines)
        if x.startswith(f"  SR {'Second storage'} (nfs, {srs['Second storage']}): ")
    )
    assert lines[i + 1] == "    plugged on sim-host-0-0, sim-host-0-1, sim-host-0-2"
    i = next(k for k, x in enumerate(lines) if x.startswith("  SR Local storage on sim-host-0-1 (ext, "))
    assert lines[i + 1] == "    plugged on sim-host-0-1"
    code, out, _ = xencr("pool", "test", "a", "--config", str(cfg), "--json")
    info = json.loads(out)
    assert info["hosts"][2] == {
        "name": "sim-host-0-2",
        "uuid": info["hosts"][2]["uuid"],
        "address": pools.address(0, 2),
        "enabled": False,
        "role": "member",
        "certificate": pools.shown(0, 2),
        "presented": None,
        "certificate_check": "not checked",
        "certificate_error": "plain HTTP",
    }
    assert {s["name"]: s["hosts"] for s in info["srs"]}["iSCSI storage"] == [
        f"sim-host-0-{j}" for j in range(3)
    ]
    assert info["followed"] == [] and info["url"] == pools.url(0, 0)
