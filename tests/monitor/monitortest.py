"""Helpers of the monitoring tests: a configuration, a fake clock, history written into a StateDB."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from xencr.config import Config, parse_config

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

CONFIG = """\
[pools.a]
url = "https://a.example"

[pools.b]
url = "https://b.example"

[jobs.web]
pool = "a"
vms = ["web-*"]
{job_extra}

[[jobs.web.targets]]
pool = "b"
sr = "SR1"

[[jobs.web.schedules]]
every = "10m"

[jobs.db]
pool = "a"
vms = ["db-*"]
rpo = "1h"

[[jobs.db.targets]]
pool = "b"
sr = "SR1"

[[jobs.db.schedules]]
every = "15m"
{tail}
"""


def config(tmp: Path, job_extra: str = "", tail: str = "") -> Config:
    path = tmp / "xencr.toml"
    path.write_text(f'state = "{tmp / "state.sqlite"}"\n' + CONFIG.format(job_extra=job_extra, tail=tail))
    return parse_config(path.read_text(), path)


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


def families(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> (labels, value) as Prometheus's own parser reads the exposition."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(fams: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    matches = [v for lab, v in fams.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]
    assert len(matches) <= 1, (name, labels, matches)
    return matches[0] if matches else None
