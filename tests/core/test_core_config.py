"""The configuration file: the sample loads, and every mistake is one line naming file and key."""

from __future__ import annotations

import dataclasses
import re
import uuid
from pathlib import Path

import pytest
from coretest import MINIMAL, write

from xencr.config import (
    JOB_NAMESPACE,
    Config,
    ConfigError,
    DaemonConfig,
    JobConfig,
    PoolConfig,
    ScheduleConfig,
    SmtpConfig,
    TargetConfig,
    VmSelector,
    check_cron,
    default_config_path,
    default_state_path,
    load_config,
    parse_duration,
    parse_rate,
    parse_rate_window,
    sample_config,
)


def load_text(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text), warn=lambda m: None)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'xencr.toml'}: ")
    return message.removeprefix(f"{tmp_path / 'xencr.toml'}: ")


# -- the sample


def test_sample_loads_and_shows_every_option(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, sample_config())
    assert set(cfg.pools) == {"site-a", "site-b"}
    assert set(cfg.jobs) == {"web", "db"}
    web = cfg.jobs["web"]
    assert web.pool == "site-a"
    assert web.vms == ["web-*", "tag:critical", "0b1e3a9c-7d1f-4c1e-9a55-2f6f3d1c8e11"]
    assert web.exclude == ["web-test-*"]
    assert web.vm_timeout == 7200
    assert web.targets[0].network_map == {"Pool-wide network associated with eth0": "DR network"}
    every, nightly = web.schedules
    assert (every.id, every.every, every.cron, every.retention) == ("web-every-15m", 900, None, 4)
    assert (every.rpo, every.rate) == (1800, 50 * 2**20)
    assert every.rate_windows == ["Mon-Fri 08:00-18:00 10MiB/s"]
    assert (nightly.cron, nightly.timezone, nightly.full_interval) == ("30 1 * * *", "Europe/Paris", 30)
    db = cfg.jobs["db"]
    assert db.snapshot_mode == "checkpoint" and db.enabled is False
    assert db.targets[0].network_map == {"Pool-wide network associated with eth0": "DR network"}
    assert db.schedules[0].cron == "@hourly" and db.schedules[0].retention == 3
    assert (web.report_when, web.webhook, web.email_to, web.rpo) == ("failure", None, [], None)
    assert cfg.daemon == DaemonConfig(grace=60)
    assert cfg.smtp is not None
    assert (cfg.smtp.host, cfg.smtp.port, cfg.smtp.security) == ("smtp.example.com", 587, "starttls")
    # Every option appears in the sample, commented or not: a new field forces a sample update.
    sample = sample_config()
    keys = {"state", "password_env"} | {
        f.name
        for cls in (PoolConfig, JobConfig, TargetConfig, ScheduleConfig, SmtpConfig, DaemonConfig)
        for f in dataclasses.fields(cls)
        if f.name not in ("name", "url_password", "password")
    }
    for key in sorted(keys):
        assert re.search(rf"^(#? ?{key} = |\[\[jobs\.\w+\.{key}\]\])", sample, re.MULTILINE), key


def test_sample_with_every_commented_option_enabled_loads(tmp_path: Path) -> None:
    text = re.sub(r"^# (\w+ = .*)$", r"\1", sample_config(), flags=re.MULTILINE)
    assert text != sample_config()
    cfg = load_text(tmp_path, text)
    a = cfg.pools["site-a"]
    assert a.fingerprint == "3f2a5b0c71e49d1288af603bc7d2194ea50f6ce83197b42d5ef00a83c61b7d9c"
    assert a.password_file == str(tmp_path / "home/.config/xencr/site-a.password")
    assert cfg.state.path == tmp_path / "home/.local/share/xencr/state.sqlite"
    assert cfg.jobs["web"].id == "..."
    web = cfg.jobs["web"]
    assert (web.rpo, web.webhook, web.email_to) == (
        1800,
        "https://hooks.example.com/xencr",
        ["ops@example.com"],
    )
    assert (a.max_exports, a.max_imports) == (2, 2)
    assert cfg.daemon.metrics_listen == "127.0.0.1:9464"
    assert cfg.daemon.metrics_textfile == Path("/var/lib/node_exporter/xencr.prom")
    assert cfg.smtp is not None and (cfg.smtp.username, cfg.smtp.sender) == ("xencr", "xencr@dr.example.com")


def test_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    a = cfg.pools["site-a"]
    assert a == PoolConfig(name="site-a", url="https://a.example")
    assert (a.username, a.password_env, a.password_file, a.fingerprint, a.verify_tls) == (
        "root",
        "XENCR_SITE_A_PASSWORD",
        None,
        None,
        True,
    )
    job = cfg.jobs["web"]
    assert job.id == str(uuid.uuid5(JOB_NAMESPACE, "web"))
    assert job.id == load_text(tmp_path, MINIMAL).jobs["web"].id  # stable
    assert (job.concurrency, job.snapshot_mode, job.full_interval, job.vm_timeout, job.enabled) == (
        2,
        "normal",
        0,
        None,
        True,
    )
    assert job.exclude == []
    s = job.schedules[0]
    assert (s.every, s.cron, s.timezone, s.retention, s.full_interval, s.rpo, s.rate) == (
        600,
        None,
        "UTC",
        3,
        0,
        None,
        None,
    )
    assert s.rpo_seconds == 600
    assert cfg.state.path == tmp_path / "xdg-data/xencr/state.sqlite"
    assert (a.max_exports, a.max_imports) == (2, 2)
    assert (job.report_when, job.webhook, job.email_to, job.rpo) == ("failure", None, [], None)
    assert cfg.smtp is None
    assert cfg.daemon == DaemonConfig(metrics_listen=None, metrics_textfile=None, grace=60)


def test_schedule_ids_are_stable_and_follow_the_timing(tmp_path: Path) -> None:
    two = MINIMAL + '\n[[jobs.web.schedules]]\ncron = "0 * * * *"\n'
    first = load_text(tmp_path, two).jobs["web"].schedules
    only_cron = MINIMAL.replace('every = "10m"', 'cron = "0 * * * *"')
    # Removing the first schedule does not hand its id to the other one.
    assert load_text(tmp_path, only_cron).jobs["web"].schedules[0].id == first[1].id
    assert first[0].id != first[1].id


def test_password_env_derivation_and_fingerprint_normalisation(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        '[pools.site-b]\nurl = "https://b.example"',
        '[pools."dr.site 2"]\nurl = "https://b.example"\nfingerprint = "SHA256:'
        + ":".join(["AB"] * 32)
        + '"',
    ).replace('pool = "site-b"', 'pool = "dr.site 2"')
    pool = load_text(tmp_path, text).pools["dr.site 2"]
    assert pool.password_env == "XENCR_DR_SITE_2_PASSWORD"
    assert pool.fingerprint == "ab" * 32
    assert PoolConfig(name="x", url="https://x", fingerprint="sha256:" + "CD" * 32).fingerprint == "cd" * 32


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    text = 'state = "run/state.sqlite"\n' + MINIMAL.replace(
        'url = "https://a.example"', 'url = "https://a.example"\npassword_file = "secrets/a"'
    )
    cfg = load_text(tmp_path, text)
    assert cfg.state.path == tmp_path / "run/state.sqlite"
    assert cfg.pools["site-a"].password_file == str(tmp_path / "secrets/a")


# -- where the file is


def test_default_path_follows_xdg_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_config_path() == tmp_path / "xdg-config/xencr/xencr.toml"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_config_path() == tmp_path / "home/.config/xencr/xencr.toml"
    assert default_state_path() == tmp_path / "home/.local/share/xencr/state.sqlite"
    other = write(tmp_path, MINIMAL, "elsewhere.toml")
    monkeypatch.setenv("XENCR_CONFIG", str(other))
    assert default_config_path() == other
    cfg = load_config(warn=lambda m: None)
    assert cfg.path == other and "web" in cfg.jobs


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: no such file (write a sample with `xencr init`)"


# -- every mistake, one line with its key


def replace(old: str, new: str) -> str:
    assert old in MINIMAL
    return MINIMAL.replace(old, new)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            replace('sr = "SR1"', 'sr = "SR1"\n[[jobs.web.targets]]\npool = "site-c"\nsr = "x"'),
            "jobs.web.targets[1]: unknown pool 'site-c'",
        ),
        (replace('pool = "site-a"', 'pool = "nowhere"'), "jobs.web.pool: unknown pool 'nowhere'"),
        (
            replace('vms = ["web-*"]', 'vms = ["web-*"]\nschedlues = 3'),
            "jobs.web: unknown key 'schedlues' (did you mean 'schedules'?)",
        ),
        (
            replace('every = "10m"', 'every = "10m"\nretension = 3'),
            "jobs.web.schedules[0]: unknown key 'retension' (did you mean 'retention'?)",
        ),
        ("stat = 'x'\n" + MINIMAL, "unknown key 'stat' (did you mean 'state'?)"),
        (
            replace('url = "https://a.example"', 'url = "https://a.example"\nverify = false'),
            "pools.site-a: unknown key 'verify' (did you mean 'verify_tls'?)",
        ),
        (
            replace('sr = "SR1"', 'sr = "SR1"\nnetwork_map = { a = 1 }'),
            "jobs.web.targets[0].network_map.a: must be a string, not an integer",
        ),
        (
            replace('every = "10m"', 'every = "10 minutes"'),
            "jobs.web.schedules[0].every: invalid duration '10 minutes' (examples: 90s, 10m, 2h, 1d, 1h30m)",
        ),
        (
            replace('every = "10m"', 'every = "10m"\nrpo = "soon"'),
            "jobs.web.schedules[0].rpo: invalid duration 'soon' (examples: 90s, 10m, 2h, 1d, 1h30m)",
        ),
        (
            replace('every = "10m"', 'every = "0s"'),
            "jobs.web.schedules[0].every: must be at least 1, not '0s'",
        ),
        (
            replace('every = "10m"', 'every = "10m"\nrate = "fast"'),
            "jobs.web.schedules[0].rate: invalid rate 'fast' (examples: 10MiB/s, 500KB/s, 1GB/s, 100Mbit/s)",
        ),
        (
            replace('every = "10m"', 'every = "10m"\nrate_windows = ["Mon-Fri 8-18 1MiB/s"]'),
            "jobs.web.schedules[0].rate_windows[0]: invalid rate window 'Mon-Fri 8-18 1MiB/s': "
            "expected like 'Mon-Fri 08:00-18:00 2MiB/s'",
        ),
        (
            replace('every = "10m"', 'every = "10m"\ntimezone = "Mars/Olympus"'),
            "jobs.web.schedules[0].timezone: unknown time zone 'Mars/Olympus' "
            "(an IANA name like 'Europe/Paris')",
        ),
        (
            replace('every = "10m"', 'every = "10m"\ncron = "0 * * * *"'),
            "jobs.web.schedules[0]: needs exactly one of 'cron' and 'every'",
        ),
        (
            replace('every = "10m"', "retention = 2"),
            "jobs.web.schedules[0]: needs exactly one of 'cron' and 'every'",
        ),
        (
            replace('every = "10m"', 'cron = "0 * * *"'),
            "jobs.web.schedules[0].cron: invalid cron expression '0 * * *': "
            "4 fields, expected 5 (m h dom mon dow)",
        ),
        (
            replace('every = "10m"', 'cron = "0 25 * * *"'),
            "jobs.web.schedules[0].cron: invalid cron expression '0 25 * * *': bad hour '25'",
        ),
        (
            replace('url = "https://a.example"', 'url = "https://a.example"\nfingerprint = "md5:abcd"'),
            "pools.site-a.fingerprint: invalid fingerprint 'md5:abcd': expected 'sha256:' and 64 hex digits",
        ),
        (
            replace('url = "https://a.example"', 'url = "https://a.example"\nfingerprint = "sha256:abc"'),
            "pools.site-a.fingerprint: invalid fingerprint 'sha256:abc': "
            "expected 'sha256:' and 64 hex digits",
        ),
        (
            replace('url = "https://a.example"', 'url = "ftp://a"'),
            "pools.site-a.url: invalid URL 'ftp://a': expected https://host[:port]",
        ),
        (
            replace('url = "https://a.example"', "url = 3"),
            "pools.site-a.url: must be a string, not an integer",
        ),
        (replace('url = "https://a.example"', ""), "pools.site-a: missing key 'url'"),
        (
            replace('vms = ["web-*"]', "vms = []"),
            "jobs.web.vms: selects no VM (give UUIDs, name globs like 'web-*', or 'tag:NAME')",
        ),
        (replace('vms = ["web-*"]', 'vms = ["tag:"]'), "jobs.web.vms[0]: empty tag in 'tag:'"),
        (replace('vms = ["web-*"]', 'vms = "web-*"'), "jobs.web.vms: must be an array, not a string"),
        (
            replace('vms = ["web-*"]', 'vms = ["web-*"]\nsnapshot_mode = "live"'),
            "jobs.web.snapshot_mode: must be one of normal, checkpoint, offline, not 'live'",
        ),
        (
            replace('vms = ["web-*"]', 'vms = ["web-*"]\nconcurrency = 0'),
            "jobs.web.concurrency: must be at least 1, not 0",
        ),
        (
            replace('vms = ["web-*"]', 'vms = ["web-*"]\nenabled = 1'),
            "jobs.web.enabled: must be a boolean, not an integer",
        ),
        (
            replace('every = "10m"', 'every = "10m"\nretention = true'),
            "jobs.web.schedules[0].retention: must be an integer, not a boolean",
        ),
        (
            replace('[[jobs.web.targets]]\npool = "site-b"\nsr = "SR1"\n', ""),
            "jobs.web: needs at least one [[targets]] table",
        ),
        (
            replace('sr = "SR1"', 'sr = "SR1"\n[[jobs.web.targets]]\npool = "site-b"\nsr = "SR1"'),
            "jobs.web.targets[1]: same pool and SR as targets[0]",
        ),
        (
            replace(
                'every = "10m"', 'every = "10m"\nid = "s"\n[[jobs.web.schedules]]\nid = "s"\ncron = "@daily"'
            ),
            "jobs.web.schedules[1]: same id as schedules[0] (give each an 'id')",
        ),
        (
            MINIMAL
            + '[jobs."web 2"]\nid = "'
            + str(uuid.uuid5(JOB_NAMESPACE, "web"))
            + '"\npool = "site-a"\n'
            'vms = ["x"]\n[[jobs."web 2".targets]]\npool = "site-b"\nsr = "y"\n',
            "jobs.\"web 2\": same id as job 'web'",
        ),
        (replace('every = "10m"', 'every = "10m"\n[jobs.web.x]'), "jobs.web: unknown key 'x'"),
        (
            replace('url = "https://a.example"', 'url = "https://a.example"\nmax_imports = 0'),
            "pools.site-a.max_imports: must be at least 1, not 0",
        ),
        (
            replace('url = "https://a.example"', 'url = "https://a.example"\nmax_exports = "2"'),
            "pools.site-a.max_exports: must be an integer, not a string",
        ),
        (
            replace('vms = ["web-*"]', 'vms = ["web-*"]\nreport_when = "sometimes"'),
            "jobs.web.report_when: must be one of never, failure, breach, always, not 'sometimes'",
        ),
        (
            replace('vms = ["web-*"]', 'vms = ["web-*"]\nwebhook = "ftp://hooks/secret-token"'),
            "jobs.web.webhook: invalid URL: expected http(s)://host[:port]/path",
        ),
        (
            replace('vms = ["web-*"]', 'vms = ["web-*"]\nemail_to = ["ops"]'),
            "jobs.web.email_to[0]: invalid e-mail address 'ops'",
        ),
        (
            replace('vms = ["web-*"]', 'vms = ["web-*"]\nemail_to = ["ops@example.com"]'),
            "jobs.web.email_to: needs an [smtp] table saying which mail server to use",
        ),
        (
            replace('vms = ["web-*"]', 'vms = ["web-*"]\nrpo = "often"'),
            "jobs.web.rpo: invalid duration 'often' (examples: 90s, 10m, 2h, 1d, 1h30m)",
        ),
        ("[smtp]\nport = 25\n" + MINIMAL, "smtp: missing key 'host'"),
        (
            '[smtp]\nhost = "m"\nsecurity = "ssl"\n' + MINIMAL,
            "smtp.security: must be one of none, starttls, tls, not 'ssl'",
        ),
        ('[smtp]\nhost = "m"\nport = 70000\n' + MINIMAL, "smtp.port: must be at most 65535, not 70000"),
        (
            '[smtp]\nhost = "m"\npassword = "hunter2"\n' + MINIMAL,
            "smtp.password: is not read from the file: set XENCR_SMTP_PASSWORD or password_file",
        ),
        ('[smtp]\nhost = "m"\nhots = 1\n' + MINIMAL, "smtp: unknown key 'hots' (did you mean 'host'?)"),
        (
            '[daemon]\ngrace = "soon"\n' + MINIMAL,
            "daemon.grace: invalid duration 'soon' (examples: 90s, 10m, 2h, 1d, 1h30m)",
        ),
        (
            '[daemon]\nmetrics_listen = "9464"\n' + MINIMAL,
            "daemon.metrics_listen: invalid address '9464': expected HOST:PORT like 127.0.0.1:9464",
        ),
        (
            '[daemon]\nmetric_listen = "x"\n' + MINIMAL,
            "daemon: unknown key 'metric_listen' (did you mean 'metrics_listen'?)",
        ),
        ("pools = 3", "pools: must be a table, not an integer"),
        ("[pools\n", None),
    ],
)
def test_each_mistake_is_one_line_with_its_key(tmp_path: Path, text: str, expected: str | None) -> None:
    message = error_of(tmp_path, text)
    if expected is None:
        assert message.startswith("invalid TOML: ")
    else:
        assert message == expected


def test_smtp_password_from_env_or_file_never_from_the_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = '[smtp]\nhost = "mail.example"\nusername = "xencr"\n'
    text = (
        base
        + 'password_file = "smtp.pw"\n'
        + MINIMAL.replace(
            'vms = ["web-*"]', 'vms = ["web-*"]\nemail_to = ["ops@example.com", "dr@example.com"]'
        )
    )
    pw = tmp_path / "smtp.pw"
    pw.write_text("s3cret pass\n")
    pw.chmod(0o644)
    message = error_of(tmp_path, text)
    assert message.startswith(f"smtp.password_file: password_file {pw} has mode 0644")
    pw.chmod(0o600)
    cfg = load_text(tmp_path, text)
    assert cfg.smtp is not None and cfg.smtp.password is not None
    assert cfg.smtp.password.reveal() == "s3cret pass"
    assert (cfg.smtp.port, cfg.smtp.security, cfg.smtp.sender.startswith("xencr@")) == (25, "none", True)
    assert cfg.jobs["web"].email_to == ["ops@example.com", "dr@example.com"]
    assert "s3cret" not in repr(cfg) and "s3cret" not in repr(cfg.smtp)
    # The environment wins over the file; another variable name can be given.
    monkeypatch.setenv("XENCR_SMTP_PASSWORD", "from-env")
    assert load_text(tmp_path, text).smtp.password.reveal() == "from-env"  # type: ignore[union-attr]
    monkeypatch.setenv("MAIL_PW", "other")
    tls = base.replace('username = "xencr"', 'security = "tls"\npassword_env = "MAIL_PW"') + MINIMAL
    smtp = load_text(tmp_path, tls).smtp
    assert smtp is not None and smtp.password is not None
    assert (smtp.port, smtp.password.reveal(), smtp.username) == (465, "other", None)


def test_job_and_daemon_options(tmp_path: Path) -> None:
    text = (
        '[daemon]\nmetrics_listen = "[::1]:9464"\nmetrics_textfile = "prom/xencr.prom"\ngrace = "2m"\n'
        + MINIMAL.replace(
            'vms = ["web-*"]',
            'vms = ["web-*"]\nreport_when = "breach"\nrpo = "15m"\nwebhook = "https://h.example/x?t=1"',
        ).replace('url = "https://b.example"', 'url = "https://b.example"\nmax_exports = 1\nmax_imports = 4')
    )
    cfg = load_text(tmp_path, text)
    assert cfg.daemon == DaemonConfig("[::1]:9464", tmp_path / "prom/xencr.prom", 120)
    job = cfg.jobs["web"]
    assert (job.report_when, job.rpo, job.webhook) == ("breach", 900, "https://h.example/x?t=1")
    assert (cfg.pools["site-b"].max_exports, cfg.pools["site-b"].max_imports) == (1, 4)
    assert "max_imports=4" in repr(cfg.pools["site-b"])
    grace0 = load_text(tmp_path, "[daemon]\ngrace = 0\n" + MINIMAL)
    assert grace0.daemon.grace == 0


def test_url_with_password_is_accepted_with_a_warning_and_kept_out_of_the_url(tmp_path: Path) -> None:
    warnings: list[str] = []
    text = replace('url = "https://a.example"', 'url = "https://admin:s3cr%40t@a.example:8443/"')
    cfg = load_config(write(tmp_path, text), warn=warnings.append)
    pool = cfg.pools["site-a"]
    assert pool.url == "https://a.example:8443"
    assert pool.username == "admin"
    assert pool.url_password is not None and pool.url_password.reveal() == "s3cr@t"
    assert len(warnings) == 1
    assert "pools.site-a.url" in warnings[0] and "XENCR_SITE_A_PASSWORD" in warnings[0]
    for shown in (warnings[0], repr(pool), str(pool), repr(cfg), str(cfg)):
        assert "s3cr" not in shown


def test_url_user_conflicting_with_username_is_an_error(tmp_path: Path) -> None:
    text = replace('url = "https://a.example"', 'url = "https://bob@a.example"\nusername = "root"')
    assert error_of(tmp_path, text) == "pools.site-a.url: user 'bob' in the URL differs from username 'root'"


def test_config_lookups(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, MINIMAL)
    job = cfg.jobs["web"]
    assert cfg.job("web") is job and cfg.job(job.id) is job
    with pytest.raises(ConfigError, match=r"no job 'nope' \(jobs: web\)"):
        cfg.job("nope")
    assert cfg.pool("site-b").url == "https://b.example"


# -- values


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("1w", 604800), ("45", 45)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10x", "1.5h", "-1m", "h10", "10m5"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10MiB/s", 10 * 2**20),
        ("500KB/s", 500_000),
        ("1GB/s", 10**9),
        ("2 GiB/s", 2 * 2**30),
        ("1.5MiB/s", 3 * 2**19),
        ("100Mbit/s", 12_500_000),
        ("4096", 4096),
    ],
)
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "10 parsecs/s", "0MiB/s", "-1MB/s"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate(text)


def test_rate_windows_and_cron_shapes() -> None:
    w = parse_rate_window("Mon-Fri 08:00-18:00 2MiB/s")
    assert (sorted(w.days), w.start, w.end, w.rate) == ([0, 1, 2, 3, 4], 480, 1080, 2 * 2**20)
    w = parse_rate_window("Fri-Mon 22:00-06:00 unlimited")
    assert (sorted(w.days), w.start, w.end, w.rate) == ([0, 4, 5, 6], 1320, 360, None)
    assert sorted(parse_rate_window("08:00-24:00 1MB/s").days) == list(range(7))
    assert check_cron("*/5  1-5 * JAN-mar mon,fri") == "*/5 1-5 * JAN-mar mon,fri"
    assert check_cron("@Hourly") == "@hourly"
    for bad in (
        "@reboot",
        "* * * * * *",
        "*/0 * * * *",
        "0 0 0 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
        "5-1 * * * *",
    ):
        with pytest.raises(ValueError):
            check_cron(bad)


def test_vm_selection() -> None:
    uid = "0B1E3A9C-7D1F-4C1E-9A55-2F6F3D1C8E11"
    assert VmSelector.parse(uid) == VmSelector("uuid", uid.lower())
    assert VmSelector.parse("tag:db") == VmSelector("tag", "db")
    assert VmSelector.parse("web-*") == VmSelector("glob", "web-*")
    job = JobConfig(
        name="j",
        id="i",
        pool="p",
        vms=["web-*", "tag:db", uid],
        exclude=["web-test-*", "tag:nobak"],
        targets=[TargetConfig("p", "sr")],
        schedules=[],
    )
    assert job.selects("x", "web-1")
    assert not job.selects("x", "WEB-1")  # name_label globs are case-sensitive
    assert not job.selects("x", "web-test-1")
    assert job.selects("x", "db-1", ["db"])
    assert not job.selects("x", "db-1", ["db", "nobak"])
    assert job.selects(uid.lower(), "anything")
    assert not job.selects("y", "mail")
