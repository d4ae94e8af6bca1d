"""Helpers shared by the core tests: small valid configurations to vary."""

from __future__ import annotations

from pathlib import Path

MINIMAL = """\
[pools.site-a]
url = "https://a.example"

[pools.site-b]
url = "https://b.example"

[jobs.web]
pool = "site-a"
vms = ["web-*"]

[[jobs.web.targets]]
pool = "site-b"
sr = "SR1"

[[jobs.web.schedules]]
every = "10m"
"""


def write(tmp_path: Path, text: str, name: str = "xencr.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path
