"""The `xencr vhd` commands end to end: output content and exit codes (0 ok, 1 failure, 2 usage)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner
from vhdtest import BASE_EXTENTS, SPEC_BASE, SPEC_CHAIN, MiB, file_sha256, pattern_raw, sha256

from xencr import _engine as eng
from xencr.cli.app import app

BASE = "caml-dynamic-base.vhd"
CHILD = "caml-diff-child.vhd"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def chain(vectors: Path, tmp_path: Path) -> tuple[str, str]:
    for name in (BASE, CHILD):
        shutil.copy(vectors / name, tmp_path / name)
        (tmp_path / name).chmod(0o644)
    return str(tmp_path / CHILD), str(tmp_path / BASE)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("xencr: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_info_text_and_json(chain: tuple[str, str]) -> None:
    child, base = chain
    code, out, _ = run("vhd", "info", child, "--parent", base)
    assert code == 0
    assert "differencing" in out
    assert "header.parent_uuid" in out and "blocks.bitmap_partial" in out
    assert f"{child} <- {base}" in out
    code, out, _ = run("vhd", "info", child, "-p", base, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["chain"] == [child, base]
    assert data["blocks"]["bitmap_partial"] == 4
    assert data["header"]["parent_uuid"] == eng.info(base)["footer"]["uuid"]


def test_check_ok_and_bad(chain: tuple[str, str], tmp_path: Path) -> None:
    child, base = chain
    code, out, _ = run("vhd", "check", base, child)
    assert code == 0
    assert out.splitlines() == [f"{base}: ok", f"{child}: ok"]
    bad = tmp_path / "bad.vhd"
    data = bytearray(Path(base).read_bytes())
    data[512 + 40] ^= 0xFF  # inside the header: its checksum no longer matches
    bad.write_bytes(bytes(data))
    code, out, _ = run("vhd", "check", base, str(bad))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"{base}: ok"
    assert len(lines) >= 2 and all(line.startswith(f"{bad}: ") for line in lines[1:])
    assert "checksum" in out


def test_check_json(chain: tuple[str, str]) -> None:
    code, out, _ = run("vhd", "check", chain[1], "--json")
    assert code == 0
    assert json.loads(out) == {chain[1]: {"valid": True, "problems": []}}


def test_missing_file_is_one_line_exit_1(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.vhd")
    for args in (
        ["info", missing],
        ["cat", missing, "-o", str(tmp_path / "x")],
        ["stream", missing, "-o", "x"],
    ):
        code, _, err = run("vhd", *args)
        assert code == 1, args
        assert one_error_line(err) == f"xencr: error: no such file: {missing}"
    code, out, _ = run("vhd", "check", missing)
    assert code == 1
    assert out == f"no such file: {missing}\n"


def test_corrupt_file_is_one_line_exit_1(vectors: Path, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.vhd"
    bad.write_bytes((vectors / BASE).read_bytes()[:5000])
    code, _, err = run("vhd", "info", str(bad))
    assert code == 1
    line = one_error_line(err)
    assert "cookie" in line or "truncated" in line or "ends" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.vhd"
    bad.write_bytes(b"x" * 4096)
    result = CliRunner().invoke(app, ["--debug", "vhd", "info", str(bad)])
    assert isinstance(result.exception, eng.VhdError)


def test_usage_errors_exit_2(chain: tuple[str, str]) -> None:
    assert run("vhd", "info")[0] == 2
    assert run("vhd", "nosuchcommand")[0] == 2
    assert run("vhd", "diff", chain[0], chain[1], "--granularity", "3K")[0] == 2
    assert run("vhd", "convert", chain[1], "x", "--to", "qcow2")[0] == 2
    assert run("vhd", "info", chain[1], "--bogus")[0] == 2


@pytest.mark.parametrize("command", ["info", "check", "cat", "convert", "stream", "apply", "merge", "diff"])
def test_help_has_an_example(command: str) -> None:
    code, out, _ = run("vhd", command, "--help")
    assert code == 0
    assert f"Example:  xencr vhd {command}" in out


def test_top_level_help_and_version() -> None:
    code, out, _ = run("--help")
    assert code == 0 and "vhd" in out and "demo" in out
    code, out, _ = run("--version")
    assert code == 0 and out.startswith("xencr ")


def test_cat_to_file_and_stdout(chain: tuple[str, str], tmp_path: Path) -> None:
    child, base = chain
    out = tmp_path / "out.raw"
    code, _, _ = run("vhd", "cat", child, "-p", base, "-o", str(out))
    assert code == 0
    assert file_sha256(out) == SPEC_CHAIN
    result = CliRunner().invoke(app, ["vhd", "cat", base])
    assert result.exit_code == 0
    assert sha256(result.stdout_bytes) == SPEC_BASE


def test_cat_to_a_real_stdout(chain: tuple[str, str], tmp_path: Path) -> None:
    """Through a process, stdout is a file descriptor the engine writes to directly."""
    child, _ = chain
    with open(tmp_path / "out.raw", "wb") as f:
        done = subprocess.run(
            [sys.executable, "-m", "xencr.cli", "vhd", "cat", child], stdout=f, stderr=subprocess.PIPE
        )
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    assert file_sha256(tmp_path / "out.raw") == SPEC_CHAIN


def test_convert_round_trip(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(pattern_raw(16 * MiB, 0xBA5E, [(0, 100), (9000, 9)]))
    for to in ("dynamic", "fixed"):
        vhd = tmp_path / f"{to}.vhd"
        code, out, _ = run("vhd", "convert", str(raw), str(vhd), "--to", to)
        assert code == 0 and out.startswith(f"converted {raw} (raw) -> {vhd} ({to})")
        back = tmp_path / f"{to}.raw"
        code, _, _ = run("vhd", "convert", str(vhd), str(back), "--to", "raw")
        assert code == 0
        assert back.read_bytes() == raw.read_bytes()
    assert eng.info(str(tmp_path / "dynamic.vhd"))["blocks"]["allocated_blocks"] == 2


def test_stream_and_apply(chain: tuple[str, str], tmp_path: Path) -> None:
    child, base = chain
    delta = tmp_path / "delta.vhd"
    code, out, _ = run("vhd", "stream", child, "--base", base, "-o", str(delta))
    assert code == 0 and out.startswith("delta stream: ")
    assert delta.stat().st_size == eng.stream_length(child, base)
    replica = tmp_path / "replica.raw"
    replica.write_bytes(pattern_raw(64 * MiB, 0xBA5E, BASE_EXTENTS))
    code, out, _ = run("vhd", "apply", str(delta), str(replica), "--format", "raw")
    assert code == 0 and "5 blocks" in out
    assert file_sha256(replica) == SPEC_CHAIN
    # A VHD target is recognised by its footer.
    target = tmp_path / "replica.vhd"
    shutil.copy(base, target)
    code, _, _ = run("vhd", "apply", str(delta), str(target))
    assert code == 0
    assert eng.sha256(str(target)) == SPEC_CHAIN


def test_apply_corrupt_stream_is_one_line_exit_1(chain: tuple[str, str], tmp_path: Path) -> None:
    child, base = chain
    delta = tmp_path / "delta.vhd"
    eng.export_stream(child, str(delta), base)
    data = bytearray(delta.read_bytes())
    data[512 + 30] ^= 1
    delta.write_bytes(bytes(data))
    replica = tmp_path / "replica.raw"
    replica.write_bytes(bytes(64 * MiB))
    code, _, err = run("vhd", "apply", str(delta), str(replica), "--format", "raw")
    assert code == 1
    assert "checksum" in one_error_line(err)
    assert replica.read_bytes() == bytes(64 * MiB)


def test_full_stream_to_stdout_via_process(chain: tuple[str, str], tmp_path: Path) -> None:
    child, _ = chain
    with open(tmp_path / "full.vhd", "wb") as f:
        done = subprocess.run(
            [sys.executable, "-m", "xencr.cli", "vhd", "stream", child], stdout=f, stderr=subprocess.PIPE
        )
    assert done.returncode == 0, done.stderr
    assert b"full stream" in done.stderr
    assert eng.sha256(str(tmp_path / "full.vhd")) == SPEC_CHAIN


def test_merge(chain: tuple[str, str], tmp_path: Path) -> None:
    child, base = chain
    code, out, _ = run("vhd", "merge", child)
    assert code == 0, out
    assert out.startswith(f"merged {child} into {base}") and "5 blocks" in out
    assert not os.path.exists(base)
    assert eng.sha256(child) == SPEC_CHAIN
    code, _, err = run("vhd", "merge", child)
    assert code == 1
    assert "not a differencing disk" in one_error_line(err)


def test_merge_json(chain: tuple[str, str]) -> None:
    child, base = chain
    code, out, _ = run("vhd", "merge", child, "--parent", base, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["result"] == child and report["blocks_merged"] == 5


def test_diff(chain: tuple[str, str], tmp_path: Path) -> None:
    child, base = chain
    code, out, _ = run("vhd", "diff", base, child)
    assert code == 0
    assert out.splitlines()[0].startswith("5 of 32 units of 2.0 MiB differ")
    assert out.splitlines()[1] == "changed units: 1, 3, 5-6, 31"
    code, out, _ = run("vhd", "diff", base, child, "--granularity", "64K", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["granularity"] == 64 << 10 and report["units"] == 1024
    # The child's writes: sectors 4100+8, 12288+4096, 20490+20, 24576+8, 131064+8.
    assert report["changed"] == [32, *range(96, 128), 160, 192, 1023]
    raw = tmp_path / "base.raw"
    raw.write_bytes(pattern_raw(64 * MiB, 0xBA5E, BASE_EXTENTS))
    code, out, _ = run("vhd", "diff", str(raw), base)
    assert code == 0 and out.startswith("0 of 32 units")


def test_vhd_demo_verifies(tmp_path: Path) -> None:
    code, out, _ = run("vhd", "demo", "--keep", str(tmp_path / "demo"))
    assert code == 0, out
    assert "$ xencr vhd info child.vhd" in out
    assert "base.vhd: ok" in out and "child.vhd: ok" in out
    assert f"chain   sha256 {SPEC_CHAIN}" in out
    assert out.rstrip().splitlines()[-1].startswith("verified: ")


def test_json_reports_of_convert_stream_apply(chain: tuple[str, str], tmp_path: Path) -> None:
    child, base = chain
    code, out, _ = run("vhd", "convert", child, str(tmp_path / "flat.vhd"), "--json")
    assert code == 0 and json.loads(out)["virtual_size"] == 64 * MiB
    code, out, _ = run("vhd", "stream", child, "-b", base, "-o", str(tmp_path / "d.vhd"), "--json")
    assert code == 0 and json.loads(out)["disk_type"] == "differencing"
    replica = tmp_path / "r.raw"
    replica.write_bytes(pattern_raw(64 * MiB, 0xBA5E, BASE_EXTENTS))
    code, out, _ = run("vhd", "apply", str(tmp_path / "d.vhd"), str(replica), "--json")
    assert code == 0 and json.loads(out)["blocks"] == 5
    assert file_sha256(replica) == SPEC_CHAIN
    assert eng.sha256(str(tmp_path / "flat.vhd")) == SPEC_CHAIN


def test_check_requires_the_chain_unless_file_only(vectors: Path, tmp_path: Path) -> None:
    lone = tmp_path / CHILD
    shutil.copy(vectors / CHILD, lone)
    code, out, _ = run("vhd", "check", str(lone))
    assert code == 1
    assert out.startswith(f"{lone}: parent of ") and "not found" in out
    assert run("vhd", "check", str(lone), "--file-only")[0] == 0
    assert run("vhd", "check", str(lone), "--parent", str(vectors / BASE))[0] == 0
    code, out, _ = run("vhd", "check", str(lone), "--parent", str(vectors / "qemu-empty-dynamic.vhd"))
    assert code == 1 and "expects" in out


def test_stream_piped_into_apply(chain: tuple[str, str], tmp_path: Path) -> None:
    """`xencr vhd stream CHILD --base BASE | xencr vhd apply - REPLICA`: forward-only all the way."""
    child, base = chain
    replica = tmp_path / "replica.raw"
    replica.write_bytes(pattern_raw(64 * MiB, 0xBA5E, BASE_EXTENTS))
    cli = [sys.executable, "-m", "xencr.cli", "vhd"]
    producer = subprocess.Popen([*cli, "stream", child, "--base", base], stdout=subprocess.PIPE)
    assert producer.stdout is not None
    consumer = subprocess.run(
        [*cli, "apply", "-", str(replica), "--format", "raw", "--require-full-bitmaps"],
        stdin=producer.stdout,
        capture_output=True,
        text=True,
    )
    producer.stdout.close()
    assert producer.wait() == 0
    assert consumer.returncode == 0, consumer.stderr
    assert "5 blocks" in consumer.stdout
    assert file_sha256(replica) == SPEC_CHAIN
