"""systemd units for xencr: the daemon as a service, or, as the alternative, a ``.timer`` per job
starting ``xencr run JOB`` (a template pair plus one drop-in per job with its schedule).

Passwords never go into a unit: ``XENCR_<POOL>_PASSWORD`` lines belong in the optional
``EnvironmentFile`` (``%E/xencr/env``: ``~/.config/xencr/env`` for a user manager,
``/etc/xencr/env`` for the system one, mode 0600), or ``password_file`` in the configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xencr.config import Config, ScheduleConfig
from xencr.schedule.cron import PRESETS

DAEMON_UNIT = "xencr.service"
RUN_SERVICE = "xencr-run@.service"
RUN_TIMER = "xencr-run@.timer"


@dataclass(frozen=True)
class Layout:
    """User units (``systemctl --user``, the default) or system ones."""

    system: bool = False

    @property
    def wanted_by(self) -> str:
        return "multi-user.target" if self.system else "default.target"

    @property
    def systemctl(self) -> str:
        return "systemctl" if self.system else "systemctl --user"


def _exec(exe: list[str], args: str, config: Path | None) -> str:
    conf = f" --config {_quote(str(config))}" if config is not None else ""
    return f"{' '.join(_quote(w) for w in exe)} {args}{conf}"


def _quote(word: str) -> str:
    # systemd's command-line quoting: double quotes, backslash escapes; '%' is a specifier.
    word = word.replace("%", "%%")
    if word and not any(c in word for c in " \"\\'$;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'


def daemon_unit(exe: list[str], config: Path | None, layout: Layout = Layout()) -> str:
    network = "Wants=network-online.target\nAfter=network-online.target\n" if layout.system else ""
    return f"""\
# xencr daemon: every enabled job on its schedules (`xencr daemon --help`).
[Unit]
Description=xencr: continuous replication of XenServer / XCP-ng VMs
{network}
[Service]
Type=exec
ExecStart={_exec(exe, "daemon", config)}
# SIGHUP reloads the configuration; a bad file is logged and the old one kept.
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM: no new run starts; transfers get [daemon] grace (default 60s), then are cancelled
# and cleaned up. Leave systemd more time than that before it kills.
TimeoutStopSec=5min
Restart=on-failure
RestartSec=30s
# Pool passwords: XENCR_<POOL>_PASSWORD=... lines in this file (mode 0600), or password_file.
EnvironmentFile=-%E/xencr/env
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy={layout.wanted_by}
"""


def run_service_unit(exe: list[str], config: Path | None) -> str:
    return f"""\
# One run of the job named by the instance: xencr-run@JOB.service runs `xencr run JOB`.
# A timer firing while the run is still active starts nothing (best effort, per job).
[Unit]
Description=xencr: one run of job %I

[Service]
Type=oneshot
ExecStart={_exec(exe, "run %I", config)} $XENCR_RUN_ARGS
EnvironmentFile=-%E/xencr/env
"""


def run_timer_unit() -> str:
    return """\
# The schedule of xencr-run@JOB.service. The job's own times are in the drop-in
# xencr-run@JOB.timer.d/schedule.conf (written by `xencr service install`); hourly otherwise.
[Unit]
Description=xencr: schedule of job %I

[Timer]
OnCalendar=hourly
# Missed times (host down, suspended) are not caught up, like the daemon's missed ticks.
Persistent=false
AccuracySec=1s

[Install]
WantedBy=timers.target
"""


def escape(name: str) -> str:
    """systemd-escape of a unit instance name (``web servers`` -> ``web\\x20servers``)."""
    out = []
    for i, ch in enumerate(name):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def _calendar_field(text: str, first: int, names: tuple[str, ...] = ()) -> str | None:
    items = []
    for item in text.split(","):
        base, slash, step = item.partition("/")
        if base == "*":
            items.append(f"{first:02d}/{step}" if slash else "*")
            continue
        if slash:
            return None  # a range with a step: not in systemd's syntax everywhere
        a, dash, b = base.partition("-")
        conv = [_name_value(x, names) for x in ((a, b) if dash else (a,))]
        if any(c is None for c in conv):
            return None
        items.append("..".join(f"{c:02d}" if not names else str(c) for c in conv))
    return ",".join(items)


def _name_value(text: str, names: tuple[str, ...]) -> int | None:
    if text.isdigit():
        return int(text)
    low = text.lower()
    return names.index(low) + 1 if low in names else None


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_SD_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def _weekdays(text: str) -> str | None:
    if text.startswith("*"):
        return "" if text == "*" else None
    items = []
    for item in text.split(","):
        if "/" in item:
            return None
        a, dash, b = item.partition("-")
        ends = []
        for x in (a, b) if dash else (a,):
            v = int(x) if x.isdigit() else (_DAYS.index(x.lower()) if x.lower() in _DAYS else None)
            if v is None or v > 7:
                return None
            ends.append(_SD_DAYS[v])
        items.append("..".join(ends))
    return ",".join(items)


def on_calendar(s: ScheduleConfig) -> list[str] | None:
    """systemd ``OnCalendar=`` values for a schedule, or None when it has no exact equivalent.

    Intervals are aligned on the epoch in UTC, as the daemon does. systemd treats a time skipped
    or repeated by a DST change its own way, not cron's; the timer follows systemd.
    """
    if s.every is not None:
        e = s.every
        if e < 60 and 60 % e == 0:
            return [f"*-*-* *:*:00/{e} UTC"]
        if e % 60 == 0 and e < 3600 and 3600 % e == 0:
            return [f"*-*-* *:00/{e // 60}:00 UTC"]
        if e == 86400:
            return ["*-*-* 00:00:00 UTC"]
        if e % 3600 == 0 and 86400 % e == 0:
            return [f"*-*-* 00/{e // 3600}:00:00 UTC"]
        return None
    assert s.cron is not None
    fields = PRESETS.get(s.cron, s.cron).split(" ")
    minute = _calendar_field(fields[0], 0)
    hour = _calendar_field(fields[1], 0)
    dom = _calendar_field(fields[2], 1)
    month = _calendar_field(fields[3], 1, _MONTHS)
    dow = _weekdays(fields[4])
    if None in (minute, hour, dom, month, dow):
        return None
    zone = f" {s.timezone}"
    time = f"{hour}:{minute}:00"
    if fields[2] != "*" and fields[4] != "*":
        if fields[2].startswith("*") or fields[4].startswith("*"):
            return None  # cron's AND for a '*'-led field: no clean equivalent
        # cron: either day rule fires; systemd ANDs, so one line per rule.
        return [f"*-{month}-{dom} {time}{zone}", f"{dow} *-{month}-* {time}{zone}"]
    prefix = f"{dow} " if dow else ""
    return [f"{prefix}*-{month}-{dom} {time}{zone}"]


def timer_dropin(job_name: str, s: ScheduleConfig, others: int) -> str:
    values = on_calendar(s)
    what = f"every {s.every}s" if s.every is not None else f"cron {s.cron!r} in {s.timezone}"
    lines = [f"# Job {job_name!r}, schedule {s.id!r} ({what})."]
    if others:
        lines.append(f"# The job has {others} other schedule(s): the daemon runs those; a timer follows one.")
    lines.append("[Timer]")
    if values is None:
        lines.append("# No exact OnCalendar= equivalent: write one by hand (man systemd.time).")
    else:
        lines.append("OnCalendar=")  # replaces the template's hourly
        lines += [f"OnCalendar={v}" for v in values]
    return "\n".join(lines) + "\n"


def service_dropin(s: ScheduleConfig) -> str:
    # The run keeps this schedule's restore points (its retention and full_interval).
    value = f"XENCR_RUN_ARGS=--schedule {s.id}".replace("\\", "\\\\").replace('"', '\\"')
    return f'[Service]\nEnvironment="{value.replace("%", "%%")}"\n'


def all_units(
    exe: list[str], config_path: Path | None, config: Config | None, layout: Layout = Layout()
) -> dict[str, str]:
    """Relative path -> content: the daemon unit, the run template pair, and a drop-in per
    enabled job with schedules (when ``config`` is given). ``exe``: the words that run xencr."""
    units = {
        DAEMON_UNIT: daemon_unit(exe, config_path, layout),
        RUN_SERVICE: run_service_unit(exe, config_path),
        RUN_TIMER: run_timer_unit(),
    }
    if config is not None:
        for job in config.jobs.values():
            if not job.enabled or not job.schedules:
                continue
            first = job.schedules[0]
            name = escape(job.name)
            units[f"xencr-run@{name}.timer.d/schedule.conf"] = timer_dropin(
                job.name, first, len(job.schedules) - 1
            )
            units[f"xencr-run@{name}.service.d/schedule.conf"] = service_dropin(first)
    return units
