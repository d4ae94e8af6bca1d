"""One simulated pool: its database, storage, sessions, tasks and faults."""

from __future__ import annotations

import hmac
import logging
import time
import uuid as uuidlib
from pathlib import Path

from xencr.sim.activity import GuestActivity
from xencr.sim.db import Database
from xencr.sim.dispatch import TaskRunner
from xencr.sim.errors import XapiError
from xencr.sim.faults import Faults
from xencr.sim.gc import Collector
from xencr.sim.storage import Storage
from xencr.sim.values import NULL_REF, now

USERNAME = "root"
# PAM's pam_strerror(PAM_AUTH_ERR), which xapi's local superuser check reports (xapi_session.ml).
PAM_AUTH_FAILURE = "Authentication failure"


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
        self.delay_scale = 1.0  # multiplies VM.start_delay sleeps (tests may shorten them)
        self.password = password
        self.auth_delay = auth_delay
        self.faults = Faults(self.log)
        # Per VDI UUID: what the last VHD import received (bytes, blocks, sectors written).
        self.imports: dict[str, dict[str, int]] = {}
        self.tasks = TaskRunner(self)
        self.storage = Storage(self)
        self.gc = Collector(self)
        self.storage.recover()  # file changes of operations whose records were never saved
        if self.gc.recover():
            self.db.save()
        self.storage.committed()
        self.guests = GuestActivity(self)
        self.address = "127.0.0.1"
        self.port = 0
        self.control_token = ""
        self.foreign_dbs: dict[str, Database] = {}  # DR sessions from VDI.open_database
        self.tls = False  # data handlers cannot hand a TLS socket's fd to the engine

    @property
    def pool_ref(self) -> str:
        refs = self.db.refs("pool")
        return refs[0] if refs else NULL_REF

    @property
    def host_ref(self) -> str:
        refs = self.db.refs("host")
        return refs[0] if refs else NULL_REF

    def save(self) -> None:
        with self.db.lock:
            wrote = self.db.save()
            if not self.db.dirty:
                self.storage.committed()
        if wrote:
            from xencr.sim.api.dr import replicate

            replicate(self)  # DR: SR metadata and metadata VDIs follow every change

    # ------------------------------------------------------------------ sessions (xapi_session.ml)

    def login(self, uname: str, pwd: str, originator: str) -> str:
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

    def check_session(self, ref: str) -> None:
        if not self.db.exists("session", ref):
            raise XapiError("SESSION_INVALID", ref)

    def logout(self, ref: str) -> None:
        with self.db.lock:
            if self.db.exists("session", ref):
                self.db.delete("session", ref)
            self.foreign_dbs.pop(ref, None)
