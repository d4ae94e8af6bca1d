"""`xencr init`, `pool list`, `job list|show`, `history`: output content and exit codes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from coretest import MINIMAL, write
from typer.testing import CliRunner

from xencr.cli.history import history_command
from xencr.cli.init import init_app, init_command
from xencr.cli.jobs import job_app
from xencr.cli.pools import pool_app
from xencr.config import load_config, sample_config
from xencr.state import StateDB

SECRET = "hunter2:@/%"


def make_app() -> typer.Typer:
    """The groups registered as the lead's `cli/app.py` does (which other people own)."""
    app = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, no_args_is_help=True)
    app.add_typer(init_app, name="init")
    app.command("init2")(init_command)
    app.add_typer(pool_app, name="pool")
    app.add_typer(job_app, name="job")
    app.command("history")(history_command)
    return app


APP = make_app()


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(APP, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("xencr: error: ")
    assert "Traceback" not in stderr
    return lines[0].removeprefix("xencr: error: ")


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    return write(tmp_path, sample_config())


# -- init


@pytest.mark.parametrize("command", ["init", "init2"])
def test_init_writes_the_sample_and_refuses_to_overwrite(tmp_path: Path, command: str) -> None:
    path = tmp_path / "new" / "xencr.toml"
    code, out, _ = run(command, "--config", str(path))
    assert code == 0
    assert f"wrote {path}" in out
    assert path.read_text() == sample_config()
    assert set(load_config(path).jobs) == {"web", "db"}
    path.write_text("# mine\n")
    code, _, err = run(command, "--config", str(path))
    assert code == 1
    assert one_error_line(err) == f"{path} already exists (use --force to overwrite it)"
    assert path.read_text() == "# mine\n"
    code, _, _ = run(command, "--config", str(path), "--force")
    assert code == 0 and path.read_text() == sample_config()
    assert [p.name for p in path.parent.iterdir()] == ["xencr.toml"]  # no temporary file left


def test_init_default_path_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run("init")
    default = tmp_path / "xdg-config/xencr/xencr.toml"
    assert code == 0 and f"wrote {default}" in out and default.exists()
    monkeypatch.setenv("XENCR_CONFIG", str(tmp_path / "env.toml"))
    assert run("init")[0] == 0
    assert (tmp_path / "env.toml").read_text() == sample_config()


# -- pool list


def test_pool_list_text_shows_password_sources_not_passwords(
    cfg_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = sample_config().replace(
        '[pools.site-b]\nurl = "https://pool-b.example.com:443"',
        '[pools.site-b]\nurl = "https://pool-b.example.com:443"\npassword_file = "b.pw"\n'
        'fingerprint = "sha256:' + "ab" * 32 + '"',
    )
    cfg_path.write_text(text)
    monkeypatch.setenv("XENCR_SITE_A_PASSWORD", SECRET)
    code, out, err = run("pool", "list", "--config", str(cfg_path))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "URL", "USER", "PASSWORD", "TLS"]
    assert lines[1].split() == [
        "site-a",
        "https://pool-a.example.com",
        "root",
        "env",
        "XENCR_SITE_A_PASSWORD",
        "verify",
    ]
    assert lines[2].split() == [
        "site-b",
        "https://pool-b.example.com:443",
        "root",
        "file",
        str(tmp_path / "b.pw"),
        "pinned",
    ]
    assert SECRET not in out + err


def test_pool_list_json(cfg_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run("pool", "list", "--json", "--config", str(cfg_path))
    assert code == 0
    pools = json.loads(out)
    assert [p["name"] for p in pools] == ["site-a", "site-b"]
    assert pools[0] == {
        "name": "site-a",
        "url": "https://pool-a.example.com",
        "username": "root",
        "password_source": "none",
        "password_env": "XENCR_SITE_A_PASSWORD",
        "password_env_set": False,
        "password_file": None,
        "password_in_url": False,
        "fingerprint": None,
        "verify_tls": True,
        "tls": "verify",
    }


def test_url_password_warns_and_is_never_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.parse import quote

    path = write(
        tmp_path,
        MINIMAL.replace(
            'url = "https://a.example"', f'url = "https://root:{quote(SECRET, safe="")}@a.example"'
        ),
    )
    monkeypatch.setenv("XENCR_CONFIG", str(path))
    code, out, err = run("pool", "list", "--json")
    assert code == 0
    [a, _] = json.loads(out)
    assert a["url"] == "https://a.example" and a["password_source"] == "url" and a["password_in_url"] is True
    assert err.startswith("xencr: warning: ") and "pools.site-a.url" in err and len(err.splitlines()) == 1
    assert SECRET not in out + err and quote(SECRET, safe="") not in out + err


# -- job list / show


def test_job_list_text_and_json(cfg_path: Path) -> None:
    code, out, _ = run("job", "list", "--config", str(cfg_path))
    assert code == 0
    header, db, web = out.splitlines()
    assert header.split() == ["NAME", "POOL", "VMS", "TARGETS", "SCHEDULES", "ENABLED"]
    assert db.startswith("db ") and "tag:database" in db and "cron @hourly UTC" in db and db.endswith("no")
    assert "web-*, tag:critical, 0b1e3a9c-7d1f-4c1e-9a55-2f6f3d1c8e11 except web-test-*" in web
    assert "except web-test-*" in web and "site-b/Local storage" in web
    assert "every 15m; cron 30 1 * * * Europe/Paris" in web and web.endswith("yes")
    code, out, _ = run("job", "list", "--json", "--config", str(cfg_path))
    jobs = json.loads(out)
    assert [j["name"] for j in jobs] == ["db", "web"]
    assert jobs[1]["schedules"][0]["every"] == 900 and jobs[1]["vm_timeout"] == 7200


def test_job_show_text_and_json(cfg_path: Path) -> None:
    code, out, _ = run("job", "show", "web", "--config", str(cfg_path))
    assert code == 0
    rows = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.splitlines()}
    cfg = load_config(cfg_path)
    assert rows["id"] == cfg.jobs["web"].id
    assert rows["vm_timeout"] == "2h" and rows["snapshot_mode"] == "normal"
    assert rows["targets[0]"] == "site-b/Local storage"
    assert rows["targets[0].network_map"] == "Pool-wide network associated with eth0 -> DR network"
    assert rows["schedules[0]"] == (
        "id=web-every-15m every 15m retention=4 rpo=30m rate=50MiB/s window='Mon-Fri 08:00-18:00 10MiB/s'"
    )
    assert rows["schedules[1]"] == "id=web-nightly cron 30 1 * * * Europe/Paris retention=7 full_interval=30"
    # By id too, and as JSON.
    code, out, _ = run("job", "show", cfg.jobs["web"].id, "--json", "--config", str(cfg_path))
    assert code == 0
    data = json.loads(out)
    assert data["name"] == "web" and data["exclude"] == ["web-test-*"]
    assert data["targets"] == [
        {
            "pool": "site-b",
            "sr": "Local storage",
            "network_map": {"Pool-wide network associated with eth0": "DR network"},
        }
    ]
    assert data["schedules"][0]["rate"] == 50 * 2**20 and data["schedules"][0]["rpo_effective"] == 1800


def test_unknown_job_is_one_line(cfg_path: Path) -> None:
    code, _, err = run("job", "show", "nope", "--config", str(cfg_path))
    assert code == 1
    assert one_error_line(err) == f"{cfg_path}: no job 'nope' (jobs: web, db)"


@pytest.mark.parametrize("args", [("pool", "list"), ("job", "list"), ("job", "show", "web"), ("history",)])
def test_bad_or_missing_config_is_one_line_exit_1(tmp_path: Path, args: tuple[str, ...]) -> None:
    bad = write(tmp_path, MINIMAL.replace('sr = "SR1"', 'sr = "SR1"\npool2 = "x"'))
    code, out, err = run(*args, "--config", str(bad))
    assert code == 1 and out == ""
    assert one_error_line(err) == f"{bad}: jobs.web.targets[0]: unknown key 'pool2' (did you mean 'pool'?)"
    code, _, err = run(*args, "--config", str(tmp_path / "missing.toml"))
    assert code == 1
    assert one_error_line(err).endswith("missing.toml: no such file (write a sample with `xencr init`)")


def test_usage_errors_exit_2(cfg_path: Path) -> None:
    assert run("job", "show", "--config", str(cfg_path))[0] == 2
    assert run("pool", "list", "--bogus")[0] == 2
    assert run("job", "nosuch")[0] == 2
    code, _, err = run("history", "--since", "last tuesday", "--config", str(cfg_path))
    assert code == 2
    assert one_error_line(err) == "--since: 'last tuesday' is neither a duration (2h, 1d) nor an ISO date"


@pytest.mark.parametrize(
    ("args", "example"),
    [
        (("init",), "xencr init --config"),
        (("init2",), "xencr init --config"),
        (("pool", "list"), "xencr pool list --json"),
        (("job", "list"), "xencr job list --json"),
        (("job", "show"), "xencr job show web --json"),
        (("job", "enable"), "xencr job enable web"),
        (("job", "disable"), "xencr job disable web"),
        (("pool", "remove"), "xencr pool remove old-site"),
        (("history",), "xencr history web --since 1d"),
    ],
)
def test_help_has_an_example(args: tuple[str, ...], example: str) -> None:
    code, out, _ = run(*args, "--help")
    assert code == 0 and f"Example:  {example}" in out
    assert "--config" in out


# -- history


def fill_history(state: Path, job_id: str) -> tuple[int, int]:
    t = [datetime(2020, 11, 20, 9, 0, tzinfo=UTC)]
    db = StateDB(state, clock=lambda: t[0])
    r1 = db.start_run(job_id, "web", "web-every-15m", "schedule")
    task = db.start_task(r1, "vm-1", "web-1", "sr-b")
    t[0] += timedelta(seconds=75)
    db.finish_task(
        task,
        "success",
        transfer="mixed",
        reasons={"0": "delta", "1": "disk added"},
        bytes_sent=3 << 20,
        restore_point="rp-1",
    )
    skipped = db.start_task(r1, "vm-2", "web-2", "sr-b")
    db.finish_task(skipped, "skipped", error="previous run still running")
    db.finish_run(r1, "partial", "web-2 skipped")
    t[0] = datetime(2020, 11, 22, 9, 0, tzinfo=UTC)
    r2 = db.start_run(job_id, "web", None, "manual")
    failed = db.start_task(r2, "vm-1", "web-1", "sr-b")
    t[0] += timedelta(seconds=5)
    db.finish_task(
        failed, "failure", transfer="full", reasons={"0": "replica started"}, error="SR_FULL [sr-b]"
    )
    db.finish_run(r2, "failure", "web-1: SR_FULL")
    other = db.start_run("other-id", "db", None, "manual")
    db.finish_run(other, "success")
    db.close()
    return r1, r2


def test_history_text(cfg_path: Path, tmp_path: Path) -> None:
    state = tmp_path / "state.sqlite"
    cfg_path.write_text(f'state = "{state}"\n' + sample_config())
    job_id = load_config(cfg_path).jobs["web"].id
    r1, r2 = fill_history(state, job_id)
    code, out, _ = run("history", "web", "--config", str(cfg_path))
    assert code == 0
    assert out.splitlines() == [
        f"run {r1}  2020-11-20 09:00:00Z  web  partial  1m15s  (schedule web-every-15m)",
        "  error: web-2 skipped",
        "  web-1 -> sr-b  success  mixed  3.0 MiB  1m15s",
        "    disk 0: delta",
        "    disk 1: full (disk added)",
        "    restore point rp-1",
        "  web-2 -> sr-b  skipped  0s",
        "    error: previous run still running",
        "",
        f"run {r2}  2020-11-22 09:00:00Z  web  failure  5s  (manual)",
        "  error: web-1: SR_FULL",
        "  web-1 -> sr-b  failure  full  0 B  5s",
        "    disk 0: full (replica started)",
        "    error: SR_FULL [sr-b]",
    ]
    code, out, _ = run("history", "--config", str(cfg_path), "--since", "2020-11-21")
    assert code == 0
    assert [line.split()[1] for line in out.splitlines() if line.startswith("run ")] == [str(r2), str(r2 + 1)]
    code, out, _ = run("history", "web", "--config", str(cfg_path), "--since", "1d")
    assert code == 0 and out.strip() == "no runs of job web since " + out.strip().split(" since ")[1]


def test_history_json_and_state_option(tmp_path: Path) -> None:
    state = tmp_path / "elsewhere.sqlite"
    r1, r2 = fill_history(state, "job-id")
    code, out, _ = run("history", "job-id", "--state", str(state), "--json")
    assert code == 0
    runs = json.loads(out)
    assert [r["id"] for r in runs] == [r1, r2]
    first = runs[0]
    assert (first["job"], first["outcome"], first["seconds"], first["schedule"]) == (
        "web",
        "partial",
        75.0,
        "web-every-15m",
    )
    assert first["started"] == "2020-11-20T09:00:00+00:00"
    assert first["tasks"][0]["reasons"] == {"0": "delta", "1": "disk added"}
    assert first["tasks"][0]["bytes_sent"] == 3 << 20 and first["tasks"][1]["outcome"] == "skipped"
    assert runs[1]["tasks"][0]["error"] == "SR_FULL [sr-b]"


def test_history_without_a_database_creates_none(cfg_path: Path, tmp_path: Path) -> None:
    state = tmp_path / "none" / "state.sqlite"
    cfg_path.write_text(f'state = "{state}"\n' + sample_config())
    code, out, _ = run("history", "--config", str(cfg_path))
    assert code == 0 and out.strip() == f"no runs recorded yet ({state})"
    code, out, _ = run("history", "--config", str(cfg_path), "--json")
    assert code == 0 and json.loads(out) == []
    assert not state.parent.exists()


def test_history_unusable_database_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"definitely not sqlite" * 200)
    code, out, err = run("history", "--state", str(junk))
    assert code == 1 and out == ""
    assert one_error_line(err).startswith(f"{junk}: not a usable state database: ")
