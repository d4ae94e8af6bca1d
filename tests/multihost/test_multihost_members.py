"""The record of a pool's hosts (`xencr.xapi.members`): URLs from XAPI's host addresses, an
atomic file that round-trips and is not rewritten when unchanged, a damaged one ignored; the
fingerprint of the first certificate of a PEM chain."""

from __future__ import annotations

import hashlib
import os
import ssl
from pathlib import Path

from xencr.sim.tls import ensure_certificate
from xencr.xapi import members
from xencr.xapi.members import PoolHost, PoolHosts, host_url, hosts_path, same_place
from xencr.xapi.tls import pem_fingerprint


def test_host_urls_from_xapi_addresses() -> None:
    assert host_url("https", "10.0.0.2") == "https://10.0.0.2"
    assert host_url("https", "fd00::2") == "https://[fd00::2]"  # as xapi's maybe_wrap_IPv6_literal
    assert host_url("http", "127.0.0.1:8481") == "http://127.0.0.1:8481"  # the simulator's form
    assert same_place("https://10.0.0.2", "https://10.0.0.2:443")
    assert not same_place("http://127.0.0.1:8481", "http://127.0.0.1:8482")


def test_record_round_trip_atomic_and_unchanged(tmp_path: Path) -> None:
    path = hosts_path(tmp_path / "state.sqlite", "site/a")
    assert path == tmp_path / "hosts" / "site%2Fa.json"
    hosts = PoolHosts(
        "pool-uuid",
        (
            PoolHost("u0", "h0", "10.0.0.2", True, True, "ab" * 32),
            PoolHost("u1", "h1", "fd00::3", False, False, None),
        ),
        verified=True,
    )
    members.save(path, hosts)
    assert members.load(path) == hosts
    inode = os.stat(path).st_ino
    members.save(path, hosts)  # the same hosts: the file is left as it is
    assert os.stat(path).st_ino == inode
    assert sorted(p.name for p in path.parent.iterdir()) == ["site%2Fa.json"]  # no temporary left
    assert hosts.fingerprint_at("https://10.0.0.2") == "ab" * 32
    assert hosts.fingerprint_at("https://[fd00::3]") is None
    unverified = PoolHosts(hosts.pool_uuid, hosts.hosts, verified=False)
    assert unverified.fingerprint_at("https://10.0.0.2") is None  # never trusted
    path.write_text('{"format": 1, "hosts": [')
    assert members.load(path) is None
    assert members.load(tmp_path / "none.json") is None


def test_fingerprint_of_the_first_certificate_of_a_chain(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first, _ = ensure_certificate(tmp_path / "one")
    second, _ = ensure_certificate(tmp_path / "two")
    pem = first.read_text()
    expected = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    assert pem_fingerprint(pem + second.read_text()) == expected
