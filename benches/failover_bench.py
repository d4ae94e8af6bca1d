#!/usr/bin/env python3
"""Time to fail over a plan of N VMs on the simulator: N VMs replicated by one job from pool a
to pool b, then `xencr plan --failover`, `xencr failover --test --boot` and `xencr failover`, each
timed as a user runs it (a fresh process), with no simulated boot delay (so the figures are
xencr's and XAPI's calls, not a guest's boot).

    .venv/bin/python benches/failover_bench.py [--vms 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from xencr.sim.harness import running_simulator  # noqa: E402
from xencr.xapi.session import Endpoint, XapiSession  # noqa: E402

MIB = 1 << 20
PASSWORD = "bench-password"


def xencr(cfg: Path, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "xencr.cli", *args, "--config", str(cfg)],
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "python")),
    )
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=10)
    n = ap.parse_args().vms
    with tempfile.TemporaryDirectory(prefix="xencr-fo-bench-") as tmp:
        d = Path(tmp)
        with running_simulator(
            d / "sim", pools=2, vms=n, disk_size=8 * MIB, sr_size=64 * n * MIB, password=PASSWORD
        ) as sim:
            with XapiSession(Endpoint(sim.urls[1]), "root", PASSWORD) as b:
                sr = b.api.SR.get_uuid(b.api.pool.get_default_SR(b.api.pool.get_all()[0]))
            pw = d / "pw"
            pw.write_text(PASSWORD)
            os.chmod(pw, 0o600)
            cfg = d / "xencr.toml"
            cfg.write_text(
                f'state = "{d / "state.sqlite"}"\n'
                f'[pools.a]\nurl = "{sim.urls[0]}"\npassword_file = "{pw}"\n'
                f'[pools.b]\nurl = "{sim.urls[1]}"\npassword_file = "{pw}"\n'
                '[jobs.all]\npool = "a"\nvms = ["vm*"]\n'
                f'[[jobs.all.targets]]\npool = "b"\nsr = "{sr}"\n'
                '[[jobs.all.schedules]]\nevery = "1h"\nretention = 2\n'
                '[[plan]]\nname = "site-b"\njobs = ["all"]\n'
            )
            replicate = xencr(cfg, "run", "all")
            preview = xencr(cfg, "plan", "--failover", "site-b")
            rehearsal = xencr(cfg, "failover", "site-b", "--test", "--boot", "--yes")
            failover = xencr(cfg, "failover", "site-b", "--yes")
    print(
        f"{n} VMs: first replication {replicate:.1f}s; plan --failover {preview:.1f}s; "
        f"failover --test --boot {rehearsal:.1f}s; failover {failover:.1f}s"
    )


if __name__ == "__main__":
    main()
