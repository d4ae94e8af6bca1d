"""Property tests: random write sequences into random chains (1-4 layers, 4-16 MiB, block sizes
4 KiB to 2 MiB), checked against an in-memory model: read-through and export/apply streams."""

from __future__ import annotations

import hashlib
import os
import tempfile

from chainmodel import Scenario, build, scenarios, writes
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


def raw_file(path: str, content: bytes | bytearray) -> str:
    with open(path, "wb") as f:
        f.write(content)
    return path


@SETTINGS
@given(s=scenarios(), data=st.data())
def test_chain_reads_match_model(s: Scenario, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as d:
        built = build(s, d)
        for path, model in zip(built.paths, built.models, strict=True):
            assert eng.check(path) == []
            assert batmap_consistency_errors(path) == []
            assert eng.virtual_size(path) == s.size
            assert eng.sha256(path) == sha(model)
        leaf, model = built.leaf, built.models[-1]
        for _ in range(4):
            off = data.draw(st.integers(0, s.size))
            length = data.draw(st.integers(0, min(s.size - off, 3 << 20)))
            assert eng.read(leaf, off, length) == bytes(model[off : off + length])


@SETTINGS
@given(s=scenarios(), data=st.data())
def test_full_stream_matches_model(s: Scenario, data: st.DataObject) -> None:
    skip_zero = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as d:
        built = build(s, d)
        full = os.path.join(d, "full.vhd")
        report = eng.export_stream(built.leaf, full, skip_zero_blocks=skip_zero)
        assert (
            report["bytes_out"]
            == os.path.getsize(full)
            == eng.stream_length(built.leaf, skip_zero_blocks=skip_zero)
        )
        assert eng.sha256(full) == sha(built.models[-1])
        target = os.path.join(d, "target.raw")
        with open(target, "wb") as f:
            f.truncate(s.size)
        eng.apply_stream(full, target, target_format="raw", require_full_bitmaps=True)
        with open(target, "rb") as f:
            assert sha(f.read()) == sha(built.models[-1])


@SETTINGS
@given(s=scenarios(min_layers=2), data=st.data())
def test_delta_stream_applied_on_base_matches_model(s: Scenario, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as d:
        built = build(s, d)
        j = data.draw(st.integers(0, len(built.paths) - 2), label="base layer")
        base, leaf = built.paths[j], built.leaf
        delta = os.path.join(d, "delta.vhd")
        report = eng.export_stream(leaf, delta, base)
        assert report["disk_type"] == "differencing"
        assert report["bytes_out"] == os.path.getsize(delta) == eng.stream_length(leaf, base)
        # Raw import onto the base's content, as XAPI does onto the previous replica.
        target = raw_file(os.path.join(d, "replica.raw"), built.models[j])
        eng.apply_stream(delta, target, target_format="raw", require_full_bitmaps=True)
        with open(target, "rb") as f:
            assert sha(f.read()) == sha(built.models[-1])
        # The stream is a differencing VHD of the base, and the transform passes it unchanged.
        assert eng.sha256(delta, [base, *reversed(built.paths[:j])]) == sha(built.models[-1])
        out = os.path.join(d, "out.vhd")
        t = eng.transform(delta, out)
        assert t["blocks"] == report["blocks"]
        with open(delta, "rb") as a, open(out, "rb") as b:
            assert a.read() == b.read()


@SETTINGS
@given(s=scenarios(min_layers=2), data=st.data())
def test_delta_applied_into_a_vhd_clone_matches_model(s: Scenario, data: st.DataObject) -> None:
    """Replication onto a file SR: the delta goes into a fresh differencing child (clone) of the
    previous replica, which must then read as the source leaf."""
    with tempfile.TemporaryDirectory() as d:
        built = build(s, d)
        j = data.draw(st.integers(0, len(built.paths) - 2), label="base layer")
        delta = os.path.join(d, "delta.vhd")
        eng.export_stream(built.leaf, delta, built.paths[j])
        clone = os.path.join(d, "clone.vhd")
        eng.create(clone, s.size, parent=built.paths[j], block_size=s.block_size)
        eng.apply_stream(delta, clone, target_format="vhd", require_full_bitmaps=True)
        assert eng.check(clone) == []
        assert batmap_consistency_errors(clone) == []
        assert eng.sha256(clone) == sha(built.models[-1])
        # The replica's own nodes are untouched.
        for path, model in zip(built.paths[: j + 1], built.models, strict=False):
            assert eng.sha256(path) == sha(model)


@SETTINGS
@given(s=scenarios(max_layers=1), data=st.data())
def test_delta_between_siblings_matches_model(s: Scenario, data: st.DataObject) -> None:
    """Two snapshots' children of one base (siblings): b's delta against a, applied onto a's
    content, yields b's (the stream carries the symmetric difference of the two chains)."""
    with tempfile.TemporaryDirectory() as d:
        built = build(s, d)
        base, models = built.paths[0], {}
        for name in ("a", "b"):
            path = os.path.join(d, f"{name}.vhd")
            eng.create(path, s.size, parent=base, block_size=s.block_size)
            model = bytearray(built.models[0])
            for w in data.draw(st.lists(writes(s.size, s.block_size), max_size=5), label=name):
                payload = w.data()
                eng.write(path, w.offset, payload)
                model[w.offset : w.offset + w.length] = payload
            models[name] = (path, model)
        (a, model_a), (b, model_b) = models["a"], models["b"]
        delta = os.path.join(d, "delta.vhd")
        eng.export_stream(b, delta, a)
        target = raw_file(os.path.join(d, "a.raw"), model_a)
        eng.apply_stream(delta, target, target_format="raw")
        with open(target, "rb") as f:
            assert sha(f.read()) == sha(model_b)


@SETTINGS
@given(s=scenarios(), data=st.data())
def test_convert_round_trips_match_model(s: Scenario, data: st.DataObject) -> None:
    """Chain -> raw -> dynamic (any block size) / fixed -> raw all keep the content, and a
    dynamic output allocates exactly the blocks that hold a non-zero byte."""
    out_bs = data.draw(st.sampled_from([4096, 64 << 10, 1 << 20, 2 << 20]), label="output block size")
    with tempfile.TemporaryDirectory() as d:
        built = build(s, d)
        model = built.models[-1]
        raw = os.path.join(d, "flat.raw")
        eng.convert(built.leaf, raw, src_format="vhd", dst_format="raw")
        with open(raw, "rb") as f:
            assert sha(f.read()) == sha(model)
        dyn, fixed = os.path.join(d, "dyn.vhd"), os.path.join(d, "fixed.vhd")
        eng.convert(raw, dyn, src_format="raw", dst_format="dynamic", block_size=out_bs)
        eng.convert(raw, fixed, src_format="raw", dst_format="fixed")
        for path in (dyn, fixed):
            assert eng.check(path) == []
            assert eng.sha256(path) == sha(model)
        nonzero = sum(1 for i in range(0, s.size, out_bs) if any(model[i : i + out_bs]))
        blocks = eng.info(dyn)["blocks"]
        assert blocks["allocated_blocks"] == nonzero
        assert blocks["total_blocks"] == -(-s.size // out_bs)
