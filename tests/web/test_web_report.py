"""Reports and their parts without a browser: RPO compliance worked out by hand, the age line,
the test failover record, `xencr report` (HTML self-contained, PDF, one-line errors), and the
run e-mail carrying the report and the page's link."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner
from webtest import DIGEST, SECRETS, fill, now_utc, write_config

from xencr.cli.web import report_command
from xencr.config import load_config
from xencr.dr.start import StartReport, VmResult
from xencr.monitor import notify, rehearsals
from xencr.state import PointRow, StateDB, TaskRow
from xencr.web.audit import compliance
from xencr.web.series import worst_ages

app = typer.Typer()
app.command("report")(report_command)


@app.callback()
def _group() -> None:
    """A group, so that `report` is a subcommand as in xencr."""


runner = CliRunner()
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def point(vm: str, snap: timedelta, took: timedelta = timedelta(minutes=1)) -> PointRow:
    return PointRow(
        0, 0, f"uuid-{vm}", vm, "sr", "b/SR", f"rp-{vm}-{snap}", T0 + snap, T0 + snap + took, "delta", 1
    )


def task(vm: str, start: timedelta) -> TaskRow:
    return TaskRow(0, 0, f"uuid-{vm}", vm, "sr", T0 + start, None, "failure", None, {}, 0, "x", None)


def test_compliance_by_hand() -> None:
    """RPO 1h over [T0+1h, T0+10h]. a: restore points at 0h (before the period), 3h and 4h30m
    (each committed a minute later): over the RPO from 1h to 3h01 (2h01m), from 4h to 4h31
    (31m) and from 5h30 to the end (4h30m). b: joins at 6h (first task), first restore point at 7h
    (committed 7h01), nothing before: in breach 6h to 7h01, and again from 8h. c: only failed tasks."""
    since, now = T0 + timedelta(hours=1), T0 + timedelta(hours=10)
    pts = [
        point("a", timedelta(0)),
        point("a", timedelta(hours=3)),
        point("a", timedelta(hours=4, minutes=30)),
    ]
    pts.append(point("b", timedelta(hours=7)))
    tasks = [task("a", timedelta(hours=3)), task("b", timedelta(hours=6)), task("c", timedelta(hours=2))]
    got = {c.vm_name: c for c in compliance(pts, tasks, 3600, since, now)}
    a, b, c = got["a"], got["b"], got["c"]
    assert (a.watched, a.breached, a.made) == (9 * 3600, (121 + 31) * 60 + 4.5 * 3600, 2)
    assert a.worst_age == 5.5 * 3600 and a.worst_at == now
    assert a.share == pytest.approx(1 - ((121 + 31) * 60 + 4.5 * 3600) / (9 * 3600))
    assert (b.watched, b.breached, b.made) == (4 * 3600, (61 + 120) * 60, 1)
    assert b.worst_age == 3 * 3600 and b.share == pytest.approx(1 - 181 / 240)
    assert (c.watched, c.breached, c.worst_age, c.share) == (8 * 3600, 8 * 3600, None, 0.0)
    assert compliance(pts, tasks, None, since, now)[0].share is None  # no RPO, nothing to comply with


def test_worst_age_line() -> None:
    """The worst age steps where the oldest restore point changes: b's first one (31m) leaves a
    the oldest, a's second (61m) makes b the oldest."""
    pts = [point("a", timedelta(0)), point("b", timedelta(minutes=30)), point("a", timedelta(hours=1))]
    steps = worst_ages(pts, T0 + timedelta(minutes=10), T0 + timedelta(hours=2))
    as_minutes = [(int((s.at - T0).total_seconds() // 60), s.age // 60) for s in steps]
    # At 10m only a counts (10m old), growing until a's new one at 61m leaves b (taken at 30m)
    # the oldest; at 2h b is 90m old.
    assert as_minutes == [(10, 10), (61, 61), (61, 31), (120, 90)]


def test_rehearsal_record_keeps_groups_and_times(tmp_path: Path) -> None:
    """A test failover's record comes from what `start_groups` reports of each VM (its group and
    start time), and reads back from the state database as it was written."""
    start = StartReport(
        [
            VmResult("u1", "db-1", "c1", True, "running", True, 12.5, group=1, started_at=T0),
            VmResult(
                "u2",
                "web 1",
                "c2",
                False,
                "gate timed out",
                True,
                group=2,
                started_at=T0 + timedelta(seconds=30),
            ),
        ]
    )
    rec = rehearsals.record("p", 7, True, False, {"db-1": "c1", "web 1": "c2"}, start)
    assert not rec.ok
    assert [(v.name, v.group, v.started_at, v.ok, v.boot_seconds) for v in rec.vms] == [
        ("db-1", 1, T0, True, 12.5),
        ("web 1", 2, T0 + timedelta(seconds=30), False, None),
    ]
    with StateDB(tmp_path / "state.sqlite") as db:
        run = db.start_run("plan-p", rehearsals.run_name("p"), None, rehearsals.TRIGGER)
        rec = rehearsals.record("p", run, True, False, {"db-1": "c1", "web 1": "c2"}, start)
        rehearsals.save(db, rec)
        assert rehearsals.load(db, run) == rec
        assert rehearsals.load(db, run + 1) is None


def test_report_command(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    fill(load_config(path), now_utc())
    out = tmp_path / "r.html"
    r = runner.invoke(
        app, ["report", "web", "--config", str(path), "--html", str(out), "--pdf", str(tmp_path / "r.pdf")]
    )
    assert r.exit_code == 0, r.stderr
    html = out.read_text()
    assert (
        DIGEST in html
        and "1.32%" in html
        and "SR_FULL" in html
        and "skipped: previous run still running" in html
    )
    assert "<script" not in html and not re.search(r'(src|href)="', html)  # self-contained
    assert not any(s in html for s in SECRETS)
    assert (tmp_path / "r.pdf").read_bytes()[:5] == b"%PDF-"
    r = runner.invoke(app, ["report", "site-b", "--config", str(path), "--html", str(out)])
    assert r.exit_code == 0 and "1 test failover(s) in the period" in out.read_text()
    for args, line in (
        (
            ["nope", "--html", str(out)],
            "xencr: error: no job or plan 'nope' (jobs and plans: web, db, site-b)",
        ),
        (
            ["web", "--html", str(tmp_path / "no" / "x.html")],
            f"xencr: error: {tmp_path / 'no' / 'x.html'}: cannot write: No such file or directory",
        ),
    ):
        r = runner.invoke(app, ["report", *args, "--config", str(path)])
        # After the warning of pool a's password in its URL (kept there for the secrets checks).
        assert (r.exit_code, r.stderr.splitlines()[-1], r.stderr.count("error")) == (1, line, 1)
    r = runner.invoke(app, ["report", "web", "--config", str(path)])
    assert r.exit_code == 2 and r.stderr == "xencr: error: give --html FILE and/or --pdf FILE\n"


def test_run_email_attaches_the_report_and_links_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, status='url = "https://dr.example.com:8443/"')
    text = path.read_text().replace(
        "[jobs.web]\n", '[jobs.web]\nemail_to = ["ops@example.com"]\nreport_when = "always"\n'
    )
    path.write_text(text)
    cfg = load_config(path)
    fill(cfg, now_utc())
    sent: list[EmailMessage] = []

    def capture(smtp: Any, to: Any, msg: EmailMessage) -> None:
        sent.append(msg)

    monkeypatch.setattr(notify, "send_email", capture)
    payload = {"job": "web", "outcome": "success", "started": "x", "finished": "y", "vms": []}
    assert notify.notify(cfg, cfg.jobs["web"], payload, []) == []
    [msg] = sent
    files = {a.get_filename(): a for a in msg.iter_attachments()}
    assert sorted(files) == ["report.json", "xencr-report-web.html"]
    html = files["xencr-report-web.html"].get_content()
    assert "RPO compliance of job web" in html and DIGEST in html
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    assert "Status page: https://dr.example.com:8443/#job-web" in body.get_content()
    assert not any(s in msg.as_string() for s in SECRETS)


def test_test_failover_email(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan's test failover is mailed to its jobs' email_to (report_when always; failure only
    when it failed), with the plan's report attached and the page linked."""
    path = write_config(tmp_path, status='url = "https://dr.example.com/"')
    text = path.read_text()
    text = text.replace(
        "[jobs.web]\n", '[jobs.web]\nemail_to = ["web@example.com"]\nreport_when = "always"\n'
    )
    text = text.replace("[jobs.db]\n", '[jobs.db]\nemail_to = ["db@example.com"]\nreport_when = "failure"\n')
    path.write_text(text)
    cfg = load_config(path)
    state = fill(cfg, now_utc())
    with StateDB(cfg.state.path) as db:
        record = rehearsals.load(db, state.test_run)
    assert record is not None and record.ok
    sent: list[EmailMessage] = []
    monkeypatch.setattr(notify, "send_email", lambda smtp, to, msg: sent.append(msg))
    assert notify.notify_test(cfg, cfg.plans["site-b"], record) == []
    [msg] = sent
    assert (msg["To"], msg["Subject"]) == ("web@example.com", "xencr: plan site-b: test failover passed")
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    lines = body.get_content().splitlines()
    assert lines[0] == f"Test failover of plan site-b: passed (run {state.test_run})"
    assert any(
        line.startswith("db-1: ok, group 1, started ") and "gate after 21.5s" in line for line in lines
    )
    assert "Status page: https://dr.example.com/#plan-site-b" in lines
    [html] = [a for a in msg.iter_attachments() if a.get_filename() == "xencr-report-plan-site-b.html"]
    assert "1 test failover(s) in the period" in html.get_content()
    failed = rehearsals.Rehearsal(record.plan, record.run_id, record.booted, False, False, record.vms)
    sent.clear()
    assert notify.notify_test(cfg, cfg.plans["site-b"], failed) == []
    assert sent[0]["To"] == "web@example.com, db@example.com" and "FAILED" in sent[0]["Subject"]
