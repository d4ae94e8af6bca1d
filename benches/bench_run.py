#!/usr/bin/env python3
"""Run one job once in this process and print what its report says of each disk, for the resume
part of replication_bench.py:

    python benches/bench_run.py CONFIG JOB [--full]

`xencr run --json` leaves out how a disk was resumed (dropped connections resumed from, the block
a later run resumed at); this prints the whole `DiskResult` (its per-block lists left out) as one
JSON line on stdout, with the run's outcome, snapshot and restore point. Exit status 1 unless the
run succeeded. The bench SIGKILLs it mid-transfer to leave an attempt to resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from xencr.config import load_config
from xencr.replication.jobs import run_configured
from xencr.replication.runner import DiskResult

# Per-block lists: large, and not what the bench reads.
LISTS = ("block_indices", "sent", "units")


def disk_fields(d: DiskResult) -> dict[str, object]:
    return {k: v for k, v in dataclasses.asdict(d).items() if k not in LISTS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("job")
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args(argv)
    report = run_configured(load_config(args.config), args.job, full=args.full)
    vms = [
        {
            "snapshot": v.snapshot,
            "error": v.error,
            "targets": [
                {
                    "outcome": t.outcome,
                    "restore_point": t.restore_point,
                    "error": t.error,
                    "warnings": t.warnings,
                    "cleaned": t.cleaned,
                    "disks": [disk_fields(d) for d in t.disks],
                }
                for t in v.targets
            ],
        }
        for v in report.vms
    ]
    print(json.dumps({"outcome": report.outcome, "vms": vms}), flush=True)
    if report.outcome != "success":
        errors = [e for v in report.vms for e in (v.error, *(t.error for t in v.targets)) if e]
        print(f"run {report.outcome}: {'; '.join(errors) or 'see the report'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
