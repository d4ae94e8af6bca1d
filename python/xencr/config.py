"""The configuration file: pools (without secrets), jobs, their targets and schedules.

One TOML file, by default ``$XDG_CONFIG_HOME/xencr/xencr.toml``. Everything is checked when the
file is read, so a typo fails at once with one line naming the file and the key
(``xencr.toml: jobs.web.targets[0]: unknown pool 'site-c'``) instead of surprising a run later.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
import socket
import tomllib
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

from xencr import credentials
from xencr.credentials import Secret

# Fixed forever: job ids derive from it and the job names, and replicas carry the job id, so a
# job keeps its id (and its delta chain) across runs and machines without writing one down.
JOB_NAMESPACE = uuid.UUID("3a04dc49-4785-41c0-89e0-5434e6ad685a")

SnapshotMode = Literal["normal", "checkpoint", "offline"]
SNAPSHOT_MODES: tuple[SnapshotMode, ...] = ("normal", "checkpoint", "offline")
TransferPath = Literal["auto", "nbd", "stream"]
TRANSFER_PATHS: tuple[TransferPath, ...] = ("auto", "nbd", "stream")
MAX_NBD_CONNECTIONS = 16

CONFIG_ENV = "XENCR_CONFIG"

# When a job's run is reported (webhook, email): never; when a task failed or was interrupted;
# that, or an RPO breach after the run; after every run.
ReportWhen = Literal["never", "failure", "breach", "always"]
REPORT_WHEN: tuple[ReportWhen, ...] = ("never", "failure", "breach", "always")

SmtpSecurity = Literal["none", "starttls", "tls"]
SMTP_SECURITY: tuple[SmtpSecurity, ...] = ("none", "starttls", "tls")
SMTP_PASSWORD_ENV = "XENCR_SMTP_PASSWORD"
STATUS_PASSWORD_ENV = "XENCR_STATUS_PASSWORD"
STATE_PASSWORD_ENV = "XENCR_STATE_PASSWORD"


class ConfigError(Exception):
    """An unusable configuration; ``str()`` is one line: ``FILE: KEY.PATH: what is wrong``."""

    def __init__(self, message: str, *, path: Path | str | None = None, key: str | None = None) -> None:
        self.message = " ".join(message.split("\n"))
        self.path = path
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        return ": ".join(str(p) for p in (self.path, self.key, self.message) if p)


# ---------------------------------------------------------------------------------------------
# Values: durations, rates, fingerprints, cron shapes, rate windows, VM selectors


_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+)\s*([a-z]+)\s*")


def parse_duration(text: str) -> int:
    """``"90s"``, ``"10m"``, ``"2h"``, ``"1d"``, ``"1w"``, ``"1h30m"`` or plain seconds -> seconds."""
    t = text.strip().lower()
    if t.isdigit():
        return int(t)
    total, pos = 0, 0
    while pos < len(t):
        m = _DURATION_PART.match(t, pos)
        if m is None or m.group(2) not in _DURATION_UNITS:
            raise ValueError(f"invalid duration {text!r} (examples: 90s, 10m, 2h, 1d, 1h30m)")
        total += int(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"invalid duration {text!r} (examples: 90s, 10m, 2h, 1d, 1h30m)")
    return total


# Case-insensitive: "B" is a byte whatever its case; bits are spelt out ("Mbit/s").
_RATE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "bit": 1 / 8,
    "kbit": 10**3 / 8,
    "mbit": 10**6 / 8,
    "gbit": 10**9 / 8,
}
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)\s*(?:/\s*s)?")


def parse_rate(text: str) -> int:
    """``"10MiB/s"``, ``"500KB/s"``, ``"1GB/s"``, ``"100Mbit/s"`` (``/s`` optional) -> bytes per second."""
    m = _RATE.fullmatch(text.strip().lower())
    if m is None or m.group(2) not in _RATE_UNITS:
        raise ValueError(f"invalid rate {text!r} (examples: 10MiB/s, 500KB/s, 1GB/s, 100Mbit/s)")
    value = float(m.group(1)) * _RATE_UNITS[m.group(2)]
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"invalid rate {text!r}: must be at least 1 byte/s")
    return round(value)


def format_duration(seconds: int) -> str:
    """The inverse of :func:`parse_duration`: ``5400`` -> ``"1h30m"``, ``0`` -> ``"0s"``."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def format_rate(rate: int) -> str:
    """``10485760`` -> ``"10MiB/s"`` (exact binary units when they fit, else bytes)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if rate % size == 0:
            return f"{rate // size}{unit}/s"
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if rate % size == 0:
            return f"{rate // size}{unit}/s"
    return f"{rate}B/s"


def normalise_fingerprint(text: str) -> str:
    """``"sha256:AB:CD:..."`` (colons optional, any case) -> 64 lower-case hex digits."""
    scheme, sep, digits = text.strip().partition(":")
    if not sep or scheme.lower() != "sha256":
        raise ValueError(f"invalid fingerprint {text!r}: expected 'sha256:' and 64 hex digits")
    hexpart = digits.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", hexpart):
        raise ValueError(f"invalid fingerprint {text!r}: expected 'sha256:' and 64 hex digits")
    return hexpart


CRON_PRESETS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"})
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# (field name, lowest, highest, names from `lowest` on)
_CRON_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)


def _cron_value(text: str, lo: int, hi: int, names: tuple[str, ...]) -> int:
    if text.lower() in names:
        return lo + names.index(text.lower())
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise ValueError(text)
    return int(text)


def check_cron(expr: str) -> str:
    """Check a 5-field cron expression or an ``@hourly``-style preset; returns it tidied.

    Only the shape and the ranges are checked here; what the expression means is the scheduler's.
    """
    t = " ".join(expr.split())
    if t.startswith("@"):
        if t.lower() not in CRON_PRESETS:
            raise ValueError(f"invalid cron preset {expr!r} (one of {', '.join(sorted(CRON_PRESETS))})")
        return t.lower()
    parts = t.split(" ")
    if len(parts) != 5:
        raise ValueError(
            f"invalid cron expression {expr!r}: {len(parts)} fields, expected 5 (m h dom mon dow)"
        )
    for part, (name, lo, hi, names) in zip(parts, _CRON_FIELDS, strict=True):
        for item in part.split(","):
            base, slash, step = item.partition("/")
            try:
                if slash and (not step.isdigit() or int(step) == 0):
                    raise ValueError(step)
                if base != "*":
                    first, dash, last = base.partition("-")
                    a = _cron_value(first, lo, hi, names)
                    if dash and _cron_value(last, lo, hi, names) < a:
                        raise ValueError(base)
            except ValueError:
                raise ValueError(f"invalid cron expression {expr!r}: bad {name} {item!r}") from None
    return t


# datetime.weekday() order: Monday is 0.
_WEEKDAYS = {
    name: i
    for i, full in enumerate(("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))
    for name in (full, full[:3])
}


@dataclass(frozen=True)
class RateWindow:
    """``"Mon-Fri 08:00-18:00 2MiB/s"``: on these days (0 = Monday), between these minutes of the
    day (``end`` may be before ``start``: the window crosses midnight), this rate (``None``: unlimited)."""

    days: frozenset[int]
    start: int
    end: int
    rate: int | None


def _minutes(text: str, allow_24: bool) -> int:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if m is None:
        raise ValueError(text)
    h, mi = int(m.group(1)), int(m.group(2))
    if mi > 59 or h > 24 or (h == 24 and (mi or not allow_24)):
        raise ValueError(text)
    return h * 60 + mi


def parse_rate_window(text: str) -> RateWindow:
    """``"[DAYS] HH:MM-HH:MM RATE"``; DAYS like ``Mon-Fri``, ``Sat,Sun`` or ``*`` (default every day);
    RATE as :func:`parse_rate` or ``unlimited``."""
    parts = text.split()
    if len(parts) == 2:
        parts.insert(0, "*")
    hint = "expected like 'Mon-Fri 08:00-18:00 2MiB/s'"
    if len(parts) != 3:
        raise ValueError(f"invalid rate window {text!r}: {hint}")
    days_text, hours_text, rate_text = parts
    days: set[int] = set()
    try:
        for item in days_text.lower().split(","):
            if item == "*":
                days.update(range(7))
                continue
            first, dash, last = item.partition("-")
            if first not in _WEEKDAYS or (dash and last not in _WEEKDAYS):
                raise ValueError(item)
            a = _WEEKDAYS[first]
            b = _WEEKDAYS[last] if dash else a
            # Mon-Fri, or wrapping round the week end: Fri-Mon
            days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
        start_text, _, end_text = hours_text.partition("-")
        start, end = _minutes(start_text, False), _minutes(end_text, True)
        if start == end:
            raise ValueError(hours_text)
    except ValueError:
        raise ValueError(f"invalid rate window {text!r}: {hint}") from None
    rate = None if rate_text.lower() == "unlimited" else parse_rate(rate_text)
    return RateWindow(frozenset(days), start, end, rate)


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_uuid(text: str) -> bool:
    return _UUID.fullmatch(text) is not None


@dataclass(frozen=True)
class VmSelector:
    """One entry of a job's ``vms`` or ``exclude``: a VM UUID, a glob on the name, or ``tag:NAME``."""

    kind: Literal["uuid", "glob", "tag"]
    value: str

    @classmethod
    def parse(cls, text: str) -> VmSelector:
        if not text.strip():
            raise ValueError("empty VM selector")
        if text.startswith("tag:"):
            if not text[4:]:
                raise ValueError(f"empty tag in {text!r}")
            return cls("tag", text[4:])
        if is_uuid(text):
            return cls("uuid", text.lower())
        return cls("glob", text)

    def matches(self, vm_uuid: str, name_label: str, tags: Iterable[str] = ()) -> bool:
        if self.kind == "uuid":
            return vm_uuid.lower() == self.value
        if self.kind == "tag":
            return self.value in tags
        # Case-sensitive like XAPI's name_label, whatever the platform.
        return fnmatch.fnmatchcase(name_label, self.value)

    def __str__(self) -> str:
        return f"tag:{self.value}" if self.kind == "tag" else self.value


# ---------------------------------------------------------------------------------------------
# The configuration objects


def default_password_env(pool_name: str) -> str:
    """``site-a`` -> ``XENCR_SITE_A_PASSWORD``."""
    return f"XENCR_{re.sub(r'[^A-Z0-9]', '_', pool_name.upper())}_PASSWORD"


@dataclass(frozen=True, repr=False)
class PoolConfig:
    """A XAPI endpoint. No secret lives here, except a password found embedded in the URL of the
    config file (kept only as a :class:`Secret`, and warned about)."""

    name: str
    url: str
    username: str = "root"
    password_file: str | None = None
    password_env: str = ""  # "" -> XENCR_<NAME>_PASSWORD
    fingerprint: str | None = None  # 64 lower-case hex digits (sha256 of the DER certificate)
    verify_tls: bool = True
    url_password: Secret | None = field(default=None, compare=False)
    max_exports: int = 2  # disk exports from this pool at once (all jobs of one process)
    max_imports: int = 2  # disk imports into this pool at once

    def __post_init__(self) -> None:
        if not self.password_env:
            object.__setattr__(self, "password_env", default_password_env(self.name))
        if self.fingerprint is not None:
            object.__setattr__(self, "fingerprint", normalise_fingerprint(_with_scheme(self.fingerprint)))

    def __repr__(self) -> str:
        # Written out so that no field added later can leak a secret by default.
        return (
            f"PoolConfig(name={self.name!r}, url={self.url!r}, username={self.username!r}, "
            f"password_file={self.password_file!r}, password_env={self.password_env!r}, "
            f"fingerprint={self.fingerprint!r}, verify_tls={self.verify_tls!r}, "
            f"max_exports={self.max_exports!r}, max_imports={self.max_imports!r}"
            + (", url_password=<hidden>" if self.url_password is not None else "")
            + ")"
        )


def _with_scheme(fp: str) -> str:
    return fp if ":" in fp and fp.split(":", 1)[0].lower() == "sha256" else f"sha256:{fp}"


@dataclass(frozen=True)
class TargetConfig:
    """Where a job's replicas go: an SR (UUID or name_label) of a pool, and how networks map there."""

    pool: str
    sr: str
    network_map: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleConfig:
    """When a job runs, and what each of these runs keeps. Exactly one of ``cron`` and ``every``."""

    id: str
    cron: str | None = None
    every: int | None = None  # seconds
    timezone: str = "UTC"
    retention: int = 3
    full_interval: int = 0
    rpo: int | None = None  # seconds
    rate: int | None = None  # bytes per second
    rate_windows: list[str] = field(default_factory=list)

    @property
    def rpo_seconds(self) -> int | None:
        """The RPO to hold restore points to: ``rpo`` if set, else the interval (cron: unknown here)."""
        return self.rpo if self.rpo is not None else self.every


@dataclass(frozen=True)
class JobConfig:
    """What to protect (selectors evaluated at run time), from which pool, to where, and when."""

    name: str
    id: str
    pool: str
    vms: list[str]
    exclude: list[str]
    targets: list[TargetConfig]
    schedules: list[ScheduleConfig]
    concurrency: int = 2
    snapshot_mode: SnapshotMode = "normal"
    full_interval: int = 0
    vm_timeout: int | None = None  # seconds
    enabled: bool = True
    report_when: ReportWhen = "failure"
    webhook: str | None = None  # http(s) URL receiving the run report as JSON
    email_to: list[str] = field(default_factory=list)
    rpo: int | None = None  # seconds; the job's RPO, whatever its schedules say
    verify_import: bool = True  # read each disk back from the target before the commit
    health_check: HealthCheckConfig | None = None  # boot a clone of each new restore point
    transfer: TransferPath = "auto"  # "auto": NBD + CBT where the source pool offers it
    nbd_connections: int = 4  # NBD connections per disk
    purge_snapshot_data: bool = False  # keep only the CBT log of the source snapshots (NBD path)

    @property
    def selectors(self) -> list[VmSelector]:
        return [VmSelector.parse(v) for v in self.vms]

    @property
    def exclusions(self) -> list[VmSelector]:
        return [VmSelector.parse(v) for v in self.exclude]

    def selects(self, vm_uuid: str, name_label: str, tags: Iterable[str] = ()) -> bool:
        """Whether a VM is in this job: matched by some ``vms`` entry and by no ``exclude`` entry."""
        tags = list(tags)
        return any(s.matches(vm_uuid, name_label, tags) for s in self.selectors) and not any(
            s.matches(vm_uuid, name_label, tags) for s in self.exclusions
        )

    def schedule(self, schedule_id: str) -> ScheduleConfig:
        """A schedule by id; a :class:`ConfigError` naming the job's schedules otherwise."""
        for s in self.schedules:
            if s.id == schedule_id:
                return s
        known = ", ".join(s.id for s in self.schedules) or "none"
        raise ConfigError(f"job '{self.name}' has no schedule {schedule_id!r} (schedules: {known})")


@dataclass(frozen=True, repr=False)
class SmtpConfig:
    """The mail relay for job reports. The password comes from the environment or a 0600 file,
    never from the TOML text."""

    host: str
    port: int = 25
    security: SmtpSecurity = "none"
    username: str | None = None
    password: Secret | None = field(default=None, compare=False)
    sender: str = field(default_factory=lambda: f"xencr@{socket.gethostname()}")

    def __repr__(self) -> str:
        # Written out so that no field added later can leak a secret by default.
        return (
            f"SmtpConfig(host={self.host!r}, port={self.port!r}, security={self.security!r}, "
            f"username={self.username!r}, sender={self.sender!r}"
            + (", password=<hidden>" if self.password is not None else "")
            + ")"
        )


KEEP_HISTORY = 90 * 86400  # seconds: `[daemon] keep_history`'s default


@dataclass(frozen=True)
class DaemonConfig:
    """``xencr daemon``: where it serves and writes metrics, and how long a stop waits for transfers."""

    metrics_listen: str | None = None  # "HOST:PORT"
    metrics_textfile: Path | None = None
    grace: int = 60  # seconds between SIGTERM and cancelling what still runs
    # Runs older than this are forgotten (`StateDB.prune_history`: counters kept, and the newest
    # run of each VM and target); None: kept forever ("forever").
    keep_history: int | None = KEEP_HISTORY


@dataclass(frozen=True)
class WorkerConfig:
    """This host as a worker of a cluster (``xencr daemon`` with a PostgreSQL state): its name in
    the database (default ``<hostname>-<pid>``), the configured pools it may touch (empty: all),
    how long its claims last without a heartbeat, and how many tasks it runs at once."""

    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    pools: list[str] = field(default_factory=list)
    lease: int = 30  # seconds
    slots: int = 4


@dataclass(frozen=True)
class StatusConfig:
    """The status page (`xencr serve-status`, and the daemon's listener): where it listens, the
    TLS certificate and key and the basic-auth user it needs off loopback (the password from
    ``password_env`` or ``password_file``, read when serving, never from this file), how often
    it refreshes, and the address people reach it at (for links in reports)."""

    listen: str = "127.0.0.1:8080"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str | None = None
    password_env: str = STATUS_PASSWORD_ENV
    password_file: Path | None = None
    refresh: int = 30  # seconds between the page's updates (and between two asks of the pools)
    url: str | None = None  # e.g. "https://dr.example.com:8443/"


GateKind = Literal["power_state", "guest_tools", "xenstore"]
GATE_KINDS: tuple[GateKind, ...] = ("power_state", "guest_tools", "xenstore")


@dataclass(frozen=True)
class HealthGate:
    """What a failover waits for before the next group starts: the VM running (``power_state``),
    its guest metrics present with PV drivers up (``guest_tools``), or a xenstore ``key`` the
    guest writes (``xenstore``), each for at most ``timeout`` seconds."""

    kind: GateKind
    timeout: int
    key: str | None = None  # only for "xenstore"

    def describe(self) -> str:
        what = f"xenstore key {self.key!r}" if self.kind == "xenstore" else self.kind
        return f"{what} within {format_duration(self.timeout)}"


@dataclass(frozen=True)
class HealthCheckConfig:
    """A job's health check (SPEC 8): after each successful run, a clone of every new restore
    point boots without network until ``gate`` passes or times out, then goes. ``sr`` (name or
    UUID, on each target's pool): clone onto it (a full copy) instead of beside the replica."""

    gate: HealthGate
    sr: str | None = None


@dataclass(frozen=True)
class PlanGroup:
    """VMs that start together (selectors as a job's ``vms``), the wait after them, their gate."""

    vms: list[str]
    start_delay: int = 0  # seconds after the group's VMs started (and passed the gate)
    gate: HealthGate | None = None

    @property
    def selectors(self) -> list[VmSelector]:
        return [VmSelector.parse(v) for v in self.vms]


@dataclass(frozen=True)
class PlanHook:
    """A command run after one VM starts (its argv, never through a shell); its exit code is
    part of the VM's gate."""

    vm: str  # a selector matching exactly the VMs the hook is for
    command: list[str]
    timeout: int = 600

    @property
    def selector(self) -> VmSelector:
        return VmSelector.parse(self.vm)


@dataclass(frozen=True)
class PlanConfig:
    """A failover runbook: the VMs it recovers (every VM of ``jobs`` and each VM ``vms``
    selects among the configured jobs' replicas), their start groups (none: from the order and
    start delay each replica carries), the network map on the DR side, and the hooks."""

    name: str
    jobs: list[str]
    vms: list[str]
    groups: list[PlanGroup] = field(default_factory=list)
    gate: HealthGate | None = None  # for groups without their own, and groups from carried order
    network_map: dict[str, str] = field(default_factory=dict)
    hooks: list[PlanHook] = field(default_factory=list)

    @property
    def selectors(self) -> list[VmSelector]:
        return [VmSelector.parse(v) for v in self.vms]


STATE_ENGINES = ("sqlite", "postgresql")


@dataclass(frozen=True)
class StateLocation:
    """Where the state database is: an SQLite file (``path``, the default), or a PostgreSQL
    database (``url``: ``postgresql+psycopg://user@host:port/dbname[?options]``, never with a
    password). PostgreSQL's password comes, when the server asks for one, from the environment
    variable ``password_env``, else from ``password_file`` (mode 0600), else from libpq's own
    sources (``~/.pgpass``); it is read when the database is opened (`password`), never kept here.
    ``local_dir``: where this host keeps the files that live beside the state (``locks/``,
    ``hosts/``): the SQLite file's directory, or for PostgreSQL the data directory."""

    path: Path | None = None
    url: str | None = None
    password_env: str = STATE_PASSWORD_ENV
    password_file: Path | None = None
    local_dir: Path | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.url is None):
            raise ValueError("a state location is a path or a URL")
        if self.url is not None:
            object.__setattr__(self, "url", postgresql_url(self.url))
        if self.local_dir is None:
            local = self.path.parent if self.path is not None else default_state_path().parent
            object.__setattr__(self, "local_dir", local)

    @property
    def engine(self) -> str:
        """``sqlite`` or ``postgresql`` (`STATE_ENGINES`)."""
        return "sqlite" if self.path is not None else "postgresql"

    def describe(self) -> str:
        """The location for people: the SQLite path, or ``PostgreSQL user@host:port/dbname``
        (no password, no options)."""
        if self.path is not None:
            return str(self.path)
        assert self.url is not None
        parts = urlsplit(self.url)
        return f"PostgreSQL {parts.netloc}{parts.path}"

    def exists(self) -> bool:
        """Whether there may be history to read: the SQLite file exists; a PostgreSQL database is
        taken to (opening it says otherwise)."""
        return self.path.exists() if self.path is not None else True

    @property
    def local_path(self) -> Path:
        """A path whose directory is `local_dir`, for the helpers that place files beside the state
        (`service.locks.lock_dir`, `xapi.members.hosts_path`): the SQLite file itself."""
        assert self.local_dir is not None
        return self.path if self.path is not None else self.local_dir / "state.postgresql"

    def password(self) -> Secret | None:
        """PostgreSQL's password from `password_env` or `password_file` (None: neither set; libpq
        looks in ~/.pgpass). A :class:`credentials.CredentialError` names a file it cannot use."""
        value = os.environ.get(self.password_env) or None
        if value is None and self.password_file is not None:
            try:
                value = credentials.read_password_file(self.password_file, _STATE)
            except credentials.CredentialError as err:
                text = str(err).replace(f" of pool '{_STATE}'", " of the state database")
                raise credentials.CredentialError(text) from None
        return Secret(value) if value is not None else None

    def password_source(self) -> str:
        """Where `password` would come from now: ``env X``, ``file P``, or ``libpq (~/.pgpass)``."""
        if os.environ.get(self.password_env):
            return f"env {self.password_env}"
        if self.password_file is not None:
            return f"file {self.password_file}"
        return "libpq (~/.pgpass, or none)"


_STATE = "\0state"  # a pool name no pool can have, to strip from credential messages
_PG_SCHEMES = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg"}


def is_database_url(text: str) -> bool:
    """Whether a ``state`` value names a database server (``scheme://``) rather than a file."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text.strip()) is not None


def postgresql_url(text: str) -> str:
    """``postgresql://user@host:port/db`` in the form the state database connects with
    (``postgresql+psycopg://...``). A :class:`ValueError` (which never repeats a password) for
    another scheme or driver, a URL without host or database, or one that carries a password."""
    text = text.strip()
    scheme, _, rest = text.partition("://")
    scheme = _PG_SCHEMES.get(scheme.lower(), scheme.lower())
    if scheme != "postgresql+psycopg":
        raise ValueError(
            f"unsupported database URL scheme {scheme!r}: expected postgresql:// (psycopg 3 driver)"
        )
    _, _, password = credentials.split_url_credentials(text)
    query = rest.partition("?")[2]
    if password is not None or re.search(r"(^|&)password=", query):
        raise ValueError(
            f"the URL carries a password; remove it and set {STATE_PASSWORD_ENV} (or the variable "
            "named by password_env), or password_file (mode 0600) in [state]"
        )
    parts = urlsplit(f"{scheme}://{rest}")
    try:
        parts.port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ValueError(f"invalid port in {text!r}") from None
    if not parts.hostname and "host=" not in query:
        raise ValueError(f"no host in {text!r}: expected postgresql://user@host[:port]/dbname")
    if parts.path.strip("/") == "":
        raise ValueError(f"no database name in {text!r}: expected postgresql://user@host[:port]/dbname")
    return f"{scheme}://{rest}"


@dataclass(frozen=True)
class Config:
    path: Path
    pools: dict[str, PoolConfig]
    jobs: dict[str, JobConfig]
    state: StateLocation
    smtp: SmtpConfig | None = None
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    plans: dict[str, PlanConfig] = field(default_factory=dict)
    status: StatusConfig = field(default_factory=StatusConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)

    def plan(self, name: str) -> PlanConfig:
        """A failover plan by name; a :class:`ConfigError` naming the known plans otherwise."""
        if name in self.plans:
            return self.plans[name]
        known = ", ".join(self.plans) or "none"
        raise ConfigError(f"no plan {name!r} (plans: {known})", path=self.path)

    def job(self, ref: str) -> JobConfig:
        """A job by name or id; a :class:`ConfigError` naming the known jobs otherwise."""
        if ref in self.jobs:
            return self.jobs[ref]
        for job in self.jobs.values():
            if job.id == ref:
                return job
        known = ", ".join(self.jobs) or "none"
        raise ConfigError(f"no job {ref!r} (jobs: {known})", path=self.path)

    def pool(self, name: str) -> PoolConfig:
        if name in self.pools:
            return self.pools[name]
        known = ", ".join(self.pools) or "none"
        raise ConfigError(f"no pool {name!r} (pools: {known})", path=self.path)


def job_id_for(name: str) -> str:
    return str(uuid.uuid5(JOB_NAMESPACE, name))


def schedule_id_for(job_id: str, cron: str | None, every: int | None) -> str:
    # From the timing, not the position: removing one schedule must not hand its id (and so its
    # restore points and their retention) to another. Changing the timing makes a new schedule.
    timing = f"cron:{cron}" if cron is not None else f"every:{every}"
    return str(uuid.uuid5(JOB_NAMESPACE, f"{job_id}/{timing}"))


# ---------------------------------------------------------------------------------------------
# Paths


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var)
    # XDG: a relative value is invalid and must be ignored.
    return Path(base) if base and os.path.isabs(base) else Path.home() / fallback


def default_config_path() -> Path:
    """``$XENCR_CONFIG``, else ``$XDG_CONFIG_HOME/xencr/xencr.toml`` (``~/.config/xencr/xencr.toml``)."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    return _xdg("XDG_CONFIG_HOME", ".config") / "xencr" / "xencr.toml"


def default_state_path() -> Path:
    """``$XDG_DATA_HOME/xencr/state.sqlite`` (``~/.local/share/xencr/state.sqlite``)."""
    return _xdg("XDG_DATA_HOME", ".local/share") / "xencr" / "state.sqlite"


# ---------------------------------------------------------------------------------------------
# Reading


# A bare key, or one already indexed by us (`targets[0]`), is written as is; others are quoted.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+(\[\d+\])?")
T = TypeVar("T")
_MISSING: Any = object()


def _key(parent: str, name: str) -> str:
    part = name if _BARE_KEY.fullmatch(name) else '"' + name.replace('"', '\\"') + '"'
    return f"{parent}.{part}" if parent else part


_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def _type_name(v: object) -> str:
    return _TYPE_NAMES.get(type(v), f"a {type(v).__name__}")


class _Table:
    """One TOML table being read: every key taken is checked; any key left over is an error."""

    def __init__(self, path: Path, key: str, data: object) -> None:
        self.path = path
        self.key = key
        if not isinstance(data, dict):
            raise self.error(None, f"must be a table, not {_type_name(data)}")
        self.data: dict[str, Any] = data
        self.taken: set[str] = set()

    def error(self, name: str | int | None, message: str) -> ConfigError:
        if name is None:
            where = self.key
        elif isinstance(name, int):
            where = f"{self.key}[{name}]"
        else:
            where = _key(self.key, name)
        return ConfigError(message, path=self.path, key=where or None)

    def get(self, name: str, kind: type[T] | tuple[type, ...], default: Any = _MISSING) -> T:
        self.taken.add(name)
        if name not in self.data:
            if default is _MISSING:
                raise self.error(None, f"missing key '{name}'")
            return cast(T, default)
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML booleans are not integers, whatever Python thinks.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(name, f"must be {want}, not {_type_name(value)}")
        return cast(T, value)

    def text(self, name: str, default: Any = _MISSING) -> str:
        value: str = self.get(name, str, default)
        if value is not None and not value.strip():
            raise self.error(name, "must not be empty")
        return value

    def integer(self, name: str, default: int | None, minimum: int) -> int:
        value: int = self.get(name, int, default)
        if value is not None and value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        return value

    def converted(self, name: str, parse: Callable[[str], int], minimum: int = 1) -> int | None:
        """A duration or a rate: a string with a unit, or a plain integer (seconds, bytes/s)."""
        raw: str | int | None = self.get(name, (str, int), None)
        if raw is None:
            return None
        try:
            value = raw if isinstance(raw, int) else parse(raw)
        except ValueError as err:
            raise self.error(name, str(err)) from None
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {raw!r}")
        return value

    def strings(self, name: str, default: Any = _MISSING) -> list[str]:
        value: list[Any] = self.get(name, list, default)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{name}[{i}]", f"must be a string, not {_type_name(item)}")
        return list(value)

    def sub(self, name: str, default: Any = _MISSING) -> _Table:
        value = self.get(name, dict, default)
        return _Table(self.path, _key(self.key, name), value)

    def tables(self, name: str) -> list[_Table]:
        value: list[Any] = self.get(name, list, [])
        return [_Table(self.path, f"{_key(self.key, name)}[{i}]", item) for i, item in enumerate(value)]

    def finish(self) -> None:
        unknown = [k for k in self.data if k not in self.taken]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, sorted(self.taken), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = self.key or None
            raise ConfigError(f"unknown key '{name}'{hint}", path=self.path, key=where)


def _resolve_path(base: Path, text: str) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def _read_pool(path: Path, name: str, t: _Table, warn: Callable[[str], None]) -> PoolConfig:
    if not name.strip():
        raise t.error(None, "a pool name must not be empty")
    raw_url = t.text("url")
    url, url_user, url_password = credentials.split_url_credentials(raw_url.strip())
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in ("https", "http") or not parts.hostname or not port_ok:
        # Echo only what cannot hold a password (split_url_credentials needs a scheme to find one).
        shown = f" {url!r}" if "@" not in url else ""
        raise t.error("url", f"invalid URL{shown}: expected https://host[:port]")
    url = url.rstrip("/") if parts.path in ("", "/") else url
    username = t.get("username", str, None)
    if username is None:
        username = url_user or "root"
    elif url_user is not None and url_user != username:
        raise t.error("url", f"user '{url_user}' in the URL differs from username '{username}'")
    if not username:
        raise t.error("username", "must not be empty")
    password_file = t.get("password_file", str, None)
    if password_file is not None:
        password_file = str(_resolve_path(path.parent, password_file))
    password_env: str = t.get("password_env", str, "")
    if password_env and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", password_env):
        raise t.error("password_env", f"invalid environment variable name {password_env!r}")
    if url_password is not None:
        warn(
            f"{path}: {_key(t.key, 'url')}: the URL carries a password; it is used, but set "
            f"{password_env or default_password_env(name)} or password_file instead and remove it "
            "from the URL"
        )
    fingerprint = t.get("fingerprint", str, None)
    if fingerprint is not None:
        try:
            fingerprint = normalise_fingerprint(fingerprint)
        except ValueError as err:
            raise t.error("fingerprint", str(err)) from None
    verify_tls = t.get("verify_tls", bool, True)
    max_exports = t.integer("max_exports", 2, 1)
    max_imports = t.integer("max_imports", 2, 1)
    t.finish()
    return PoolConfig(
        name=name,
        url=url,
        username=username,
        password_file=password_file,
        password_env=password_env,
        fingerprint=fingerprint,
        verify_tls=verify_tls,
        url_password=Secret(url_password) if url_password is not None else None,
        max_exports=max_exports,
        max_imports=max_imports,
    )


def _read_schedule(t: _Table, job_id: str) -> ScheduleConfig:
    cron = t.get("cron", str, None)
    every = t.converted("every", parse_duration)
    if (cron is None) == (every is None):
        raise t.error(None, "needs exactly one of 'cron' and 'every'")
    if cron is not None:
        try:
            cron = check_cron(cron)
        except ValueError as err:
            raise t.error("cron", str(err)) from None
    timezone: str = t.text("timezone", "UTC")
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise t.error(
            "timezone", f"unknown time zone {timezone!r} (an IANA name like 'Europe/Paris')"
        ) from None
    schedule_id: str = t.text("id", None) or schedule_id_for(job_id, cron, every)
    windows = t.strings("rate_windows", [])
    for i, w in enumerate(windows):
        try:
            parse_rate_window(w)
        except ValueError as err:
            raise t.error(f"rate_windows[{i}]", str(err)) from None
    schedule = ScheduleConfig(
        id=schedule_id,
        cron=cron,
        every=every,
        timezone=timezone,
        retention=t.integer("retention", 3, 1),
        full_interval=t.integer("full_interval", 0, 0),
        rpo=t.converted("rpo", parse_duration),
        rate=t.converted("rate", parse_rate),
        rate_windows=windows,
    )
    t.finish()
    return schedule


def _read_target(t: _Table, pools: Mapping[str, PoolConfig]) -> TargetConfig:
    pool = t.text("pool")
    if pool not in pools:
        raise t.error(None, f"unknown pool '{pool}'")
    sr = t.text("sr")
    nm = t.sub("network_map", {})
    network_map = {k: nm.get(k, str) for k in nm.data}
    for k, v in network_map.items():
        if not v.strip():
            raise nm.error(k, "must not be empty")
    nm.finish()
    t.finish()
    return TargetConfig(pool=pool, sr=sr, network_map=network_map)


def _selectors(t: _Table, name: str, default: Any) -> list[str]:
    values = t.strings(name, default)
    for i, v in enumerate(values):
        try:
            VmSelector.parse(v)
        except ValueError as err:
            raise t.error(f"{name}[{i}]", str(err)) from None
    return values


def _http_url(t: _Table, name: str) -> str | None:
    url: str | None = t.get(name, str, None)
    if url is None:
        return None
    try:
        parts = urlsplit(url.strip())
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:
        ok = False
    if not ok:
        # Not echoed: a webhook URL often carries its token.
        raise t.error(name, "invalid URL: expected http(s)://host[:port]/path")
    return url.strip()


_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


def _read_job(name: str, t: _Table, pools: Mapping[str, PoolConfig], smtp: SmtpConfig | None) -> JobConfig:
    if not name.strip():
        raise t.error(None, "a job name must not be empty")
    job_id = t.text("id", None) or job_id_for(name)
    pool = t.text("pool")
    if pool not in pools:
        raise t.error("pool", f"unknown pool '{pool}'")
    vms = _selectors(t, "vms", _MISSING)
    if not vms:
        raise t.error("vms", "selects no VM (give UUIDs, name globs like 'web-*', or 'tag:NAME')")
    exclude = _selectors(t, "exclude", [])
    targets = [_read_target(tt, pools) for tt in t.tables("targets")]
    if not targets:
        raise t.error(None, "needs at least one [[targets]] table")
    seen: dict[tuple[str, str], int] = {}
    for i, target in enumerate(targets):
        if (target.pool, target.sr) in seen:
            raise t.error(f"targets[{i}]", f"same pool and SR as targets[{seen[target.pool, target.sr]}]")
        seen[target.pool, target.sr] = i
    schedules = [_read_schedule(st, job_id) for st in t.tables("schedules")]
    ids: dict[str, int] = {}
    for i, s in enumerate(schedules):
        if s.id in ids:
            raise t.error(f"schedules[{i}]", f"same id as schedules[{ids[s.id]}] (give each an 'id')")
        ids[s.id] = i
    mode = t.get("snapshot_mode", str, "normal")
    if mode not in SNAPSHOT_MODES:
        raise t.error("snapshot_mode", f"must be one of {', '.join(SNAPSHOT_MODES)}, not {mode!r}")
    report_when: str = t.get("report_when", str, "failure")
    if report_when not in REPORT_WHEN:
        raise t.error("report_when", f"must be one of {', '.join(REPORT_WHEN)}, not {report_when!r}")
    transfer = t.get("transfer", str, "auto")
    if transfer not in TRANSFER_PATHS:
        raise t.error("transfer", f"must be one of {', '.join(TRANSFER_PATHS)}, not {transfer!r}")
    email_to = t.strings("email_to", [])
    for i, address in enumerate(email_to):
        if not _EMAIL.fullmatch(address.strip()):
            raise t.error(f"email_to[{i}]", f"invalid e-mail address {address!r}")
    if email_to and smtp is None:
        raise t.error("email_to", "needs an [smtp] table saying which mail server to use")
    job = JobConfig(
        name=name,
        id=job_id,
        pool=pool,
        vms=vms,
        exclude=exclude,
        targets=targets,
        schedules=schedules,
        concurrency=t.integer("concurrency", 2, 1),
        snapshot_mode=mode,
        full_interval=t.integer("full_interval", 0, 0),
        vm_timeout=t.converted("vm_timeout", parse_duration),
        enabled=t.get("enabled", bool, True),
        report_when=report_when,
        webhook=_http_url(t, "webhook"),
        email_to=[a.strip() for a in email_to],
        rpo=t.converted("rpo", parse_duration),
        verify_import=t.get("verify_import", bool, True),
        health_check=_read_health_check(t.sub("health_check")) if "health_check" in t.data else None,
        transfer=transfer,
        nbd_connections=t.integer("nbd_connections", 4, 1),
        purge_snapshot_data=t.get("purge_snapshot_data", bool, False),
    )
    if job.nbd_connections > MAX_NBD_CONNECTIONS:
        raise t.error("nbd_connections", f"at most {MAX_NBD_CONNECTIONS}, not {job.nbd_connections}")
    if job.purge_snapshot_data and job.transfer == "stream":
        raise t.error(
            "purge_snapshot_data", "needs the NBD path: the stream path exports deltas from the data"
        )
    t.finish()
    return job


def _read_health_check(t: _Table) -> HealthCheckConfig:
    """``health_check = { gate = ..., key = ..., timeout = ..., sr = ... }``: the gate reads as a
    plan's (`_read_gate`), its kind under ``gate`` (default ``guest_tools``)."""
    gate = _gate_of(t, "gate", t.get("gate", str, "guest_tools"))
    sr = t.text("sr", None)
    t.finish()
    return HealthCheckConfig(gate=gate, sr=sr.strip() if sr is not None else None)


def _read_smtp(path: Path, t: _Table) -> SmtpConfig:
    host = t.text("host").strip()
    security: str = t.get("security", str, "none")
    if security not in SMTP_SECURITY:
        raise t.error("security", f"must be one of {', '.join(SMTP_SECURITY)}, not {security!r}")
    # The usual port of each kind of connection unless one is given.
    port = t.integer("port", {"none": 25, "starttls": 587, "tls": 465}[security], 1)
    if port > 65535:
        raise t.error("port", f"must be at most 65535, not {port}")
    username = t.get("username", str, None)
    if username is not None and not username:
        raise t.error("username", "must not be empty")
    if "password" in t.data:
        t.taken.add("password")
        raise t.error("password", f"is not read from the file: set {SMTP_PASSWORD_ENV} or password_file")
    password_env: str = t.get("password_env", str, SMTP_PASSWORD_ENV)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", password_env):
        raise t.error("password_env", f"invalid environment variable name {password_env!r}")
    password_file = t.get("password_file", str, None)
    sender = t.get("sender", str, None)
    if sender is not None and not _EMAIL.fullmatch(sender.strip()):
        raise t.error("sender", f"invalid e-mail address {sender!r}")
    t.finish()
    password: str | None = os.environ.get(password_env) or None
    if password is None and password_file is not None:
        try:
            password = credentials.read_password_file(_resolve_path(path.parent, password_file), _SMTP)
        except credentials.CredentialError as err:
            raise t.error("password_file", str(err).replace(f" of pool '{_SMTP}'", "")) from None
    return SmtpConfig(
        host=host,
        port=port,
        security=security,
        username=username,
        password=Secret(password) if password is not None else None,
        **({"sender": sender.strip()} if sender is not None else {}),
    )


_SMTP = "\0smtp"  # a pool name no pool can have, to strip from credential messages


def _read_state(path: Path, top: _Table) -> StateLocation:
    """``state = "PATH"`` (SQLite) or ``state = "postgresql://user@host/db"``, or a ``[state]``
    table: ``path`` or ``url``, with ``password_env``, ``password_file``, ``local_dir``."""
    if isinstance(top.data.get("state"), dict):
        t = top.sub("state")
        where, raw = ("url", t.text("url", None)) if "url" in t.data else ("path", t.text("path", None))
        if "url" in t.data and "path" in t.data:
            raise t.error("path", "give 'url' (PostgreSQL) or 'path' (SQLite), not both")
        if "password" in t.data:
            t.taken.add("password")
            raise t.error("password", f"is not read from the file: set {STATE_PASSWORD_ENV} or password_file")
        password_env: str = t.get("password_env", str, STATE_PASSWORD_ENV)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", password_env):
            raise t.error("password_env", f"invalid environment variable name {password_env!r}")
        password_file = t.text("password_file", None)
        local_dir = t.text("local_dir", None)
        t.finish()
    else:
        t, where, raw = top, "state", top.text("state", None)
        password_env, password_file, local_dir = STATE_PASSWORD_ENV, None, None
    extra: dict[str, Any] = {
        "password_env": password_env,
        "password_file": _resolve_path(path.parent, password_file) if password_file else None,
        "local_dir": _resolve_path(path.parent, local_dir) if local_dir else None,
    }
    if raw is None:
        return StateLocation(path=default_state_path(), **extra)
    if not is_database_url(raw):
        if where == "url":
            raise t.error("url", "expected postgresql://user@host[:port]/dbname (a file goes in 'path')")
        return StateLocation(path=_resolve_path(path.parent, raw), **extra)
    try:
        return StateLocation(url=postgresql_url(raw), **extra)
    except ValueError as err:
        raise t.error(where, str(err)) from None


def _read_daemon(path: Path, t: _Table) -> DaemonConfig:
    listen = t.get("metrics_listen", str, None)
    if listen is not None:
        host, colon, port = listen.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise t.error(
                "metrics_listen", f"invalid address {listen!r}: expected HOST:PORT like 127.0.0.1:9464"
            )
    textfile = t.get("metrics_textfile", str, None)
    grace = t.converted("grace", parse_duration, minimum=0)
    keep: str | int | None = t.get("keep_history", (str, int), None)
    keep_history: int | None = KEEP_HISTORY
    if isinstance(keep, str) and keep.strip().lower() == "forever":
        keep_history = None
    elif keep is not None:
        keep_history = t.converted("keep_history", parse_duration, minimum=3600)
    t.finish()
    return DaemonConfig(
        metrics_listen=listen.strip() if listen is not None else None,
        metrics_textfile=_resolve_path(path.parent, textfile) if textfile else None,
        grace=60 if grace is None else grace,
        keep_history=keep_history,
    )


def _read_worker(t: _Table, pools: Mapping[str, PoolConfig]) -> WorkerConfig:
    name = t.text("name", None)
    if name is not None and (name != name.strip() or any(c in name for c in ",\n\t")):
        raise t.error("name", f"invalid worker name {name!r}: no spaces around it, no comma")
    names = t.strings("pools", [])
    for i, p in enumerate(names):
        if p not in pools:
            raise t.error(f"pools[{i}]", f"unknown pool '{p}' (pools: {', '.join(pools) or 'none'})")
    lease = t.converted("lease", parse_duration, minimum=2)
    slots = t.integer("slots", WorkerConfig.slots, 1)
    t.finish()
    return WorkerConfig(
        **({"name": name} if name is not None else {}),
        pools=list(dict.fromkeys(names)),
        lease=WorkerConfig.lease if lease is None else lease,
        slots=slots,
    )


def _read_status(path: Path, t: _Table) -> StatusConfig:
    listen: str = t.text("listen", StatusConfig.listen).strip()
    host, colon, port = listen.rpartition(":")
    if not colon or not host or not port.isdigit() or not int(port) < 65536:
        raise t.error("listen", f"invalid address {listen!r}: expected HOST:PORT like 127.0.0.1:8080")
    cert, key = t.text("tls_cert", None), t.text("tls_key", None)
    if (cert is None) != (key is None):
        raise t.error("tls_key" if key is None else "tls_cert", "tls_cert and tls_key go together")
    username = t.text("username", None)
    if "password" in t.data:
        t.taken.add("password")
        raise t.error("password", f"is not read from the file: set {STATUS_PASSWORD_ENV} or password_file")
    password_env: str = t.get("password_env", str, STATUS_PASSWORD_ENV)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", password_env):
        raise t.error("password_env", f"invalid environment variable name {password_env!r}")
    password_file = t.text("password_file", None)
    if password_file is not None and username is None:
        raise t.error("password_file", "a password needs its 'username'")
    refresh = t.converted("refresh", parse_duration, minimum=5)
    url = _http_url(t, "url")
    t.finish()
    return StatusConfig(
        listen=listen,
        tls_cert=_resolve_path(path.parent, cert) if cert else None,
        tls_key=_resolve_path(path.parent, key) if key else None,
        username=username,
        password_env=password_env,
        password_file=_resolve_path(path.parent, password_file) if password_file else None,
        refresh=StatusConfig.refresh if refresh is None else refresh,
        url=url,
    )


def _read_gate(t: _Table) -> HealthGate:
    gate = _gate_of(t, "kind", t.get("kind", str))
    t.finish()
    return gate


def _gate_of(t: _Table, kind_key: str, kind: str) -> HealthGate:
    """A gate from a table's ``kind`` (read from ``kind_key``), ``key`` and ``timeout`` (5m)."""
    if kind not in GATE_KINDS:
        raise t.error(kind_key, f"must be one of {', '.join(GATE_KINDS)}, not {kind!r}")
    key = t.text("key", None)
    if kind == "xenstore" and key is None:
        raise t.error(None, "a xenstore gate needs the 'key' the guest writes")
    if kind != "xenstore" and key is not None:
        raise t.error("key", f"only a xenstore gate has a key, not a {kind} gate")
    timeout = t.converted("timeout", parse_duration)
    return HealthGate(kind=kind, timeout=300 if timeout is None else timeout, key=key)


def _read_group(t: _Table) -> PlanGroup:
    vms = _selectors(t, "vms", _MISSING)
    if not vms:
        raise t.error("vms", "selects no VM (give UUIDs, name globs like 'db-*', or 'tag:NAME')")
    delay = t.converted("start_delay", parse_duration, minimum=0)
    gate = _read_gate(t.sub("gate")) if "gate" in t.data else None
    t.finish()
    return PlanGroup(vms=vms, start_delay=delay or 0, gate=gate)


def _read_hook(t: _Table) -> PlanHook:
    vm = t.text("vm")
    try:
        VmSelector.parse(vm)
    except ValueError as err:
        raise t.error("vm", str(err)) from None
    if isinstance(t.data.get("command"), str):
        t.taken.add("command")
        raise t.error("command", "must be an array of arguments (argv), not a string: no shell runs it")
    command = t.strings("command")
    if not command or not command[0].strip():
        raise t.error("command", "must name the program to run first")
    timeout = t.converted("timeout", parse_duration)
    t.finish()
    return PlanHook(vm=vm, command=command, timeout=600 if timeout is None else timeout)


def _read_plan(t: _Table, jobs: Mapping[str, JobConfig]) -> PlanConfig:
    name = t.text("name")
    plan_jobs = t.strings("jobs", [])
    for i, j in enumerate(plan_jobs):
        if j not in jobs:
            raise t.error(f"jobs[{i}]", f"unknown job '{j}'")
    vms = _selectors(t, "vms", [])
    if not plan_jobs and not vms:
        raise t.error(None, "covers no VM: give 'jobs', 'vms' or both")
    gate = _read_gate(t.sub("gate")) if "gate" in t.data else None
    groups = [_read_group(gt) for gt in t.tables("groups")]
    nm = t.sub("network_map", {})
    network_map = {k: nm.get(k, str) for k in nm.data}
    for k, v in network_map.items():
        if not v.strip():
            raise nm.error(k, "must not be empty")
    nm.finish()
    hooks = [_read_hook(ht) for ht in t.tables("hooks")]
    t.finish()
    return PlanConfig(
        name=name, jobs=plan_jobs, vms=vms, groups=groups, gate=gate, network_map=network_map, hooks=hooks
    )


def _read_plans(top: _Table, jobs: Mapping[str, JobConfig]) -> dict[str, PlanConfig]:
    """The ``[[plan]]`` tables. A VM belongs to one plan at most: the same job, or the same VM
    named literally (UUID or plain name), in two plans is refused here; overlaps only the pools
    can reveal (a glob, a tag) are problems of the failover preview."""
    plans: dict[str, PlanConfig] = {}
    job_owner: dict[str, str] = {}
    vm_owner: dict[str, str] = {}
    for pt in top.tables("plan"):
        plan = _read_plan(pt, jobs)
        if plan.name in plans:
            raise pt.error("name", f"plan '{plan.name}' is defined twice")
        for k, j in enumerate(plan.jobs):
            if job_owner.get(j, plan.name) != plan.name:
                raise pt.error(f"jobs[{k}]", f"job '{j}' is already in plan '{job_owner[j]}'")
            job_owner[j] = plan.name
        for k, s in enumerate(plan.selectors):
            literal = s.kind == "uuid" or (s.kind == "glob" and not any(c in s.value for c in "*?["))
            if literal and vm_owner.get(s.value, plan.name) != plan.name:
                raise pt.error(f"vms[{k}]", f"VM '{s}' is already in plan '{vm_owner[s.value]}'")
            if literal:
                vm_owner[s.value] = plan.name
        plans[plan.name] = plan
    return plans


def parse_config(text: str, path: Path, *, warn: Callable[[str], None] | None = None) -> Config:
    """Check and build a :class:`Config` from TOML text; ``path`` names it in errors and anchors
    relative paths."""
    warn = warn or credentials.warn
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML: {err}", path=path) from None
    top = _Table(path, "", data)
    state = _read_state(path, top)
    pools_t = top.sub("pools", {})
    pools = {name: _read_pool(path, name, pools_t.sub(name), warn) for name in pools_t.data}
    pools_t.taken.update(pools)
    smtp = _read_smtp(path, top.sub("smtp")) if "smtp" in top.data else None
    top.taken.add("smtp")
    daemon = _read_daemon(path, top.sub("daemon", {}))
    status = _read_status(path, top.sub("status", {}))
    jobs_t = top.sub("jobs", {})
    jobs = {name: _read_job(name, jobs_t.sub(name), pools, smtp) for name in jobs_t.data}
    owners: dict[str, str] = {}
    for job in jobs.values():
        if job.id in owners:
            raise jobs_t.error(job.name, f"same id as job '{owners[job.id]}'")
        owners[job.id] = job.name
    plans = _read_plans(top, jobs)
    worker = _read_worker(top.sub("worker", {}), pools)
    top.finish()
    return Config(
        path=path,
        pools=pools,
        jobs=jobs,
        state=state,
        smtp=smtp,
        daemon=daemon,
        plans=plans,
        status=status,
        worker=worker,
    )


def load_config(path: Path | None = None, *, warn: Callable[[str], None] | None = None) -> Config:
    """Read and check the configuration at ``path`` (default: :func:`default_config_path`).

    ``warn`` receives warnings (a password in a pool URL); default: :func:`credentials.warn`.
    """
    path = Path(path).expanduser() if path is not None else default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file (write a sample with `xencr init`)", path=path) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a file", path=path) from None
    except OSError as err:
        raise ConfigError(err.strerror or str(err), path=path) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path=path) from None
    return parse_config(text, path, warn=warn)


SAMPLE_CONFIG = """\
# xencr configuration: pools, jobs, their targets and schedules.
# Path: --config PATH, or $XENCR_CONFIG, or ~/.config/xencr/xencr.toml.
# Every key is checked when the file is read: an unknown key is an error, not ignored.
# Durations: "90s", "10m", "2h", "1d", "1h30m". Rates: "10MiB/s", "500KB/s", "1GB/s", "100Mbit/s".

# Run history and the other records (the state database). Default: the SQLite file
# ~/.local/share/xencr/state.sqlite; a relative path is relative to this file.
# state = "~/.local/share/xencr/state.sqlite"
# PostgreSQL instead (several xencr hosts sharing one state; `xencr state migrate --to URL`
# copies an SQLite state there first), without the password:
#   state = "postgresql://xencr@db.example.com:5432/xencr"
# The password comes from $XENCR_STATE_PASSWORD, else from libpq's ~/.pgpass; to name another
# variable or a password file (mode 0600), use a [state] table instead of the line above:
#   [state]
#   url = "postgresql://xencr@db.example.com:5432/xencr?sslmode=verify-full"
#   password_env = "XENCR_STATE_PASSWORD"
#   password_file = "/etc/xencr/state.password"
#   local_dir = "/var/lib/xencr"   # this host's lock files and pool host lists

# ---------------------------------------------------------------------------------------------
# The daemon (`xencr daemon`).

[daemon]
grace = "60s"                   # on SIGTERM, transfers still running after this are cancelled
# metrics_listen = "127.0.0.1:9464"                       # serve Prometheus /metrics here
# metrics_textfile = "/var/lib/node_exporter/xencr.prom"  # node-exporter textfile, after each run
# keep_history = "90d"          # older runs are forgotten hourly (counters kept); "forever": never

# ---------------------------------------------------------------------------------------------
# With a PostgreSQL state, `xencr daemon` on several hosts shares the work: each is a worker.

[worker]
# name = "dr1"                  # default: <hostname>-<pid>
# pools = ["site-a", "site-b"]  # the pools this worker may touch (default: all)
# lease = "30s"                 # its claims lapse this long after its last heartbeat
# slots = 4                     # tasks (one VM of one job) it runs at once

# ---------------------------------------------------------------------------------------------
# The status page: `xencr serve-status`, and the daemon's metrics_listen beside /metrics.
# Off loopback it needs TLS and a user; the password comes from $XENCR_STATUS_PASSWORD (or the
# variable named by password_env), else from password_file (mode 0600), never from this file.

[status]
listen = "127.0.0.1:8080"       # where `xencr serve-status` listens
refresh = "30s"                 # the page updates itself (and asks the pools) this often
# tls_cert = "/etc/xencr/status.crt"
# tls_key = "/etc/xencr/status.key"
# username = "auditor"
# password_file = "/etc/xencr/status.password"
# url = "https://dr.example.com:8443/"  # linked from the report e-mails

# ---------------------------------------------------------------------------------------------
# Mail relay for the jobs' email_to reports. The password comes from $XENCR_SMTP_PASSWORD (or
# the variable named by password_env), else from password_file (mode 0600), never from this file.

[smtp]
host = "smtp.example.com"
# port = 587                    # default: 25, or 587 with starttls, 465 with tls
security = "starttls"           # "none", "starttls" or "tls"
# username = "xencr"
# password_env = "XENCR_SMTP_PASSWORD"
# sender = "xencr@dr.example.com"  # default: xencr@<this host's name>

# ---------------------------------------------------------------------------------------------
# Pools: XAPI endpoints, without secrets. The password of pool NAME comes from, in order:
#   the environment variable XENCR_<NAME>_PASSWORD (site-a -> XENCR_SITE_A_PASSWORD),
#   password_file (mode 0600 or stricter), or a prompt when run on a terminal.
# These two are placeholders (example.com): `xencr pool add site-a https://HOST` replaces one in
# place, keeping the jobs below that use it.

[pools.site-a]
url = "https://pool-a.example.com"         # https://host[:port] of the pool master
username = "root"                          # default "root"
# password_env = "XENCR_SITE_A_PASSWORD"   # another variable name for the password
# password_file = "~/.config/xencr/site-a.password"
# Pin a self-signed certificate (as `xencr pool add` shows it; colons and case do not matter):
# fingerprint = "sha256:3f2a5b0c71e49d1288af603bc7d2194ea50f6ce83197b42d5ef00a83c61b7d9c"
verify_tls = true                          # false: accept any certificate (not recommended)
# max_exports = 2                          # disk exports from this pool at once (all jobs)
# max_imports = 2                          # disk imports into this pool at once (all jobs)

[pools.site-b]
url = "https://pool-b.example.com:443"

# ---------------------------------------------------------------------------------------------
# Jobs: what to protect and where. VM selection is evaluated at every run.

[jobs.web]
# id = "..."                    # default: derived from the name (stable); set it to continue an
#                               # existing Xen Orchestra chain with that job's UUID
pool = "site-a"                 # where the VMs run
vms = ["web-*", "tag:critical", "0b1e3a9c-7d1f-4c1e-9a55-2f6f3d1c8e11"]  # name globs, tags, UUIDs
exclude = ["web-test-*"]        # same forms; a VM matched here is never replicated
concurrency = 2                 # VMs replicated at once
snapshot_mode = "normal"        # "normal", "checkpoint" (with memory) or "offline" (shut down)
full_interval = 0               # a full copy every N runs (0: only when a delta is impossible)
vm_timeout = "2h"               # a VM taking longer is cancelled and cleaned up
enabled = true                  # false: the daemon does not schedule it (`xencr run` still can)
transfer = "auto"               # "auto": NBD + CBT where the source pool has an NBD network (CBT
#                               # enabled on the disks by xencr), else the VHD stream; "nbd": NBD
#                               # only (a VM whose pool lacks it fails, saying why); "stream"
nbd_connections = 4             # NBD connections per disk (1..16)
purge_snapshot_data = false     # NBD path: after each commit, destroy the source snapshot's data
#                               # and keep its CBT log (VDI.data_destroy): no snapshot chain on the
#                               # source SR; a fall back to the stream is then a full
verify_import = true            # before each restore point is committed, read back from the target
#                               # what this run wrote and compare it with what was sent (a byte the
#                               # target garbled is retried, never committed); costs reading the
#                               # run's bytes once more over the target link. false: only a
#                               # later `xencr verify` finds such damage
# rpo = "30m"                   # alert when a restore point is older (default: from the schedules)
report_when = "failure"         # send the run report: "never", "failure" (a VM failed or was
#                               # interrupted), "breach" (that, or an RPO breach), "always"
# webhook = "https://hooks.example.com/xencr"  # POST the report as JSON here
# email_to = ["ops@example.com"]               # mail a summary (needs [smtp])
# After each successful run, boot a clone of every new restore point with no network, wait for
# the gate, destroy the clone; a failed check is reported (not a failed run). gate: "power_state",
# "guest_tools" (default) or "xenstore" with the key a guest script answers; timeout default 5m;
# sr: clone onto this SR (a full copy) instead of a fast clone beside the replica.
# health_check = { gate = "xenstore", key = "vm-data/xencr-health-check", timeout = "5m", sr = "HC" }

# One or more targets: an SR (UUID or name) on some pool. Several targets share one snapshot.
[[jobs.web.targets]]
pool = "site-b"
sr = "Local storage"
# Source network (name or UUID) -> target network; unmapped VIFs go to the same-named network,
# else the target's default network.
network_map = { "Pool-wide network associated with eth0" = "DR network" }

# One or more schedules, each with exactly one of `cron` and `every`.
[[jobs.web.schedules]]
id = "web-every-15m"            # default: derived from the job and the timing
every = "15m"
retention = 4                   # restore points kept per VM and target for this schedule
rpo = "30m"                     # alert when the newest restore point is older (default: the interval)
rate = "50MiB/s"                # bandwidth limit (default: none)
rate_windows = ["Mon-Fri 08:00-18:00 10MiB/s"]  # other limits at these times (or "unlimited")

[[jobs.web.schedules]]
id = "web-nightly"
cron = "30 1 * * *"             # 5 fields (m h dom mon dow) or @hourly, @daily, @weekly...
timezone = "Europe/Paris"       # IANA name, default "UTC"
retention = 7
full_interval = 30              # this schedule sends a full copy every 30 of its runs

[jobs.db]
pool = "site-a"
vms = ["tag:database"]
snapshot_mode = "checkpoint"
enabled = false

[[jobs.db.targets]]
pool = "site-b"
sr = "3c6f1a5e-8d2b-4f7a-b1c9-5e0d4a2b7f68"

[jobs.db.targets.network_map]
"Pool-wide network associated with eth0" = "DR network"

[[jobs.db.schedules]]
cron = "@hourly"

# ---------------------------------------------------------------------------------------------
# Failover plans (runbooks), versioned with the jobs. `xencr plan --failover site-b` prints what
# a failover would do, changing nothing. The VMs are found from their replicas alone, so a plan
# works with the primary site lost. A VM belongs to one plan at most.

[[plan]]
name = "site-b"
jobs = ["web", "db"]            # every VM these jobs replicate
# vms = ["mail-1", "tag:critical"]  # and/or VMs (UUID, name glob, tag) of any job's replicas
# The network of a replica's VIF (or the source network the job mapped to it) -> the network the
# failed-over VM uses; unmapped VIFs stay on the replica's network.
network_map = { "DR network" = "DR production" }
gate = { kind = "power_state", timeout = "2m" }  # each group's gate unless it has its own
# Groups start in this order; the VMs of a group start together. Without groups: ascending by
# each VM's start order, the longest start delay of a group after it (as a vApp starts); VMs
# in no group start after the groups, the same way.
[[plan.groups]]
vms = ["tag:database"]
start_delay = "30s"             # wait after this group, before the next
# "power_state" (running), "guest_tools" (PV drivers up), or "xenstore" (the guest writes key)
gate = { kind = "xenstore", key = "data/ready", timeout = "5m" }

[[plan.groups]]
vms = ["web-*"]

# A command run after the VM starts, as an argument list (never through a shell), with the VM's
# new UUID, name and IPs in its environment; its exit code is part of the gate.
[[plan.hooks]]
vm = "web-1"
command = ["/usr/local/bin/dr-reip", "--site", "b"]
timeout = "5m"
"""


def sample_config() -> str:
    """A commented sample configuration showing every option; :func:`load_config` accepts it."""
    return SAMPLE_CONFIG


# The sample's pools live under the domain reserved for examples (RFC 2606): no real pool does.
SAMPLE_DOMAIN = "example.com"


def is_sample_pool(pool: PoolConfig) -> bool:
    """Whether ``pool`` is still a placeholder of the sample (`xencr pool add` replaces it)."""
    host = (urlsplit(pool.url).hostname or "").lower()
    return host == SAMPLE_DOMAIN or host.endswith("." + SAMPLE_DOMAIN)
