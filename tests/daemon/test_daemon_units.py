"""`xencr service install`: the daemon unit and the timer alternative, printed and written;
OnCalendar values checked by systemd's own parser when it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xencr.cli.app import app
from xencr.config import ScheduleConfig
from xencr.service.units import escape, on_calendar

runner = CliRunner()

CONFIG = """\
[pools.a]
url = "http://127.0.0.1:9"
[jobs."web servers"]
pool = "a"
vms = ["vm*"]
[[jobs."web servers".targets]]
pool = "a"
sr = "sr"
[[jobs."web servers".schedules]]
id = "quarter"
every = "15m"
[[jobs."web servers".schedules]]
id = "night"
cron = "30 2 * * *"
timezone = "Europe/Paris"
[jobs.off]
pool = "a"
vms = ["vm*"]
enabled = false
[[jobs.off.targets]]
pool = "a"
sr = "sr"
[[jobs.off.schedules]]
every = "1h"
"""


def _config(tmp: Path) -> Path:
    cfg = tmp / "xencr.toml"
    cfg.write_text(CONFIG)
    return cfg


def test_print_shows_the_daemon_unit_and_the_timer_pair(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    r = runner.invoke(app, ["service", "install", "--print", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    out = r.stdout
    sections = {part.split("\n", 1)[0].strip(): part.split("\n", 1)[1] for part in out.split("# ---- ")[1:]}
    assert list(sections) == [
        "xencr.service",
        "xencr-run@.service",
        "xencr-run@.timer",
        "xencr-run@web\\x20servers.timer.d/schedule.conf",
        "xencr-run@web\\x20servers.service.d/schedule.conf",
    ]
    daemon = sections["xencr.service"]
    assert f"daemon --config {cfg.resolve()}" in daemon
    assert "ExecReload=/bin/kill -HUP $MAINPID" in daemon and "WantedBy=default.target" in daemon
    assert f"run %I --config {cfg.resolve()} $XENCR_RUN_ARGS" in sections["xencr-run@.service"]
    assert "Type=oneshot" in sections["xencr-run@.service"]
    assert "Persistent=false" in sections["xencr-run@.timer"]
    timer = sections["xencr-run@web\\x20servers.timer.d/schedule.conf"]
    assert "OnCalendar=\nOnCalendar=*-*-* *:00/15:00 UTC" in timer and "1 other schedule" in timer
    assert (
        'Environment="XENCR_RUN_ARGS=--schedule quarter"'
        in sections["xencr-run@web\\x20servers.service.d/schedule.conf"]
    )
    # Passwords come from the EnvironmentFile or password_file, never from a unit's settings.
    assert not [line for line in out.splitlines() if "PASSWORD" in line and not line.startswith("#")]


def test_install_writes_the_files_and_says_what_to_enable(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    target = tmp_path / "units"
    r = runner.invoke(app, ["service", "install", "--dir", str(target), "--config", str(cfg), "--system"])
    assert r.exit_code == 0, r.output
    names = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert names == [
        "xencr-run@.service",
        "xencr-run@.timer",
        "xencr-run@web\\x20servers.service.d/schedule.conf",
        "xencr-run@web\\x20servers.timer.d/schedule.conf",
        "xencr.service",
    ]
    unit = (target / "xencr.service").read_text()
    assert "WantedBy=multi-user.target" in unit and "After=network-online.target" in unit
    assert "systemctl enable --now xencr.service" in r.stdout
    assert "systemctl enable --now 'xencr-run@web\\x20servers.timer'" in r.stdout


def test_install_without_a_readable_config_still_writes_the_units(tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["service", "install", "--dir", str(tmp_path / "u"), "--config", str(tmp_path / "none.toml")]
    )
    assert r.exit_code == 0
    assert "no per-job timer drop-ins" in r.stderr
    assert (tmp_path / "u" / "xencr.service").is_file()


def test_escape_matches_systemd_escape() -> None:
    name = "web servers-1/a.b_c:d"
    assert escape(name) == "web\\x20servers\\x2d1-a.b_c:d"
    if shutil.which("systemd-escape"):
        assert subprocess.run(["systemd-escape", name], capture_output=True, text=True).stdout.strip() == (
            escape(name)
        )


@pytest.mark.parametrize(
    ("schedule", "values"),
    [
        (ScheduleConfig(id="s", every=900), ["*-*-* *:00/15:00 UTC"]),
        (ScheduleConfig(id="s", every=7200), ["*-*-* 00/2:00:00 UTC"]),
        (ScheduleConfig(id="s", every=86400), ["*-*-* 00:00:00 UTC"]),
        (ScheduleConfig(id="s", every=30), ["*-*-* *:*:00/30 UTC"]),
        (ScheduleConfig(id="s", every=7 * 60), None),  # 7 minutes do not divide an hour
        (ScheduleConfig(id="s", cron="30 2 * * *", timezone="Europe/Paris"), ["*-*-* 02:30:00 Europe/Paris"]),
        (ScheduleConfig(id="s", cron="@weekly"), ["Sun *-*-* 00:00:00 UTC"]),
        (ScheduleConfig(id="s", cron="*/15 9-17 * * mon-fri"), ["Mon..Fri *-*-* 09..17:00/15:00 UTC"]),
        # Both day fields restricted: cron fires on either, so one line per rule.
        (ScheduleConfig(id="s", cron="0 9 13 * 5"), ["*-*-13 09:00:00 UTC", "Fri *-*-* 09:00:00 UTC"]),
        (ScheduleConfig(id="s", cron="0 9 */2 * 1"), None),
        (ScheduleConfig(id="s", cron="0 1-5/2 * * *"), None),
    ],
)
def test_on_calendar(schedule: ScheduleConfig, values: list[str] | None) -> None:
    assert on_calendar(schedule) == values
    if values and shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "calendar", *values], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
