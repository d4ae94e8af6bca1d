"""HTTPS pools: certificate pinning for the API and the data path (a TLS relay around the engine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_transfer import _new_vdi, _snap_disk
from xapitest import PASSWORD, Pools, run_sim

from xencr.xapi.errors import FingerprintMismatch, PoolUnreachable
from xencr.xapi.session import Endpoint, XapiSession
from xencr.xapi.transfer import copy_vdi, read_digests


@pytest.fixture(scope="module")
def tls_pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pools]:
    yield from run_sim(tmp_path_factory.mktemp("simtls"), tls=True)


def test_self_signed_refused_without_a_pin(tls_pools: Pools) -> None:
    assert tls_pools.urls[0].startswith("https://")
    with pytest.raises(PoolUnreachable) as e:
        XapiSession(Endpoint(tls_pools.urls[0]), "root", PASSWORD, retries=0)
    assert "certificate" in str(e.value).lower()


def test_wrong_pin_refused(tls_pools: Pools) -> None:
    with pytest.raises(FingerprintMismatch):
        XapiSession(Endpoint(tls_pools.urls[0], fingerprint="00" * 32), "root", PASSWORD, retries=0)


def test_pinned_transfer_over_tls(tls_pools: Pools) -> None:
    src, dst = tls_pools.session(0), tls_pools.session(1)
    vm = src.api.VM.get_by_name_label("vm1")[0]
    snap = src.call_async("VM.snapshot", vm, "tls")
    vdi = _snap_disk(src, snap)
    target = _new_vdi(dst, int(src.api.VDI.get_virtual_size(vdi)))
    report = copy_vdi(src, vdi, dst, target)
    assert report.kind == "full" and report.blocks > 0
    assert dst.api.sim.hash(dst.api.VDI.get_uuid(target)) == src.api.sim.hash(src.api.VDI.get_uuid(vdi))
    # Re-reading over TLS gives back the digests the transfer recorded.
    again = read_digests(dst, target)
    assert dict(again["digests"]) == dict(report.digests)
