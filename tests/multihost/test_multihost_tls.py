"""Sessions on pools of several hosts over TLS, each host with its own certificate: a pool pinned
by its master's certificate follows a moved master and goes through a recorded host with the
certificates the pool named over a verified session, refuses a master it never saw with one line,
verifies every host with the system CAs when not pinned; `xencr pool test` shows what each host
presents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multihosttest import (
    JOB,
    PASSWORD,
    Pools,
    guest_write,
    replica_equals_snapshot,
    write_config,
    xencr,
)

from xencr.xapi.errors import PoolUnreachable
from xencr.xapi.session import Endpoint, XapiSession


def test_a_pinned_pool_follows_its_master_and_goes_through_recorded_members(
    tls_pools: Pools, tmp_path: Path
) -> None:
    pools = tls_pools
    a0, a1 = pools.url(0, 0), pools.url(0, 1)
    assert a0.startswith("https://")
    cfg = write_config(tmp_path, pools, pinned=True)
    code, out, err = xencr("run", JOB, "--config", str(cfg), "--json")
    assert code == 0, out + err
    target = json.loads(out)["vms"][0]["targets"][0]
    assert target["kind"] == "full" and target["warnings"] == []
    replica_equals_snapshot(pools, target["restore_point"])
    record = json.loads((tmp_path / "hosts" / "a.json").read_text())
    assert record["verified"] is True  # read over a session pinned by host 0's certificate
    assert [h["fingerprint"] for h in record["hosts"]] == [pools.fingerprint(0, j) for j in range(3)]

    # Host 0 (still presenting the pinned certificate) is now a member: host 1 is trusted with
    # the certificate the pool named for it, without a prompt.
    pools.move_master(0, 1)
    guest_write(pools, "tls-moved")
    code, out, err = xencr("run", JOB, "--config", str(cfg), "--json")
    assert code == 0, out + err
    target = json.loads(out)["vms"][0]["targets"][0]
    assert target["warnings"] == [f"pool 'a': {a0} is not the master; followed to {a1}"]
    assert target["kind"] == "delta"
    replica_equals_snapshot(pools, target["restore_point"])

    # Host 0 down: the recorded master (host 1) is reached directly, with its recorded certificate.
    guest_write(pools, "tls-down")
    pools.host_down(0, 0)
    code, out, err = xencr("run", JOB, "--config", str(cfg), "--json")
    assert code == 0, out + err
    target = json.loads(out)["vms"][0]["targets"][0]
    assert target["warnings"] == [
        f"pool 'a': {a0} unreachable (connection refused); reached the pool through recorded member {a1}"
    ]
    assert target["kind"] == "delta"
    replica_equals_snapshot(pools, target["restore_point"])


def test_a_pinned_pool_refuses_a_master_no_verified_session_named(tls_pools: Pools, tmp_path: Path) -> None:
    pools = tls_pools
    a0, a1 = pools.url(0, 0), pools.url(0, 1)
    cfg = write_config(tmp_path, pools, pinned=True)
    pools.move_master(0, 1)
    code, out, err = xencr("pool", "test", "a", "--config", str(cfg))
    assert (code, out) == (1, "")
    assert err == (
        f"xencr: error: pool 'a': {a0} is not the master; the master it names, {a1}: certificate "
        f"fingerprint {pools.shown(0, 1)} is not the pinned {pools.shown(0, 0)}: no certificate recorded "
        f"for that host by a verified session; check it, then pin it with `xencr pool add a {a1} --replace`\n"
    )
    assert not (tmp_path / "hosts").exists()


def test_system_cas_verify_the_master_it_follows_to(
    tls_pools: Pools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pools = tls_pools
    a0, a1 = pools.url(0, 0), pools.url(0, 1)
    pools.move_master(0, 1)
    bundle = tmp_path / "cas.pem"
    bundle.write_text(pools.sim.certificate(0, 0).read_text())  # host 0 only, for now
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with pytest.raises(PoolUnreachable) as e:
        XapiSession(Endpoint(a0, name="a"), "root", PASSWORD, retries=0)
    assert str(e.value).startswith(
        f"pool 'a': {a0} is not the master; the master it names, {a1}: TLS: CERTIFICATE_VERIFY_FAILED"
    )
    bundle.write_text(pools.sim.certificate(0, 0).read_text() + pools.sim.certificate(0, 1).read_text())
    with XapiSession(Endpoint(a0, name="a"), "root", PASSWORD, retries=0) as s:
        assert s.endpoint == Endpoint(a1, None, True, "a")  # verified by the CAs, as configured
        assert s.followed == [f"pool 'a': {a0} is not the master; followed to {a1}"]
        assert s.pool_hosts().verified


def test_pool_test_shows_the_certificate_each_host_presents(tls_pools: Pools, tmp_path: Path) -> None:
    pools = tls_pools
    cfg = write_config(tmp_path, pools, pinned=True)
    pools.host_down(0, 2)
    code, out, err = xencr("pool", "test", "a", "--config", str(cfg))
    assert code == 0, out + err
    lines = out.splitlines()
    for j in (0, 1):
        i = lines.index(
            f"  host sim-host-0-{j} ({pools.address(0, j)}): {'master' if j == 0 else 'member'}, enabled"
        )
        assert lines[i + 1] == f"    certificate {pools.shown(0, j)}: presented"
    i = lines.index(f"  host sim-host-0-2 ({pools.address(0, 2)}): member, enabled")
    # an offline host: the pool cannot name its certificate (HOST_OFFLINE), and it does not answer
    assert (
        lines[i + 1]
        == f"    certificate none named by the pool: not checked ({pools.address(0, 2)}: connection refused)"
    )
    code, out, _ = xencr("pool", "test", "a", "--config", str(cfg), "--json")
    hosts = json.loads(out)["hosts"]
    assert [(h["certificate"], h["presented"], h["certificate_check"]) for h in hosts] == [
        (pools.shown(0, 0), pools.shown(0, 0), "ok"),
        (pools.shown(0, 1), pools.shown(0, 1), "ok"),
        (None, None, "not checked"),
    ]
