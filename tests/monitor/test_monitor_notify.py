"""Run reports: when they are sent, the webhook (a local HTTP receiver), the e-mail (a local
aiosmtpd server, plain, STARTTLS and TLS with a login), and no secret in any message or log."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from monitortest import config, receiving

from xencr.config import SmtpConfig
from xencr.credentials import Secret
from xencr.monitor import notify as notify_mod
from xencr.monitor.notify import document, notify, report_reason, send_email, send_webhook
from xencr.monitor.rpo import Breach
from xencr.sim.tls import ensure_certificate, server_context

TOKEN = "s3cr3t-T0KEN-4242"
SMTP_PASSWORD = "hunter2-smtp-pw!"

PAYLOAD: dict[str, Any] = {
    "job": "web",
    "outcome": "partial",
    "started": "2026-11-20T12:00:00+00:00",
    "finished": "2026-11-20T12:01:30+00:00",
    "vms": [
        {
            "uuid": "vm-1",
            "name": "web-1",
            "outcome": "success",
            "snapshot": "snap-1",
            "error": None,
            "source_snapshots_removed": [],
            "targets": [
                {
                    "target": "b/SR1",
                    "sr": "sr-b",
                    "outcome": "success",
                    "restore_point": "rp-1",
                    "kind": "mixed",
                    "bytes": 3 * 1024 * 1024,
                    "error": None,
                    "cleaned": ["orphan-1"],
                    "expired": [],
                    "warnings": [],
                    "disks": [
                        {"userdevice": "0", "name": "root", "kind": "delta", "reason": "delta", "bytes": 1},
                        {
                            "userdevice": "1",
                            "name": "data",
                            "kind": "full",
                            "reason": "disk added",
                            "bytes": 2,
                        },
                    ],
                }
            ],
        },
        {
            "uuid": "vm-2",
            "name": "web-2",
            "outcome": "failure",
            "snapshot": "snap-2",
            "error": None,
            "source_snapshots_removed": [],
            "targets": [
                {
                    "target": "b/SR1",
                    "sr": "sr-b",
                    "outcome": "failure",
                    "restore_point": None,
                    "kind": "delta",
                    "bytes": 0,
                    "error": "SR_FULL: the SR is full",
                    "cleaned": [],
                    "expired": [],
                    "warnings": [],
                    "disks": [],
                }
            ],
        },
    ],
}
BREACH = Breach("web-2", "vm-2", "sr-b", 7200, 600)


def outcome(vm_outcomes: list[str], target_outcomes: list[str]) -> dict[str, Any]:
    return {
        "job": "web",
        "outcome": "success",
        "vms": [
            {"name": f"v{i}", "outcome": o, "targets": [{"outcome": t} for t in target_outcomes]}
            for i, o in enumerate(vm_outcomes)
        ],
    }


# -- when


@pytest.mark.parametrize(
    ("when", "payload", "breaches", "expected"),
    [
        ("never", PAYLOAD, [BREACH], None),
        ("always", outcome(["success"], ["success"]), [], "every run is reported"),
        ("failure", outcome(["success"], ["success"]), [BREACH], None),
        (
            "failure",
            outcome(["success", "failure"], ["success"]),
            [],
            "a VM or target failed or was interrupted",
        ),
        (
            "failure",
            outcome(["partial"], ["success", "interrupted"]),
            [],
            "a VM or target failed or was interrupted",
        ),
        (
            "failure",
            {"job": "web", "outcome": "interrupted", "vms": []},
            [],
            "a VM or target failed or was interrupted",
        ),
        # A skip is not a failure (the VM is still busy with the previous run).
        ("failure", outcome(["skipped", "success"], ["skipped"]), [], None),
        ("breach", outcome(["skipped"], ["skipped"]), [], None),
        ("breach", outcome(["success"], ["success"]), [BREACH], "an RPO is breached"),
        ("breach", PAYLOAD, [BREACH], "a VM or target failed or was interrupted"),
    ],
)
def test_report_when(
    when: str, payload: dict[str, Any], breaches: list[Breach], expected: str | None
) -> None:
    assert report_reason(when, payload, breaches) == expected


# -- webhook


@pytest.fixture(autouse=True)
def no_retry_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify_mod, "RETRY_PAUSE", 0.0)


def test_webhook_delivers_the_report(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with receiving() as rec:
        cfg = config(
            tmp_path, job_extra=f'report_when = "failure"\nwebhook = "{rec.url}/hooks/{TOKEN}?key={TOKEN}"'
        )
        assert notify(cfg, cfg.jobs["web"], PAYLOAD, [BREACH]) == []
    [(path, headers, body)] = rec.posts
    assert path == f"/hooks/{TOKEN}?key={TOKEN}"
    assert headers["Content-Type"] == "application/json" and headers["User-Agent"].startswith("xencr/")
    sent = json.loads(body)
    # The run report as it is, plus why it was sent and the RPO breaches.
    assert {k: sent[k] for k in PAYLOAD} == PAYLOAD
    assert sent["report_reason"] == "a VM or target failed or was interrupted"
    assert sent["rpo_breaches"] == [
        {"vm": "web-2", "vm_uuid": "vm-2", "target_sr": "sr-b", "age_seconds": 7200, "rpo_seconds": 600}
    ]
    # httpx logs each request with its URL: masked, as the daemon's log must not hold the token.
    assert "HTTP Request: POST ***" in caplog.text
    assert f"report sent to webhook {rec.url} (HTTP 200)" in caplog.text
    assert TOKEN not in caplog.text


def test_webhook_not_sent_when_report_when_says_no(tmp_path: Path) -> None:
    with receiving() as rec:
        cfg = config(tmp_path, job_extra=f'report_when = "failure"\nwebhook = "{rec.url}/h"')
        ok = outcome(["success"], ["success"])
        assert notify(cfg, cfg.jobs["web"], ok, [BREACH]) == []
        cfg = config(tmp_path, job_extra=f'report_when = "never"\nwebhook = "{rec.url}/h"')
        assert notify(cfg, cfg.jobs["web"], PAYLOAD, [BREACH]) == []
        assert rec.posts == []
        cfg = config(tmp_path, job_extra=f'report_when = "always"\nwebhook = "{rec.url}/h"')
        assert notify(cfg, cfg.jobs["web"], ok, []) == []
        assert [json.loads(b)["report_reason"] for _, _, b in rec.posts] == ["every run is reported"]


def test_webhook_retries_once_on_a_server_error() -> None:
    with receiving() as rec:
        rec.statuses = [503]
        assert send_webhook(f"{rec.url}/h", {"a": 1}) is None
        assert [json.loads(b) for _, _, b in rec.posts] == [{"a": 1}, {"a": 1}]
        rec.posts.clear()
        rec.statuses = [500, 502]
        problem = send_webhook(f"{rec.url}/h/{TOKEN}", {"a": 1})
        assert problem == f"webhook {rec.url}: HTTP 502 Bad Gateway"
        assert len(rec.posts) == 2
        rec.posts.clear()
        rec.statuses = [404]  # refused: not sent again
        assert send_webhook(f"{rec.url}/h", {"a": 1}) == f"webhook {rec.url}: HTTP 404 Not Found"
        assert len(rec.posts) == 1


def test_webhook_verifies_tls_and_hides_its_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with receiving(tls=tmp_path) as rec:
        cfg = config(tmp_path, job_extra=f'report_when = "always"\nwebhook = "{rec.url}/x?token={TOKEN}"')
        [problem] = notify(cfg, cfg.jobs["web"], PAYLOAD, [])
    assert rec.posts == []  # a self-signed certificate is refused: nothing was sent
    assert problem.startswith(f"job web: report not sent: webhook {rec.url}: ConnectError: ")
    assert "CERTIFICATE_VERIFY_FAILED" in problem
    assert TOKEN not in problem and TOKEN not in caplog.text


def test_webhook_unreachable_is_a_problem_not_an_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    cfg = config(tmp_path, job_extra=f'report_when = "always"\nwebhook = "http://127.0.0.1:{port}/{TOKEN}"')
    [problem] = notify(cfg, cfg.jobs["web"], PAYLOAD, [])
    assert problem.startswith(f"job web: report not sent: webhook http://127.0.0.1:{port}: ConnectError")
    assert TOKEN not in problem


# -- e-mail


@dataclass
class Mailbox:
    port: int
    messages: list[tuple[Envelope, EmailMessage]] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mail_server(security: str = "none", certs: Path | None = None) -> Iterator[Mailbox]:
    """A local aiosmtpd server; with ``security`` starttls or tls, it asks for a login (user
    'xencr', password SMTP_PASSWORD) over the encrypted connection."""
    box = Mailbox(_free_port())

    class Handler:
        async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
            raw = envelope.original_content or b""
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            box.messages.append((envelope, msg))
            return "250 OK"

    def authenticator(
        server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        login, password = data.login.decode(), data.password.decode()
        box.logins.append((login, password))
        # handled=False: the server answers 535 itself on a refusal.
        return AuthResult(success=(login, password) == ("xencr", SMTP_PASSWORD), handled=False)

    kwargs: dict[str, Any] = {}
    if security != "none":
        assert certs is not None
        cert, key = ensure_certificate(certs)
        ctx = server_context(cert, key)
        kwargs = {"authenticator": authenticator, "auth_required": True}
        if security == "starttls":
            kwargs |= {"tls_context": ctx, "require_starttls": True}
        else:
            # Implicit TLS is the transport's: aiosmtpd does not see it, so it must be told that
            # AUTH may be offered.
            kwargs |= {"ssl_context": ctx, "auth_require_tls": False}
    controller = Controller(Handler(), hostname="127.0.0.1", port=box.port, **kwargs)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


def _parts(msg: EmailMessage) -> tuple[str, dict[str, Any]]:
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    # report.json, and the job's HTML report (tests/web checks that one).
    attachments = {a.get_filename(): a for a in msg.iter_attachments()}
    assert sorted(attachments) == ["report.json", "xencr-report-web.html"]
    attachment = attachments["report.json"]
    assert attachment.get_content_type() == "application/json"
    return body.get_content(), json.loads(attachment.get_content())


def test_email_summary_and_json(tmp_path: Path) -> None:
    with mail_server() as box:
        smtp = f'[smtp]\nhost = "127.0.0.1"\nport = {box.port}\nsender = "dr@example.com"'
        cfg = config(
            tmp_path,
            job_extra='report_when = "breach"\nemail_to = ["ops@example.com", "b@example.com"]',
            tail=smtp,
        )
        assert notify(cfg, cfg.jobs["web"], PAYLOAD, [BREACH]) == []
    [(envelope, msg)] = box.messages
    assert envelope.mail_from == "dr@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "b@example.com"]
    assert msg["To"] == "ops@example.com, b@example.com" and msg["From"] == "dr@example.com"
    assert msg["Subject"] == "xencr: job web: partial (1 failure, 1 success), 1 RPO breach"
    text, attached = _parts(msg)
    assert text.splitlines()[:3] == [
        "Job web: partial",
        "Started 2026-11-20T12:00:00+00:00, finished 2026-11-20T12:01:30+00:00 (1m30s)",
        "Reported because: a VM or target failed or was interrupted",
    ]
    for line in (
        "web-1 (vm-1): success",
        "  -> b/SR1: success, mixed, 3.0 MiB",
        "     disk 1: full (disk added)",
        "     cleaned up 1 leftover(s) of earlier runs",
        "web-2 (vm-2): failure",
        "  -> b/SR1: failure",
        "     SR_FULL: the SR is full",
        "  web-2 (vm-2) -> SR sr-b: 2h old, RPO 10m",
        "The full report is attached as JSON (report.json).",
    ):
        assert line in text.splitlines(), line
    assert attached == document(PAYLOAD, [BREACH], "a VM or target failed or was interrupted")


def test_email_of_a_run_that_could_not_start(tmp_path: Path) -> None:
    failed = {
        "job": "web",
        "outcome": "failure",
        "started": "2026-11-20T12:00:00+00:00",
        "finished": "2026-11-20T12:00:00+00:00",
        "error": "https://a.example: connection refused",
        "vms": [],
    }
    with mail_server() as box:
        smtp = f'[smtp]\nhost = "127.0.0.1"\nport = {box.port}'
        cfg = config(tmp_path, job_extra='email_to = ["ops@example.com"]', tail=smtp)
        assert notify(cfg, cfg.jobs["web"], failed, []) == []
    [(_, msg)] = box.messages
    assert msg["Subject"] == "xencr: job web: failure (no VM)"
    text, attached = _parts(msg)
    assert text.splitlines()[3:6] == [
        "Error: https://a.example: connection refused",
        "",
        "No VM was replicated.",
    ]
    assert attached["error"] == failed["error"]


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")  # implicit TLS, see above
@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_email_over_tls_with_login(
    security: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cert, _ = ensure_certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test server's certificate only
    monkeypatch.setenv("XENCR_SMTP_PASSWORD", SMTP_PASSWORD)
    with mail_server(security, certs=tmp_path) as box:
        smtp = (
            f'[smtp]\nhost = "127.0.0.1"\nport = {box.port}\nsecurity = "{security}"\n'
            'username = "xencr"\nsender = "dr@example.com"'
        )
        cfg = config(tmp_path, job_extra='report_when = "always"\nemail_to = ["ops@example.com"]', tail=smtp)
        assert notify(cfg, cfg.jobs["web"], PAYLOAD, []) == []
        assert box.logins == [("xencr", SMTP_PASSWORD)]
        [(_, msg)] = box.messages
        text, attached = _parts(msg)
        assert "Reported because: every run is reported" in text
        assert attached["job"] == "web" and attached["rpo_breaches"] == []
        assert SMTP_PASSWORD not in msg.as_string()
        # A wrong password: one line saying so, without any password.
        monkeypatch.setenv("XENCR_SMTP_PASSWORD", "wrong-" + SMTP_PASSWORD)
        cfg = config(tmp_path, job_extra='report_when = "always"\nemail_to = ["ops@example.com"]', tail=smtp)
        [problem] = notify(cfg, cfg.jobs["web"], PAYLOAD, [])
    assert problem.startswith(
        f"job web: report not sent: e-mail via 127.0.0.1:{box.port}: SMTPAuthenticationError"
    )
    assert SMTP_PASSWORD not in problem and SMTP_PASSWORD not in caplog.text
    assert len(box.messages) == 1


def test_email_refuses_an_untrusted_certificate(tmp_path: Path) -> None:
    with mail_server("starttls", certs=tmp_path) as box:
        smtp = SmtpConfig("127.0.0.1", box.port, "starttls", "xencr", Secret(SMTP_PASSWORD), "dr@example.com")
        problem = send_email(smtp, ["ops@example.com"], EmailMessage())
    assert problem is not None and "CERTIFICATE_VERIFY_FAILED" in problem
    assert box.logins == [] and box.messages == []
    assert SMTP_PASSWORD not in problem


def test_email_password_never_sent_in_clear(tmp_path: Path) -> None:
    smtp = SmtpConfig("mail.example.com", 25, "none", "xencr", Secret(SMTP_PASSWORD), "dr@example.com")
    problem = send_email(smtp, ["ops@example.com"], EmailMessage())
    assert problem == (
        "e-mail via mail.example.com:25: refusing to send the password unencrypted"
        " (set smtp.security to starttls or tls)"
    )
    no_pw = SmtpConfig("127.0.0.1", 25, "starttls", "xencr", None, "dr@example.com")
    assert "no password" in (send_email(no_pw, ["ops@example.com"], EmailMessage()) or "")


def test_email_server_down_is_a_problem(tmp_path: Path) -> None:
    port = _free_port()
    cfg = config(
        tmp_path,
        job_extra='report_when = "always"\nemail_to = ["ops@example.com"]',
        tail=f'[smtp]\nhost = "127.0.0.1"\nport = {port}',
    )
    [problem] = notify(cfg, cfg.jobs["web"], PAYLOAD, [])
    assert problem.startswith(
        f"job web: report not sent: e-mail via 127.0.0.1:{port}: ConnectionRefusedError"
    )


def test_notify_never_raises(tmp_path: Path) -> None:
    cfg = config(tmp_path, job_extra='report_when = "always"\nwebhook = "http://127.0.0.1:1/x"')
    # A payload of the wrong shape is a problem line, not an exception in the run.
    problems = notify(cfg, cfg.jobs["web"], {"vms": "not a list"}, [])  # type: ignore[dict-item]
    assert len(problems) == 1 and problems[0].startswith("job web: report not sent: ")
