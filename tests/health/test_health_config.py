"""Issue 11: a job's `health_check` key, read strictly like the other job keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from xencr.config import ConfigError, HealthCheckConfig, HealthGate, load_config, sample_config

BASE = """
[pools.a]
url = "https://a.example.com"
[pools.b]
url = "https://b.example.com"
[jobs.web]
pool = "a"
vms = ["web-*"]
{extra}
[[jobs.web.targets]]
pool = "b"
sr = "Local storage"
"""


def _load(tmp_path: Path, extra: str) -> HealthCheckConfig | None:
    cfg = tmp_path / "xencr.toml"
    cfg.write_text(BASE.format(extra=extra))
    return load_config(cfg).job("web").health_check


def test_health_check_keys(tmp_path: Path) -> None:
    assert _load(tmp_path, "") is None
    assert _load(tmp_path, "health_check = {}") == HealthCheckConfig(HealthGate("guest_tools", 300))
    hc = _load(
        tmp_path, 'health_check = { gate = "xenstore", key = "vm-data/hc", timeout = "90s", sr = " HC " }'
    )
    assert hc == HealthCheckConfig(HealthGate("xenstore", 90, "vm-data/hc"), "HC")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            'health_check = { gate = "ping" }',
            "jobs.web.health_check.gate: must be one of power_state, guest_tools",
        ),
        ('health_check = { gate = "xenstore" }', "jobs.web.health_check: a xenstore gate needs the 'key'"),
        ('health_check = { key = "x" }', "jobs.web.health_check.key: only a xenstore gate has a key"),
        ('health_check = { timeout = "soon" }', "jobs.web.health_check.timeout:"),
        ('health_check = { gate = "power_state", sr = "" }', "jobs.web.health_check.sr: must not be empty"),
        ('health_check = { gates = "power_state" }', "unknown key 'gates' (did you mean 'gate'?)"),
        ("health_check = true", "jobs.web.health_check: must be a table, not a boolean"),
    ],
)
def test_health_check_mistakes(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, extra)
    assert message in str(err.value)


def test_the_sample_shows_the_key_and_reads_with_it(tmp_path: Path) -> None:
    line = next(x for x in sample_config().splitlines() if x.startswith("# health_check = "))
    text = sample_config().replace(line, line[2:].replace('sr = "HC"', 'sr = "Local storage"'))
    cfg = tmp_path / "xencr.toml"
    cfg.write_text(text)
    hc = load_config(cfg).job("web").health_check
    assert hc == HealthCheckConfig(HealthGate("xenstore", 300, "vm-data/xencr-health-check"), "Local storage")
