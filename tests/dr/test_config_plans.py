"""The [[plan]] tables: what they hold once read, and each mistake as one exact line."""

from __future__ import annotations

from pathlib import Path

import pytest

from xencr.config import ConfigError, HealthGate, PlanGroup, PlanHook, parse_config, sample_config

BASE = """
[pools.a]
url = "https://a.example.com"
[pools.b]
url = "https://b.example.com"
[jobs.web]
pool = "a"
vms = ["web-*"]
[[jobs.web.targets]]
pool = "b"
sr = "Local storage"
[jobs.db]
pool = "a"
vms = ["db-1"]
[[jobs.db.targets]]
pool = "b"
sr = "Local storage"
"""
PATH = Path("/etc/xencr.toml")


def read(plans: str) -> object:
    return parse_config(BASE + plans, PATH, warn=lambda _: None)


def error(plans: str) -> str:
    with pytest.raises(ConfigError) as err:
        read(plans)
    return str(err.value)


def test_a_full_plan_is_read() -> None:
    cfg = parse_config(
        BASE
        + """
[[plan]]
name = "site-b"
jobs = ["web"]
vms = ["db-1"]
network_map = { "LAN" = "DR LAN" }
gate = { kind = "guest_tools", timeout = "3m" }
[[plan.groups]]
vms = ["db-*"]
start_delay = "30s"
gate = { kind = "xenstore", key = "data/ready" }
[[plan.groups]]
vms = ["tag:web"]
[[plan.hooks]]
vm = "web-1"
command = ["/usr/bin/reip", "--site", "b"]
timeout = "1m"
""",
        PATH,
    )
    p = cfg.plan("site-b")
    assert (p.jobs, p.vms, p.network_map) == (["web"], ["db-1"], {"LAN": "DR LAN"})
    assert p.gate == HealthGate("guest_tools", 180)
    assert p.groups == [
        PlanGroup(["db-*"], 30, HealthGate("xenstore", 300, "data/ready")),
        PlanGroup(["tag:web"], 0, None),
    ]
    assert p.hooks == [PlanHook("web-1", ["/usr/bin/reip", "--site", "b"], 60)]
    with pytest.raises(ConfigError) as err:
        cfg.plan("site-c")
    assert str(err.value) == "/etc/xencr.toml: no plan 'site-c' (plans: site-b)"


def test_the_sample_has_a_plan() -> None:
    cfg = parse_config(sample_config(), PATH, warn=lambda _: None)
    p = cfg.plan("site-b")
    assert p.jobs == ["web", "db"]
    assert [g.vms for g in p.groups] == [["tag:database"], ["web-*"]]
    assert p.groups[0].gate == HealthGate("xenstore", 300, "data/ready")
    assert p.hooks == [PlanHook("web-1", ["/usr/local/bin/dr-reip", "--site", "b"], 300)]


@pytest.mark.parametrize(
    ("plans", "message"),
    [
        ('[[plan]]\nname = "x"\n', "plan[0]: covers no VM: give 'jobs', 'vms' or both"),
        ('[[plan]]\njobs = ["web"]\n', "plan[0]: missing key 'name'"),
        ('[[plan]]\nname = "x"\njobs = ["mail"]\n', "plan[0].jobs[0]: unknown job 'mail'"),
        ('[[plan]]\nname = "x"\njobs = ["web"]\nstart = 1\n', "plan[0]: unknown key 'start'"),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\n[[plan]]\nname = "x"\njobs = ["db"]\n',
            "plan[1].name: plan 'x' is defined twice",
        ),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\n[[plan]]\nname = "y"\njobs = ["db", "web"]\n',
            "plan[1].jobs[1]: job 'web' is already in plan 'x'",
        ),
        (
            '[[plan]]\nname = "x"\nvms = ["db-1"]\n[[plan]]\nname = "y"\nvms = ["db-1"]\n',
            "plan[1].vms[0]: VM 'db-1' is already in plan 'x'",
        ),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\ngate = { kind = "ping" }\n',
            "plan[0].gate.kind: must be one of power_state, guest_tools, xenstore, not 'ping'",
        ),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\ngate = { kind = "xenstore" }\n',
            "plan[0].gate: a xenstore gate needs the 'key' the guest writes",
        ),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\ngate = { kind = "power_state", key = "k" }\n',
            "plan[0].gate.key: only a xenstore gate has a key, not a power_state gate",
        ),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\ngate = { kind = "power_state", timeout = "soon" }\n',
            "plan[0].gate.timeout: invalid duration 'soon' (examples: 90s, 10m, 2h, 1d, 1h30m)",
        ),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\n[[plan.groups]]\nvms = []\n',
            "plan[0].groups[0].vms: selects no VM (give UUIDs, name globs like 'db-*', or 'tag:NAME')",
        ),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\n[[plan.hooks]]\nvm = "web-1"\ncommand = "reip --all"\n',
            "plan[0].hooks[0].command: must be an array of arguments (argv), not a string: no shell runs it",
        ),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\n[[plan.hooks]]\nvm = "web-1"\ncommand = []\n',
            "plan[0].hooks[0].command: must name the program to run first",
        ),
        (
            '[[plan]]\nname = "x"\njobs = ["web"]\nnetwork_map = { "LAN" = "" }\n',
            "plan[0].network_map.LAN: must not be empty",
        ),
    ],
)
def test_mistakes(plans: str, message: str) -> None:
    assert error(plans) == f"/etc/xencr.toml: {message}"
