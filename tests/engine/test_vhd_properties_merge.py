"""Property tests of coalesce and diff against the in-memory model of random chains."""

from __future__ import annotations

import hashlib
import os
import tempfile

from chainmodel import KiB, MiB, Scenario, build, scenarios
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhdtest import batmap_consistency_errors

from xencr import _engine as eng

SETTINGS = settings(
    max_examples=int(os.environ.get("XENCR_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def changed_units(a: bytes | bytearray, b: bytes | bytearray, g: int) -> list[int]:
    return [u for u in range(-(-len(a) // g)) if a[u * g : (u + 1) * g] != b[u * g : (u + 1) * g]]


@SETTINGS
@given(s=scenarios(min_layers=2), data=st.data())
def test_coalesce_matches_model(s: Scenario, data: st.DataObject) -> None:
    """Merge any node into its parent (repeatedly): every remaining node reads as before."""
    with tempfile.TemporaryDirectory() as d:
        built = build(s, d)
        paths, models = list(built.paths), list(built.models)
        while len(paths) > 1:
            k = data.draw(st.integers(1, len(paths) - 1), label="merged node")
            parent_uuid = eng.info(paths[k - 1])["footer"]["uuid"]
            child_uuid = eng.info(paths[k])["footer"]["uuid"]
            report = eng.coalesce(paths[k])
            assert report["result"] == paths[k]
            assert not report["resumed"]
            assert not os.path.exists(paths[k - 1]), "the parent is renamed over the child"
            assert eng.info(paths[k])["footer"]["uuid"] == child_uuid != parent_uuid
            del paths[k - 1], models[k - 1]
            assert [os.path.normpath(p) for p in eng.chain(paths[-1])] == list(reversed(paths))
            for path, model in zip(paths, models, strict=True):
                assert eng.check(path) == []
                assert eng.sha256(path) == sha(model)
                assert batmap_consistency_errors(path) == []
        assert not [n for n in os.listdir(d) if "merge" in n], "no merge state left behind"


@SETTINGS
@given(s=scenarios(), data=st.data())
def test_diff_matches_model(s: Scenario, data: st.DataObject) -> None:
    g = data.draw(st.sampled_from([64 * KiB, 2 * MiB, 4 * KiB]), label="granularity")
    with tempfile.TemporaryDirectory() as d:
        built = build(s, d)
        i = data.draw(st.integers(0, len(built.paths) - 1), label="a")
        j = data.draw(st.integers(0, len(built.paths) - 1), label="b")
        a, b = built.paths[i], built.paths[j]
        expected = changed_units(built.models[i], built.models[j], g)
        report = eng.diff(a, b, granularity=g)
        assert report["granularity"] == g
        assert report["virtual_size"] == s.size
        assert report["units"] == -(-s.size // g)
        assert report["changed"] == expected
        assert report["changed_bytes"] == sum(min(g, s.size - u * g) for u in expected)
        # The same comparison against a raw copy of a (no shared layers: content only).
        raw_a = os.path.join(d, "a.raw")
        with open(raw_a, "wb") as f:
            f.write(built.models[i])
        assert eng.diff(raw_a, b, granularity=g, a_format="raw")["changed"] == expected


@SETTINGS
@given(s=scenarios(), data=st.data())
def test_diff_stream_turns_a_into_b(s: Scenario, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as d:
        built = build(s, d)
        i = data.draw(st.integers(0, len(built.paths) - 1), label="a")
        j = data.draw(st.integers(0, len(built.paths) - 1), label="b")
        g = data.draw(st.sampled_from([64 * KiB, 2 * MiB]), label="granularity")
        stream = os.path.join(d, "diff.vhd")
        report = eng.diff_stream(built.paths[i], built.paths[j], stream, granularity=g)
        assert report["bytes_out"] == os.path.getsize(stream)
        target = os.path.join(d, "target.raw")
        with open(target, "wb") as f:
            f.write(built.models[i])
        eng.apply_stream(stream, target, target_format="raw")
        with open(target, "rb") as f:
            assert sha(f.read()) == sha(built.models[j])
