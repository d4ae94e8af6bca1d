"""One simulated pool: its database, storage, sessions, tasks and faults, and which of its hosts
is the master. Every host of a pool shares this state (a real pool's database lives on the master
and members read it), but only the master takes API calls: a member answers ``HOST_IS_SLAVE``
with the master's address (``xapi_session.ml``, ``session_check.ml``)."""

from __future__ import annotations

import hmac
import logging
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from xencr.sim import knobs
from xencr.sim.activity import GuestActivity
from xencr.sim.array import Array, replicate
from xencr.sim.boot import GuestBoots
from xencr.sim.db import Database
from xencr.sim.dispatch import TaskRunner
from xencr.sim.errors import XapiError
from xencr.sim.faults import Faults
from xencr.sim.gauge import TransferGauge
from xencr.sim.gc import Collector
from xencr.sim.storage import Storage
from xencr.sim.tls import host_certificate
from xencr.sim.values import NULL_REF, now

USERNAME = "root"
# PAM's pam_strerror(PAM_AUTH_ERR), which xapi's local superuser check reports (xapi_session.ml).
PAM_AUTH_FAILURE = "Authentication failure"


class Listener(Protocol):
    """One host's network endpoint, which a fault can take down and bring back."""

    def go_down(self) -> None: ...

    def come_up(self) -> None: ...


class NbdServers(Protocol):
    """The hosts' NBD servers while the pool is served (``xencr.sim.nbd``)."""

    def reconcile(self, pool: int) -> None:
        """Bring pool ``pool``'s servers in line with its network purposes, host states and
        connection rate. Never called with the database lock held."""

    def port(self, pool: int, host: str) -> int | None:
        """The port host ``host`` serves NBD on (None when it has none)."""

    def attached(self, pool: int) -> Sequence[NbdAttachment]:
        """The VDIs NBD clients of pool ``pool`` hold attached now."""


class NbdAttachment(Protocol):
    """A connected NBD client's read-only VBD on a control domain."""

    host: str
    vdi_uuid: str
    vbd: str


@dataclass(frozen=True)
class StartRecord:
    """One domain start, in the order the pool started them (``sim.start_log``)."""

    vm: str  # VM UUID
    time: float  # wall clock, sub-second (VM_metrics.start_time has whole seconds only)
    host: str  # host UUID
    domid: int


class PoolState:
    def __init__(self, root: Path, index: int, password: str, *, auth_delay: float = 5.0) -> None:
        self.index = index
        self.dir = root / f"pool{index}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = logging.getLogger(f"xencr.sim.pool{index}")
        self.db = Database(self.dir / "db.json")
        # allowed_operations are derived from the current state on every read (never stale).
        from xencr.sim.api import vdi as vdi_api
        from xencr.sim.api import vm_checks

        self.db.computers = {
            "VM": [vm_checks.compute_allowed_operations],
            "VDI": [vdi_api.compute_allowed_operations],
        }
        self.password = password
        self.auth_delay = auth_delay
        self.faults = Faults(self.log)
        # Per VDI UUID: what the last VHD import received (bytes, blocks, sectors written).
        self.imports: dict[str, dict[str, int]] = {}
        self.transfers = TransferGauge()  # exports/imports served at once (`sim.transfer_gauge`)
        self.tasks = TaskRunner(self)
        self.storage = Storage(self)
        self.gc = Collector(self)
        self.storage.recover()  # file changes of operations whose records were never saved
        if self.gc.recover():
            self.db.save()
        self.storage.committed()
        self.guests = GuestActivity(self)
        self.boots = GuestBoots(self)
        self.starts: list[StartRecord] = []  # since this process began serving the pool
        self.bridge_counter = 0  # xapi_network.ml's counter: per xapi process, from 0
        self.address = "127.0.0.1"
        self.port = 0
        self.control_token = ""
        self.foreign_dbs: dict[str, Database] = {}  # DR sessions from VDI.open_database
        # The LUNs this pool can attach; load_pools gives every pool of the state the same one.
        self.array = Array(root, [self])
        # DR, in xapi's memory only (rebuilt when it starts): the metadata VDIs its redo logs
        # write to (xapi_vdi_helpers.ml metadata_replication) and, per foreign metadata VDI, the
        # (database generation, pool UUID) read at plug time (xapi_dr.ml db_vdi_cache).
        self.redo_logs: set[str] = set()
        self.metadata_cache: dict[str, tuple[int, str]] = {}
        self.tls = False  # data handlers cannot hand a TLS socket's fd to the engine
        self.listeners: dict[str, Listener] = {}  # host ref -> its listener, while served
        self.down_hosts: set[str] = set()
        self.nbd: NbdServers | None = None  # while served

    @property
    def delay_scale(self) -> float:
        """Multiplies every simulated delay (``pool.other_config["sim_delay_scale"]``, default 1)."""
        with self.db.lock:
            return knobs.delay_scale(self.db)

    def record_start(self, vm: str, host: str) -> None:
        """Note a domain start (caller holds the database lock)."""
        row = self.db.get("VM", vm)
        self.starts.append(
            StartRecord(row["uuid"], time.time(), self.db.get("host", host)["uuid"], int(row["domid"]))
        )

    @property
    def pool_ref(self) -> str:
        refs = self.db.refs("pool")
        return refs[0] if refs else NULL_REF

    @property
    def master_ref(self) -> str:
        pool = self.pool_ref
        return str(self.db.get("pool", pool)["master"]) if pool != NULL_REF else NULL_REF

    @property
    def host_ref(self) -> str:
        """The host that runs API calls: the master."""
        return self.master_ref

    def hosts(self) -> list[str]:
        """The pool's hosts in the order ``init`` made them (host 0 first)."""
        with self.db.lock:
            return sorted(self.db.refs("host"), key=lambda h: int(self.db.get("host", h).get("_index", 0)))

    def host_is_live(self, host: str) -> bool:
        with self.db.lock:
            metrics = self.db.get("host", host)["metrics"]
            return bool(
                self.db.exists("host_metrics", metrics) and self.db.get("host_metrics", metrics)["live"]
            )

    def certificate(self, host: str) -> Path:
        """The certificate ``host`` presents (generated on first use, also without ``--tls``:
        a real host always has one)."""
        return self.tls_files(host)[0]

    def tls_files(self, host: str) -> tuple[Path, Path]:
        """(certificate, private key) of ``host``; its HTTPS and its NBD server present them."""
        hosts = self.hosts()
        return host_certificate(
            self.dir.parent, self.index, hosts.index(host), own=len(hosts) > 1, hostname=self.address
        )

    def host_is_slave(self) -> XapiError:
        """``HOST_IS_SLAVE [master address]``, what a member answers to logins and API calls."""
        with self.db.lock:
            return XapiError("HOST_IS_SLAVE", self.db.get("host", self.master_ref)["address"])

    def set_host_down(self, host: str, down: bool) -> None:
        """Stop (or restart) the host's listener; the master notes the host dead (or alive)."""
        listener = self.listeners.get(host)
        if listener is None:
            raise XapiError("INTERNAL_ERROR", "host faults need a running simulator")
        with self.db.lock:
            name = self.db.get("host", host)["name_label"]
            self.db.update("host_metrics", self.db.get("host", host)["metrics"], live=not down)
        self.faults.set_host_down(name, down)
        if down:
            self.down_hosts.add(host)
            listener.go_down()
        else:
            listener.come_up()
            self.down_hosts.discard(host)
        self.nbd_changed()

    def nbd_changed(self) -> None:
        """Network purposes, a host's state or the connection rate changed: the NBD servers
        follow (caller must not hold the database lock)."""
        if self.nbd is not None:
            self.nbd.reconcile(self.index)

    def save(self) -> None:
        with self.db.lock:
            wrote = self.db.save()
            if not self.db.dirty:
                self.storage.committed()
        if wrote:
            replicate(self)  # DR: SR metadata and metadata VDIs follow every change

    # ------------------------------------------------------------------ sessions (xapi_session.ml)

    def login(self, uname: str, pwd: str, originator: str, host: str | None = None) -> str:
        """A session, for a login received by ``host`` (None: an internal login, e.g. HTTP Basic
        auth, which a member forwards to the master). A member refuses before checking the
        password (``xapi_session.ml`` login_with_password)."""
        if host is not None and host != self.master_ref:
            raise self.host_is_slave()
        if uname != USERNAME or not hmac.compare_digest(pwd.encode(), self.password.encode()):
            self.log.info("login failed for user %s", uname)  # the password is never logged
            time.sleep(self.auth_delay)  # xapi sleeps 5 s against brute force
            raise XapiError("SESSION_AUTHENTICATION_FAILED", uname, PAM_AUTH_FAILURE)
        with self.db.lock:
            return self.db.create(
                "session",
                {
                    "uuid": str(uuidlib.uuid4()),
                    "this_host": self.host_ref,
                    "last_active": now(),
                    "validation_time": now(),
                    "is_local_superuser": True,
                    "auth_user_name": uname,
                    "originator": originator,
                    "pool": False,
                },
            )

    def check_session(self, ref: str, host: str | None = None) -> None:
        """``SESSION_INVALID`` for an unknown session; then, on a member (``host`` not the
        master), ``HOST_IS_SLAVE``: client sessions are not pool sessions (``session_check.ml``)."""
        if not self.db.exists("session", ref):
            raise XapiError("SESSION_INVALID", ref)
        if host is not None and host != self.master_ref:
            raise self.host_is_slave()

    def drop_sessions(self) -> None:
        """Sessions are not persisted (``PersistNothing``): xapi restarting loses them all."""
        with self.db.lock:
            for ref in self.db.refs("session"):
                self.db.delete("session", ref)
            self.foreign_dbs.clear()

    def logout(self, ref: str) -> None:
        with self.db.lock:
            if self.db.exists("session", ref):
                self.db.delete("session", ref)
            self.foreign_dbs.pop(ref, None)
