"""Sending a job's run report: a JSON POST to the job's webhook and/or an e-mail to its
``email_to`` through the configured SMTP relay, when ``report_when`` says so.

A notification never fails the run it reports on: every problem comes back as one line (without
the webhook's URL, which often carries a token, and without any password) for the caller to log.
"""

from __future__ import annotations

import json
import logging
import smtplib
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import urlsplit

import httpx

from xencr import __version__
from xencr.config import Config, JobConfig, PlanConfig, SmtpConfig
from xencr.monitor.rehearsals import Rehearsal
from xencr.monitor.rpo import Breach
from xencr.monitor.summary import failed, health_check_failed, subject, summary
from xencr.web import audit, report

log = logging.getLogger(__name__)

TIMEOUT = 15.0  # seconds for each connection, read and write (webhook and SMTP)
RETRY_PAUSE = 2.0  # seconds before the one retry of a webhook (tests set 0)
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
REPORT_PERIOD = timedelta(days=30)  # what a test failover's e-mail attaches of its plan


class _Redact(logging.Filter):
    """httpx logs each request's full URL at INFO: a webhook's token would reach the daemon's
    log. While a webhook is sent, its secrets are masked in what httpx logs (httpcore, below it,
    logs only the host)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: dict[str, int] = {}

    def hold(self, secrets: Sequence[str]) -> None:
        with self._lock:
            for s in secrets:
                self._secrets[s] = self._secrets.get(s, 0) + 1

    def release(self, secrets: Sequence[str]) -> None:
        with self._lock:
            for s in secrets:
                self._secrets[s] -= 1
                if not self._secrets[s]:
                    del self._secrets[s]

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        if secrets:
            record.msg = _scrub(record.getMessage(), secrets)
            record.args = ()
        return True


_redact = _Redact()
logging.getLogger("httpx").addFilter(_redact)


def report_reason(when: str, payload: Mapping[str, Any], breaches: Sequence[Breach]) -> str | None:
    """Why this run is reported under ``report_when = when``, or ``None`` if it is not."""
    if when == "always":
        return "every run is reported"
    if when in ("failure", "breach") and failed(payload):
        return "a VM or target failed or was interrupted"
    if when in ("failure", "breach") and health_check_failed(payload):
        return "a health check failed"
    if when == "breach" and breaches:
        return "an RPO is breached"
    return None


def document(payload: Mapping[str, Any], breaches: Sequence[Breach], why: str) -> dict[str, Any]:
    """What is sent: the run report, with the breaches and the reason for sending it."""
    return dict(payload) | {
        "report_reason": why,
        "rpo_breaches": [
            {
                "vm": b.vm,
                "vm_uuid": b.vm_uuid,
                "target_sr": b.target_sr,
                "age_seconds": b.age,
                "rpo_seconds": b.rpo,
            }
            for b in breaches
        ],
    }


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return " ".join(text.split())


def _error_text(err: BaseException) -> str:
    return str(err) or type(err).__name__


def send_webhook(url: str, doc: Mapping[str, Any]) -> str | None:
    """POST ``doc`` as JSON (TLS verified, timeouts, one retry on a network error or a 5xx/429);
    a problem line, or ``None`` once delivered."""
    parts = urlsplit(url)
    where = f"webhook {parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    # Everything of the URL beyond the host may be a token: never in a message.
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    secrets = [s for s in (url, tail, parts.query, parts.password or "") if s not in ("", "/")]
    _redact.hold(secrets)
    try:
        return _post(url, doc, where, secrets)
    finally:
        _redact.release(secrets)


def _post(url: str, doc: Mapping[str, Any], where: str, secrets: Sequence[str]) -> str | None:
    body = json.dumps(doc, indent=2).encode()
    headers = {"Content-Type": "application/json", "User-Agent": f"xencr/{__version__}"}
    problem = ""
    for attempt in range(2):
        if attempt:
            time.sleep(RETRY_PAUSE)
        try:
            with httpx.Client(timeout=TIMEOUT, verify=True, follow_redirects=False) as client:
                response = client.post(url, content=body, headers=headers)
        except httpx.HTTPError as err:
            problem = f"{where}: {type(err).__name__}: {_scrub(_error_text(err), secrets)}"
            continue
        if response.is_success:
            log.info("report sent to %s (HTTP %d)", where, response.status_code)
            return None
        problem = f"{where}: HTTP {response.status_code} {response.reason_phrase}"
        if response.status_code < 500 and response.status_code != 429:
            break  # the receiver refuses this request: sending it again changes nothing
    return problem


@dataclass(frozen=True)
class Attachment:
    """A file sent with the e-mail."""

    filename: str
    maintype: str
    subtype: str
    data: bytes


def job_report_attachment(config: Config, job: JobConfig) -> Attachment:
    """The job's self-contained HTML report of the last week (`web.audit`): an e-mail is often
    read far from the status page, and kept."""
    now = datetime.now(UTC)
    html = audit.job_report(config, job, now - audit.PERIOD, now)
    return Attachment(f"xencr-report-{job.name}.html", "text", "html", html.encode())


def email_message(
    smtp: SmtpConfig,
    to: Sequence[str],
    payload: Mapping[str, Any],
    breaches: Sequence[Breach],
    why: str,
    *,
    link: str | None = None,
    attachments: Sequence[Attachment] = (),
) -> EmailMessage:
    """The report e-mail: the readable summary (with ``link``, the status page), the JSON report
    and ``attachments``."""
    msg = EmailMessage()
    msg["Subject"] = subject(payload, breaches)
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=smtp.sender.rpartition("@")[2] or None)
    text = summary(payload, breaches, why)
    if attachments:
        text += f"The job's report of the last week is attached as HTML ({attachments[0].filename}).\n"
    if link is not None:
        text += f"Status page: {link}\n"
    msg.set_content(text)
    report = json.dumps(document(payload, breaches, why), indent=2)
    msg.add_attachment(report.encode(), maintype="application", subtype="json", filename="report.json")
    for a in attachments:
        msg.add_attachment(a.data, maintype=a.maintype, subtype=a.subtype, filename=a.filename)
    return msg


def send_email(smtp: SmtpConfig, to: Sequence[str], msg: EmailMessage) -> str | None:
    """Deliver ``msg`` through the relay with its security mode (certificate verified for
    ``tls`` and ``starttls``) and credentials; a problem line, or ``None`` once accepted."""
    where = f"e-mail via {smtp.host}:{smtp.port}"
    secrets = [smtp.password.reveal()] if smtp.password is not None else []
    if smtp.username is not None and smtp.password is None:
        return f"{where}: smtp.username is set but no password (set XENCR_SMTP_PASSWORD or password_file)"
    if smtp.username is not None and smtp.security == "none" and smtp.host not in _LOOPBACK:
        return f"{where}: refusing to send the password unencrypted (set smtp.security to starttls or tls)"
    context = ssl.create_default_context()
    try:
        client: smtplib.SMTP
        if smtp.security == "tls":
            client = smtplib.SMTP_SSL(smtp.host, smtp.port, timeout=TIMEOUT, context=context)
        else:
            client = smtplib.SMTP(smtp.host, smtp.port, timeout=TIMEOUT)
        with client:
            if smtp.security == "starttls":
                client.starttls(context=context)
            if smtp.username is not None and smtp.password is not None:
                client.login(smtp.username, smtp.password.reveal())
            refused = client.send_message(msg, from_addr=smtp.sender, to_addrs=list(to))
    except (OSError, smtplib.SMTPException) as err:
        return f"{where}: {type(err).__name__}: {_scrub(_error_text(err), secrets)}"
    if refused:
        return f"{where}: refused for {', '.join(sorted(refused))}"
    log.info("report e-mailed to %d recipient(s) via %s:%d", len(to), smtp.host, smtp.port)
    return None


def notify(
    config: Config, job: JobConfig, payload: Mapping[str, Any], breaches: Sequence[Breach]
) -> list[str]:
    """Report a finished run of ``job`` if its ``report_when`` asks for it; the problems met,
    one line each (never raises: a report must not fail the run it reports on)."""
    try:
        why = report_reason(job.report_when, payload, breaches)
        if why is None or (job.webhook is None and not job.email_to):
            return []
        problems: list[str] = []
        if job.webhook is not None:
            p = send_webhook(job.webhook, document(payload, breaches, why))
            problems += [p] if p else []
        if job.email_to:
            if config.smtp is None:
                problems.append("e-mail: no [smtp] table in the configuration")
            else:
                attached: list[Attachment] = []
                try:
                    attached.append(job_report_attachment(config, job))
                except Exception as err:  # the summary still goes without it
                    log.warning(
                        "job %s: report e-mail without its HTML report: %s", job.name, type(err).__name__
                    )
                link = f"{config.status.url.rstrip('/')}/#job-{job.name}" if config.status.url else None
                msg = email_message(
                    config.smtp, job.email_to, payload, breaches, why, link=link, attachments=attached
                )
                p = send_email(config.smtp, job.email_to, msg)
                problems += [p] if p else []
        return [f"job {job.name}: report not sent: {p}" for p in problems]
    except Exception as err:  # a bug here must still not fail the run (its text might hold a secret)
        return [f"job {job.name}: report not sent: {type(err).__name__}"]


def _test_recipients(config: Config, plan: PlanConfig, passed: bool) -> list[str]:
    """Who hears of a plan's test failover: the ``email_to`` of the jobs it recovers, each
    under its ``report_when`` (``always``; ``failure`` and ``breach`` when the test failed)."""
    out: list[str] = []
    for name in plan.jobs:
        job = config.jobs.get(name)
        if job is None or job.report_when == "never":
            continue
        if job.report_when == "always" or not passed:
            out += [a for a in job.email_to if a not in out]
    return out


def test_summary(record: Rehearsal) -> str:
    """The readable text of a test failover's e-mail: the verdict, then a line per VM."""
    lines = [
        f"Test failover of plan {record.plan}: {'passed' if record.ok else 'FAILED'} (run {record.run_id})"
    ]
    if not record.booted:
        lines.append("The clones were made, not booted (--boot checks the gates).")
    lines.append("")
    for v in sorted(record.vms, key=lambda v: (v.group or 0, v.name)):
        line = f"{v.name}: {'ok' if v.ok else 'FAILED'}"
        if v.group is not None and v.started_at is not None:
            line += f", group {v.group}, started {v.started_at.strftime('%H:%M:%S')}Z"
        if v.boot_seconds is not None:
            line += f", gate after {v.boot_seconds:.1f}s"
        lines.append(line + (f": {v.detail}" if v.detail else ""))
    if record.kept:
        lines += ["", "The test objects were kept for inspection (xencr failover --cleanup removes them)."]
    return "\n".join(lines) + "\n"


def notify_test(config: Config, plan: PlanConfig, record: Rehearsal) -> list[str]:
    """E-mail a plan's test failover (`_test_recipients`) with the plan's report of the last 30
    days attached and the status page linked (``[status] url``); the problems met, one line
    each (never raises: the test's outcome stands whatever happens here)."""
    try:
        to = _test_recipients(config, plan, record.ok)
        if not to:
            return []
        if config.smtp is None:
            return [f"plan {plan.name}: test report not sent: e-mail: no [smtp] table in the configuration"]
        now = datetime.now(UTC)
        html = report.report_html(config, plan.name, now - REPORT_PERIOD, now)
        msg = EmailMessage()
        msg["Subject"] = f"xencr: plan {plan.name}: test failover {'passed' if record.ok else 'FAILED'}"
        msg["From"] = config.smtp.sender
        msg["To"] = ", ".join(to)
        msg["Date"] = formatdate(localtime=False, usegmt=True)
        msg["Message-ID"] = make_msgid(domain=config.smtp.sender.rpartition("@")[2] or None)
        name = f"xencr-report-plan-{plan.name}.html"
        text = (
            test_summary(record) + f"\nThe plan's report of the last 30 days is attached as HTML ({name}).\n"
        )
        if config.status.url:
            text += f"Status page: {config.status.url.rstrip('/')}/#plan-{plan.name}\n"
        msg.set_content(text)
        msg.add_attachment(html.encode(), maintype="text", subtype="html", filename=name)
        problem = send_email(config.smtp, to, msg)
        return [f"plan {plan.name}: test report not sent: {problem}"] if problem else []
    except Exception as err:  # its text might hold a secret
        return [f"plan {plan.name}: test report not sent: {type(err).__name__}"]
