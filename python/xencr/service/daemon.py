"""The daemon: every enabled job on its schedules, in one long-running process.

One loop thread asks the :class:`~xencr.schedule.Scheduler` what is due, starts each fired
(job, schedule) in a worker thread and sleeps on the clock until the next fire. Runs of one job
may overlap: best effort lives below, in the per-VM/target locks of the runner (a VM still in
flight is recorded ``skipped`` by the new run). Signals only set events; the loop does the work:

- stop (SIGTERM/SIGINT): fire nothing more, give running transfers ``[daemon] grace`` seconds,
  then set the cancel event every run watches (transfers cut, replicas of the attempt discarded,
  tasks ``interrupted``), wait for the workers and return. A second stop skips the grace.
- reload (SIGHUP): read the configuration again; a bad one is logged and the old one kept.

Every hour (and at start), a thread of its own forgets the runs older than ``[daemon]
keep_history`` (`StateDB.prune_history`: the counters keep what they counted).

Logs are one ``key=value`` line per event on the given stream (stdout: journald keeps them),
built only from our own fields and error messages, which never carry a password.

With a PostgreSQL state the daemon is a worker of a cluster (`service.cluster`,
`xencr.coordination`): a due schedule's fire is claimed once cluster-wide and its (job, VM) tasks
queued; ``[worker] slots`` threads run the tasks this worker claims, one run per task. The stop
is the same (grace, then cancel); the tasks it cancels go back to the queue for another worker.
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TextIO

from xencr.config import Config, ConfigError, JobConfig, format_duration
from xencr.replication.jobs import run_configured
from xencr.replication.runner import RunReport
from xencr.schedule import Clock, Scheduler, SystemClock
from xencr.schedule.clock import clock_from_env
from xencr.schedule.scheduler import Entry
from xencr.service.cluster import ClusterWork
from xencr.service.cluster import TaskRun as RunFunction
from xencr.state import open_state
from xencr.web import server as web

# Longest sleep with nothing scheduled: the loop still wakes for signals at once.
_IDLE = timedelta(days=1)
# After the cancel, how long to wait for workers before leaving anyway (they are daemon threads).
_CANCEL_WAIT = 120.0
# How often old history is forgotten (`[daemon] keep_history`).
_PRUNE_EVERY = timedelta(hours=1)


def _quote(value: object) -> str:
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


class EventLog:
    """``ts=... event=NAME key=value ...`` lines, one per call, whole lines even across threads."""

    def __init__(self, stream: TextIO, clock: Clock) -> None:
        self.stream = stream
        self.clock = clock
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: object) -> None:
        parts = [f"ts={_quote(self.clock.now().isoformat(timespec='seconds'))}", f"event={event}"]
        parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
        with self._lock:
            self.stream.write(" ".join(parts) + "\n")
            self.stream.flush()


class _LogHandler(logging.Handler):
    """Library warnings (notifications, limits...) as event lines too."""

    def __init__(self, log: EventLog) -> None:
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log("log", level=record.levelname.lower(), logger=record.name, msg=record.getMessage())


def entries_of(config: Config) -> list[Entry]:
    """(job id, schedule) of every enabled job, in the configuration's order."""
    return [(job.id, s) for job in config.jobs.values() if job.enabled for s in job.schedules]


class Daemon:
    """The scheduling loop (``run_forever``) and what it owns: workers, fire records, metrics."""

    def __init__(
        self,
        load: Callable[[], Config],
        *,
        stream: TextIO,
        clock: Clock | None = None,
        run: RunFunction | None = None,
        metrics_listen: str | None = None,
    ) -> None:
        """``load`` reads the configuration (again on reload); ``run`` is ``run_configured``
        unless a test injects another; ``metrics_listen`` overrides ``[daemon] metrics_listen``."""
        self._load = load
        self.clock = clock or clock_from_env() or SystemClock()
        self.log = EventLog(stream, self.clock)
        self._run: RunFunction = run or run_configured
        self.config = load()
        self._metrics_listen = metrics_listen or self.config.daemon.metrics_listen
        self.scheduler = Scheduler(entries_of(self.config), self.clock.now())
        self.cancel = threading.Event()  # every run watches it: set after the grace
        self._poke = threading.Event()  # wakes the loop: a stop or a reload was asked for
        self._stop_asked = 0
        self._reload_asked = False
        self._lock = threading.Lock()
        self._workers: set[threading.Thread] = set()
        self._last: dict[tuple[str, str], datetime] = {}
        self._server: http.server.ThreadingHTTPServer | None = None
        self._next_prune = self.clock.now()  # `_forget_old_history`
        self._pruner: threading.Thread | None = None
        self.metrics_address: tuple[str, int] | None = None  # where /metrics is served, once started
        self.status_page: str | None = None  # how the status page is served beside it (None: not)
        # A worker of a cluster with a PostgreSQL state; None: this host alone (SQLite).
        self.cluster: ClusterWork | None = None
        if self.config.state.engine == "postgresql":
            self.cluster = ClusterWork(
                lambda: self.config,
                log=self.log,
                run=self._run,
                report=self._log_report,
                after_task=self._write_textfile,
            )

    # -- requests (signal handlers and tests)

    def request_stop(self) -> None:
        with self._lock:
            self._stop_asked += 1
        self._poke.set()

    def request_reload(self) -> None:
        with self._lock:
            self._reload_asked = True
        self._poke.set()

    # -- the loop

    def run_forever(self) -> int:
        """Fire schedules until a stop is asked for; returns the exit code (0)."""
        handler = _LogHandler(self.log)
        logging.getLogger().addHandler(handler)
        try:
            if self.cluster is not None:
                self.cluster.start()
            self._start_metrics()
            self.log(
                "started",
                jobs=len({j for j, _ in entries_of(self.config)}),
                schedules=len(entries_of(self.config)),
                config=self.config.path,
                metrics=_address(self.metrics_address),
                status_page=self.status_page,
                worker=self.cluster.name if self.cluster is not None else None,
            )
            self._record_fires(tidy=True)
            self._write_textfile()
            while not self._stop_asked:
                if self._take_reload():
                    self._reload()
                scheduled = self.scheduler.next_fires()
                for job_id, s in self.scheduler.due(self.clock.now()):
                    self._fire(job_id, s.id, scheduled[(job_id, s.id)])
                self._record_fires()
                self._forget_old_history()
                wakes = [
                    self.scheduler.next_wake(),
                    self._next_prune if self.config.daemon.keep_history else None,
                ]
                wake = min((w for w in wakes if w is not None), default=self.clock.now() + _IDLE)
                if not self.clock.wait_until(wake, self._poke):
                    with self._lock:
                        if not self._stop_asked:
                            self._poke.clear()
            self._shutdown()
            return 0
        finally:
            self._stop_metrics()
            logging.getLogger().removeHandler(handler)

    def _take_reload(self) -> bool:
        with self._lock:
            asked, self._reload_asked = self._reload_asked, False
        return asked

    def _reload(self) -> None:
        try:
            config = self._load()
        except Exception as err:  # whatever is wrong with the new file, the old config goes on
            self.log("reload_failed", error=str(err), kept=self.config.path)
            return
        old, self.config = self.config, config
        self.scheduler.update(entries_of(config), self.clock.now())
        self.log("reloaded", jobs=len({j for j, _ in entries_of(config)}), schedules=len(entries_of(config)))
        self._record_fires(tidy=True)
        if config.daemon.metrics_listen and self._metrics_listen != config.daemon.metrics_listen:
            self.log("notice", msg="a new metrics_listen takes effect at the next start")
        if self.cluster is not None and config.worker != old.worker:
            self.log("notice", msg="a new [worker] table takes effect at the next start")

    def _fire(self, job_id: str, schedule_id: str, fire_at: datetime) -> None:
        """A due (job, schedule), scheduled at ``fire_at``: run now (one host), or claimed and its
        tasks queued (a worker of a cluster)."""
        try:
            job = self.config.job(job_id)
        except ConfigError:
            return
        if self.cluster is not None:
            self.cluster.fire(
                job, schedule_id, fire_at, self.scheduler.next_fires().get((job_id, schedule_id))
            )
            return
        now = self.clock.now()
        self._last[(job_id, schedule_id)] = now
        self.log("fired", job=job.name, schedule=schedule_id)
        worker = threading.Thread(
            target=self._work, args=(self.config, job, schedule_id), name=f"run-{job.name}", daemon=True
        )
        with self._lock:
            self._workers.add(worker)
        worker.start()

    def _work(self, config: Config, job: JobConfig, schedule_id: str) -> None:
        try:
            report = self._run(
                config,
                job.name,
                schedule_id=schedule_id,
                trigger="schedule",
                progress=lambda line: self.log("progress", job=job.name, msg=line),
                cancel=self.cancel,
            )
            self._log_report(job, schedule_id, report)
        except Exception as err:  # a run's failure must not stop the daemon
            self.log("run_failed", job=job.name, schedule=schedule_id, error=str(err) or type(err).__name__)
        finally:
            self._write_textfile()
            with self._lock:
                self._workers.discard(threading.current_thread())

    def _log_report(self, job: JobConfig, schedule_id: str, report: RunReport) -> None:
        """A line per VM failure and per task of a finished run, then the run's line."""
        counts: dict[str, int] = {}
        for v in report.vms:
            if v.error:
                self.log("vm_failed", job=job.name, vm=v.vm_name, error=v.error)
            for t in v.targets:
                counts[t.outcome] = counts.get(t.outcome, 0) + 1
                self.log(
                    "task",
                    job=job.name,
                    vm=v.vm_name,
                    target=t.target,
                    outcome=t.outcome,
                    kind=t.kind if t.outcome == "success" else None,
                    bytes=t.bytes_sent if t.outcome == "success" else None,
                    restore_point=t.restore_point,
                    error=t.error,
                )
        self.log(
            "run_finished",
            job=job.name,
            schedule=schedule_id,
            outcome=report.outcome,
            vms=len(report.vms),
            **{f"tasks_{k}": n for k, n in sorted(counts.items())},
        )

    def _record_fires(self, *, tidy: bool = False) -> None:
        """Write each pair's last and next fire for `xencr status`; ``tidy`` (at start and after a
        reload) also takes the last fires recorded before and clears the next fire of pairs no
        longer scheduled, so status does not promise runs that will not happen."""
        if self.cluster is not None:
            # Every worker computes the same next fires; the last fire is the winner's to write.
            wanted: dict[tuple[str, str], datetime | None] = dict(self.scheduler.next_fires())
            try:
                if tidy:
                    with open_state(self.config) as db:
                        gone = [key for key, (_, nxt) in db.fires().items() if key not in wanted and nxt]
                    wanted.update(dict.fromkeys(gone))
                self.cluster.record_fires(wanted)
            except Exception as err:
                self.log("state_error", error=str(err))
            return
        try:
            with open_state(self.config) as db:
                nexts = self.scheduler.next_fires()
                if tidy:
                    for key, (last, nxt) in db.fires().items():
                        if last is not None:
                            self._last.setdefault(key, last)
                        if key not in nexts and nxt is not None:
                            db.set_fire(*key, last=last, next=None)
                for key, nxt in nexts.items():
                    db.set_fire(*key, last=self._last.get(key), next=nxt)
        except Exception as err:
            self.log("state_error", error=str(err))

    def _forget_old_history(self) -> None:
        """Once `_PRUNE_EVERY`, in a thread of its own (a first prune of a long history takes a
        while, and fires must not wait for it): forget the runs started longer ago than
        ``[daemon] keep_history``. Every worker of a cluster does it; they take turns."""
        keep, now = self.config.daemon.keep_history, self.clock.now()
        if keep is None or now < self._next_prune or (self._pruner is not None and self._pruner.is_alive()):
            return
        self._next_prune = now + _PRUNE_EVERY
        config = self.config

        def prune() -> None:
            # The age is the state's own clock's (it stamps the runs), the cadence the loop's.
            try:
                with open_state(config) as db:
                    forgotten = db.prune_history(timedelta(seconds=keep))
            except Exception as err:  # logged; the next hour tries again
                self.log("state_error", error=str(err))
                return
            if forgotten:
                self.log("history_pruned", runs=forgotten, older_than=format_duration(keep))

        self._pruner = threading.Thread(target=prune, name="prune-history", daemon=True)
        self._pruner.start()

    def _running(self) -> list[threading.Thread]:
        with self._lock:
            running = [w for w in self._workers if w.is_alive()]
        return running + (self.cluster.busy() if self.cluster is not None else [])

    def _shutdown(self) -> None:
        grace = self.config.daemon.grace
        if self.cluster is not None:
            self.cluster.stop_claiming()
        running = self._running()
        self.log("stopping", running=len(running), grace=grace)
        deadline = time.monotonic() + grace
        while running and self._stop_asked < 2 and time.monotonic() < deadline:
            running[0].join(min(0.1, max(0.0, deadline - time.monotonic())))
            running = self._running()
        if running:
            self.log("cancelling", running=len(running))
            self.cancel.set()
            if self.cluster is not None:
                self.cluster.cancel_for_stop()
            deadline = time.monotonic() + _CANCEL_WAIT
            for w in running:
                w.join(max(0.0, deadline - time.monotonic()))
        left = self._running()
        if self.cluster is not None:
            self.cluster.stop()
        self.log("stopped", abandoned=len(left) or None)

    # -- metrics

    def metrics_text(self) -> str:
        from xencr.monitor.metrics import render

        config = self.config
        if not config.state.exists():
            return render(None, config, datetime.now(UTC))
        with open_state(config) as db:
            return render(db, config, datetime.now(UTC))

    def _write_textfile(self) -> None:
        path = self.config.daemon.metrics_textfile
        if path is None:
            return
        try:
            from xencr.monitor.metrics import write_textfile

            write_textfile(path, self.metrics_text())
        except Exception as err:
            self.log("metrics_textfile_failed", path=path, error=str(err))

    def _start_metrics(self) -> None:
        if not self._metrics_listen:
            return
        host, port = parse_listen(self._metrics_listen)
        daemon = self

        def metrics(h: http.server.BaseHTTPRequestHandler) -> bool:
            if h.path.split("?")[0] != "/metrics":
                return False
            try:
                body = daemon.metrics_text().encode()
            except Exception as err:
                daemon.log("metrics_failed", error=str(err))
                h.send_error(500, "metrics unavailable")
                return True
            h.send_response(200)
            h.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return True

        # The status page beside /metrics, when its access rule allows it on this address.
        listener = web.listener(
            lambda: daemon.config,
            host,
            metrics,
            on_error=lambda line: daemon.log("status_page_failed", error=line),
        )
        self.status_page = listener.page
        if listener.refused is not None:
            self.log("status_page_off", reason=listener.refused)
        try:
            self._server = http.server.ThreadingHTTPServer((host, port), listener.handler)
        except OSError as err:
            raise OSError(err.errno, err.strerror, f"metrics listen address {self._metrics_listen}") from None
        if listener.tls is not None:
            self._server.socket = listener.tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._server.daemon_threads = True
        self.metrics_address = (host, self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()

    def _stop_metrics(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6; port 0 picks a free one) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid listen address {text!r}: expected HOST:PORT like 127.0.0.1:9464")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _address(addr: tuple[str, int] | None) -> str | None:
    if addr is None:
        return None
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
