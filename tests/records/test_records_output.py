"""What `xencr` prints, as a user reads it: targets by pool and SR name, one line for a lock
refusal, human sizes in text and exact bytes in JSON, no "delta (delta)" or "0: delta", and,
without a terminal, progress lines that show a long transfer is alive."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
from recordstest import JOB, write_config, xencr
from xapitest import MIB, Pools, change

from xencr.cli import live
from xencr.cli.daemon import run_logging_transfers
from xencr.config import load_config
from xencr.service import locks

SIZE = r"\d+\.\d (KiB|MiB|GiB)"


def _sr(pools: Pools) -> tuple[str, str]:
    """(UUID, name) of the target pool's default SR."""
    t = pools.session(1)
    sr = t.api.pool.get_default_SR(t.api.pool.get_all()[0])
    return t.api.SR.get_uuid(sr), t.api.SR.get_name_label(sr)


def test_sizes_wording_and_names(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools)  # the target SR named by UUID
    sr_uuid, sr_name = _sr(pools)
    # As the job names the target, or by its SR's name (run and plan; status always by name).
    target = f"b/({sr_uuid}|{re.escape(sr_name)})"
    code, out, err = xencr("run", JOB, "--config", str(cfg))
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("vm1 -> "))
    assert re.fullmatch(rf"vm1 -> {target}: ok, restore point \S+, {SIZE}, full \(first run\)", line)
    change(pools, "vm1", 2, "records")

    code, out, _ = xencr("plan", JOB, "--config", str(cfg))
    assert code == 0
    head, disk = out.splitlines()[:2]
    assert re.fullmatch(rf"vm1 -> {target}: ~4\.0 MiB, SR free after: {SIZE}", head), head
    # The path is said with its reason: this pool serves no NBD.
    assert re.fullmatch(r"  disk 0 \(.*\): delta via stream: no NBD network on pool a, ~4\.0 MiB", disk), disk
    code, out, _ = xencr("plan", JOB, "--config", str(cfg), "--json")
    planned = json.loads(out)[0]
    assert planned["estimated_bytes"] == 4 * MIB and planned["disks"][0]["estimated_bytes"] == 4 * MIB
    assert isinstance(planned["sr_free_after"], int)

    code, out, _ = xencr("run", JOB, "--config", str(cfg))
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("vm1 -> "))
    assert re.fullmatch(rf"vm1 -> {target}: ok, restore point \S+, {SIZE}, delta", line), line
    code, out, _ = xencr("run", JOB, "--config", str(cfg), "--json")
    sent = json.loads(out)["vms"][0]["targets"][0]["bytes"]
    assert isinstance(sent, int) and sent > 0

    code, out, _ = xencr("history", JOB, "--config", str(cfg))
    assert code == 0
    lines = out.splitlines()
    assert "    disk 0: full (first run)" in lines and "    disk 0: delta" in lines
    assert not any(re.search(r"delta \(delta\)|\b0: delta", x) for x in lines if "disk 0" not in x)

    # Status names the target by pool and SR name, though the job names the SR by UUID.
    code, out, _ = xencr("status", JOB, "--config", str(cfg))
    assert code == 0 and out.startswith(f"{JOB}  vm1 -> b/{sr_name}: newest "), out
    code, out, _ = xencr("status", JOB, "--config", str(cfg), "--json")
    row = json.loads(out)[0]
    assert (row["target"], row["target_sr"]) == (f"b/{sr_name}", sr_uuid)

    code, out, _ = xencr("pool", "test", "b", "--config", str(cfg))
    assert code == 0 and re.search(rf"{sr_uuid}\): {SIZE} free$", out, re.M), out
    code, out, _ = xencr("pool", "test", "b", "--config", str(cfg), "--json")
    assert all(isinstance(s["free"], int) for s in json.loads(out)["srs"])


def test_a_lock_refusal_is_one_line_naming_the_holder(pools: Pools, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, pools)
    config = load_config(cfg)
    sr_uuid, _ = _sr(pools)
    vm_uuid = pools.session(0).api.VM.get_uuid(pools.session(0).api.VM.get_by_name_label("vm1")[0])
    held = locks.try_lock(locks.lock_dir(config.state.local_path), vm_uuid, sr_uuid, "nightly", job_id="x")
    assert held is not None
    with held:
        code, out, err = xencr("run", JOB, "--config", str(cfg))
    assert code == 1
    since = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ"
    target = f"b/({sr_uuid}|{re.escape(_sr(pools)[1])})"
    pattern = rf"xencr: vm1 -> {target}: refused: being replicated by job nightly \(pid \d+\) since {since}"
    assert [x for x in err.splitlines() if "vm1" in x or "nightly" in x] == [err.splitlines()[-1]]
    assert re.fullmatch(pattern, err.splitlines()[-1]), err
    assert out.splitlines() == ["run skipped: 1 VM(s)"]
    assert "skipped: skipped" not in out + err


@pytest.fixture
def slow_source(pools: Pools) -> object:
    """Transfers from the source pool at 2 MiB/s, for as long as the test runs."""
    s = pools.session(0)
    s.api.sim.fault_rate(str(2 * MIB))
    yield
    s.api.sim.fault_clear()


_LOG_LINE = re.compile(
    rf"vm1 -> b/.+ disk 0: (?P<pct>\d+)% of 4\.0 MiB \(({SIZE}|\d+ B)\), {SIZE}/s, ETA \d+:\d\d"
)


def test_progress_lines_without_a_terminal(
    pools: Pools, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow_source: object
) -> None:
    cfg = write_config(tmp_path, pools)
    assert xencr("run", JOB, "--config", str(cfg))[0] == 0

    # `xencr run` without a terminal: by time alone (steps too wide to fire), every LOG_EVERY.
    change(pools, "vm1", 2, "slow-cli")
    monkeypatch.setattr(live, "LOG_EVERY", 0.25)
    monkeypatch.setattr(live, "LOG_STEP", 1000)
    code, _, err = xencr("run", JOB, "--config", str(cfg))
    assert code == 0, err
    found = [m for m in map(_LOG_LINE.fullmatch, err.splitlines()) if m]
    assert len(found) >= 4, err  # 4 MiB at 2 MiB/s: about 8 periods
    pcts = [int(m["pct"]) for m in found]
    assert pcts == sorted(pcts) and pcts[0] < 50

    # The daemon's runs: by steps alone (period too long to fire), each line in a new 10 % step.
    change(pools, "vm1", 2, "slow-daemon")
    monkeypatch.setattr(live, "LOG_EVERY", 1000.0)
    monkeypatch.setattr(live, "LOG_STEP", 10)
    lines: list[str] = []
    lock = threading.Lock()

    def progress(line: str) -> None:
        with lock:
            lines.append(line)

    report = run_logging_transfers(load_config(cfg), JOB, trigger="schedule", progress=progress)
    assert report.outcome == "success"
    steps = [int(m["pct"]) // 10 for m in map(_LOG_LINE.fullmatch, lines) if m]
    assert len(steps) >= 5 and steps == sorted(set(steps)), lines
