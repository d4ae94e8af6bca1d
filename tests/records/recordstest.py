"""Helpers of the records tests: a job over the simulator's pools, `xencr` as a user runs it,
and the failure counter as Prometheus reads it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner
from xapitest import PASSWORD, Pools, job_config

from xencr.cli.app import app

JOB = "rec"


def write_config(
    tmp: Path,
    pools: Pools,
    *,
    password: str = PASSWORD,
    url: str | None = None,
    sr: str | None = None,
    vms: tuple[str, ...] = ("vm1",),
) -> Path:
    """Pools ``a`` (source) and ``b`` (target, its default SR named by UUID unless ``sr``)."""
    return job_config(tmp, pools, JOB, list(vms), retention=2, url=url, sr=sr, password=password)


def xencr(*args: str) -> tuple[int, str, str]:
    """`xencr ARGS` in-process: exit code, stdout, stderr (neither a terminal)."""
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def history(cfg: Path) -> list[dict[str, Any]]:
    code, out, err = xencr("history", "--json", "--config", str(cfg))
    assert code == 0, err
    runs: list[dict[str, Any]] = json.loads(out)
    return runs


def metric(cfg: Path, name: str, **labels: str) -> float:
    """One sample of `xencr metrics`, as Prometheus's own parser reads it."""
    code, out, err = xencr("metrics", "--config", str(cfg))
    assert code == 0, err
    found = [
        s.value
        for family in text_string_to_metric_families(out)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) == 1, (name, labels, found)
    return found[0]
