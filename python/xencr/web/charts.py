"""Charts as inline SVG, drawn on the server: they need no script, no library and no network,
print in a report, and carry their numbers in ``<title>`` tooltips and a ``<desc>`` for screen
readers. Each run of a job is one ``<g class="run">`` (one point per run, whatever the scale)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from html import escape

from xencr.config import format_duration
from xencr.units import human_bytes
from xencr.web.series import AgeStep, RunBar

WIDTH, HEIGHT = 660, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 60, 14, 34
# An age line of more steps than this is reduced to each pixel column's lowest and highest
# values, which keeps its sawtooth (and every breach peak) as drawn.
MAX_STEPS = 2 * (WIDTH - LEFT - RIGHT)

COLOURS = {"full": "#b45309", "delta": "#1d4ed8", "mixed": "#6d28d9"}


def _x(t: datetime, since: datetime, until: datetime) -> float:
    span = max((until - since).total_seconds(), 1.0)
    return LEFT + (WIDTH - LEFT - RIGHT) * min(max((t - since).total_seconds() / span, 0.0), 1.0)


def _y(v: float, top: float) -> float:
    return TOP + (HEIGHT - TOP - BOTTOM) * (1 - v / top if top > 0 else 1)


def _nice_bytes(v: float) -> float:
    """The top of a bytes axis of 4 steps: each step 1, 2 or 5 x 10^k of a binary unit."""
    unit = 1.0
    while v / unit >= 1024:
        unit *= 1024
    need = max(v / unit / 4, 1e-9)
    k = 1.0
    while k * 10 <= need:
        k *= 10
    while k > need:
        k /= 10
    step = next(m * k for m in (1, 2, 5, 10) if m * k >= need)
    return 4 * step * unit if v > 0 else 4.0


# Steps of a time axis: round seconds, minutes, hours, days.
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _nice_seconds(v: float) -> float:
    """The top of a time axis of 4 steps, each a round duration."""
    need = v / 4
    step = next((s for s in _STEPS if s >= need), None)
    if step is None:
        step = 86400 * int(-(-need // 86400))
    return 4.0 * step


def _time_ticks(since: datetime, until: datetime) -> list[str]:
    out = []
    span = until - since
    fmt = "%m-%d" if span >= timedelta(days=3) else "%m-%d %H:%M"
    for i in range(5):
        t = since + span * i / 4
        x = _x(t, since, until)
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(
            f'<line x1="{x:.1f}" y1="{HEIGHT - BOTTOM}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM + 4}"'
            ' class="axis"/>'
            f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="{anchor}">{t.strftime(fmt)}</text>'
        )
    return out


def _frame(label: str, desc: str, cls: str, body: list[str]) -> str:
    return (
        f'<svg class="chart {cls}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}"'
        f' role="img" aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(label)}</title><desc>{escape(desc)}</desc>"
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}"'
        ' class="plot"/>' + "".join(body) + "</svg>"
    )


def runs_chart(job: str, runs: Sequence[RunBar], since: datetime, until: datetime) -> str:
    """Bytes each run moved (full, mixed and delta stacked; left axis) and how long it took
    (dots joined by a line; right axis), placed at each run's start."""
    top_bytes = _nice_bytes(max((r.total for r in runs), default=0))
    top_secs = _nice_seconds(max((r.seconds or 0 for r in runs), default=0))
    plot_w = WIDTH - LEFT - RIGHT
    bar_w = max(1.0, min(14.0, plot_w / max(len(runs), 1) * 0.6))
    body = _time_ticks(since, until)
    for i in range(5):
        v = top_bytes * i / 4
        y = _y(v, top_bytes)
        body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>')
        body.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{human_bytes(v)}</text>')
        s = top_secs * i / 4
        body.append(
            f'<text x="{WIDTH - RIGHT + 6}" y="{y + 4:.1f}" class="secs">{format_duration(int(s))}</text>'
        )
    line = []
    for r in runs:
        x = _x(r.started, since, until)
        parts = [f'<g class="run outcome-{escape(r.outcome)}" data-run="{r.run_id}">']
        tip = (
            f"run {r.run_id}, {r.started.strftime('%Y-%m-%d %H:%M:%SZ')}, {r.outcome}: "
            f"full {human_bytes(r.full)}, delta {human_bytes(r.delta)}"
            + (f", mixed {human_bytes(r.mixed)}" if r.mixed else "")
            + (f", took {format_duration(int(r.seconds))}" if r.seconds is not None else ", running")
        )
        parts.append(f"<title>{escape(tip)}</title>")
        base = 0
        for kind, value in (("delta", r.delta), ("mixed", r.mixed), ("full", r.full)):
            if value:
                y0, y1 = _y(base, top_bytes), _y(base + value, top_bytes)
                parts.append(
                    f'<rect class="{kind}" x="{x - bar_w / 2:.1f}" y="{y1:.1f}" width="{bar_w:.1f}"'
                    f' height="{max(y0 - y1, 0.5):.1f}" fill="{COLOURS[kind]}"/>'
                )
                base += value
        if r.seconds is not None:
            y = _y(r.seconds, top_secs)
            parts.append(f'<circle class="took" cx="{x:.1f}" cy="{y:.1f}" r="2.5"/>')
            line.append(f"{x:.1f},{y:.1f}")
        if r.outcome in ("failure", "interrupted", "partial"):
            parts.append(f'<text class="mark" x="{x:.1f}" y="{TOP + 10}" text-anchor="middle">!</text>')
        parts.append("</g>")
        body.append("".join(parts))
    if len(line) > 1:
        body.insert(0, f'<polyline class="took" points="{" ".join(line)}"/>')
    full = sum(r.full for r in runs)
    delta = sum(r.delta for r in runs)
    desc = (
        f"{len(runs)} runs of job {job} since {since.strftime('%Y-%m-%d %H:%M')}Z: "
        f"{human_bytes(full)} sent in full, {human_bytes(delta)} as deltas"
    )
    return _frame(f"Bytes moved and duration per run of job {job}", desc, "runs", body)


def _reduce(steps: Sequence[AgeStep], since: datetime, until: datetime) -> list[tuple[float, float]]:
    points = [(_x(s.at, since, until), float(s.age)) for s in steps]
    if len(points) <= MAX_STEPS:
        return points
    out: list[tuple[float, float]] = []
    column: list[tuple[float, float]] = []
    for p in points:
        if column and int(p[0]) != int(column[0][0]):
            lo, hi = min(column, key=lambda q: q[1]), max(column, key=lambda q: q[1])
            out += sorted({lo, hi})
            column = []
        column.append(p)
    if column:
        lo, hi = min(column, key=lambda q: q[1]), max(column, key=lambda q: q[1])
        out += sorted({lo, hi})
    return out


def age_chart(job: str, steps: Sequence[AgeStep], rpo: int | None, since: datetime, until: datetime) -> str:
    """The job's worst restore point age over time (left axis, time units) with the RPO drawn
    as a dashed line; the part above it is a breach."""
    peak = max((s.age for s in steps), default=0)
    top = _nice_seconds(max(peak, (rpo or 0) * 1.25, 60))
    body = _time_ticks(since, until)
    for i in range(5):
        v = top * i / 4
        y = _y(v, top)
        body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" class="grid"/>')
        body.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{format_duration(int(v))}</text>'
        )
    pts = _reduce(steps, since, until)
    if pts:
        body.append(
            '<polyline class="age" points="' + " ".join(f"{x:.1f},{_y(a, top):.1f}" for x, a in pts) + '"/>'
        )
    if rpo:
        y = _y(rpo, top)
        body.append(f'<line class="rpo" x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>')
        body.append(
            f'<text class="rpo" x="{WIDTH - RIGHT + 6}" y="{y + 4:.1f}">RPO {format_duration(rpo)}</text>'
        )
    over = sum(1 for s in steps if rpo and s.age > rpo)
    desc = f"Oldest newest restore point among the VMs of job {job}: peak {format_duration(peak)}" + (
        f", RPO {format_duration(rpo)}" + (", breached" if over else ", never breached") if rpo else ""
    )
    return _frame(f"Restore point age over time, job {job}", desc, "ages", body)


def rpo_bar(age: int | None, rpo: int | None) -> str:
    """A small bar of age against RPO: green under 75 %, amber up to 100 %, red past it (the
    words beside it say BREACH too: colour is never the only sign)."""
    w, h = 120, 12
    if rpo is None:
        return ""
    if age is None:
        share, cls = 1.0, "breach"
    else:
        share = age / rpo if rpo else 1.0
        cls = "ok" if share < 0.75 else "warn" if share <= 1.0 else "breach"
    fill = w * min(share, 1.0)
    return (
        f'<svg class="rpobar {cls}" width="{w}" height="{h}" viewBox="0 0 {w} {h}" aria-hidden="true"'
        f' xmlns="http://www.w3.org/2000/svg"><rect class="track" width="{w}" height="{h}" rx="2"/>'
        f'<rect class="fill" width="{fill:.1f}" height="{h}" rx="2"/></svg>'
    )


def timeline(groups: Sequence[tuple[int, float, float | None, bool]], total: float) -> str:
    """A test failover's groups on a time line: (group, start offset s, gate passed offset s or
    None, passed), one bar per group from its first start to its last gate."""
    w, row = 420, 18
    h = row * max(len(groups), 1) + 20
    scale = (w - 90) / max(total, 1.0)
    body = []
    for i, (number, start, end, ok) in enumerate(groups):
        y = i * row + 4
        x0 = 80 + start * scale
        x1 = 80 + (end if end is not None else start) * scale
        cls = "passed" if ok else "failed"
        label = f"group {number}: started at +{start:.0f}s" + (
            f", gate passed at +{end:.0f}s" if end is not None and ok else ", FAILED" if not ok else ""
        )
        body.append(
            f'<g class="group {cls}"><title>{escape(label)}</title>'
            f'<text x="0" y="{y + 11}">group {number}</text>'
            f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 3):.1f}" height="{row - 6}" rx="2"/></g>'
        )
    body.append(f'<text x="80" y="{h - 4}">0s</text>')
    body.append(f'<text x="{w}" y="{h - 4}" text-anchor="end">+{total:.0f}s</text>')
    return (
        f'<svg class="timeline" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"'
        f' aria-label="start groups over time" xmlns="http://www.w3.org/2000/svg">' + "".join(body) + "</svg>"
    )
