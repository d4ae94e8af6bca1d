"""Sessions on the DR side: the pools holding the targets of the jobs, each logged in once.
A pool that cannot be reached is recorded with its one-line reason, never fatal: with the
primary site lost, what remains must still be usable. The source pools are not contacted."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from xencr.config import Config
from xencr.credentials import CredentialError
from xencr.replication.jobs import connect
from xencr.xapi.errors import PoolUnreachable, XapiError
from xencr.xapi.session import XapiSession


@dataclass
class DrSessions:
    sessions: dict[str, XapiSession] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)  # pool -> why


@contextlib.contextmanager
def dr_sessions(config: Config, pools: Iterable[str], *, interactive: bool) -> Iterator[DrSessions]:
    """A session on each named pool that answers; logged out on exit."""
    out = DrSessions()
    try:
        for name in dict.fromkeys(pools):
            try:
                out.sessions[name] = connect(
                    config.pool(name), interactive=interactive, state_path=config.state.local_path
                )
            except (PoolUnreachable, XapiError, CredentialError, OSError) as err:
                out.unreachable[name] = str(err) or type(err).__name__
        yield out
    finally:
        for s in out.sessions.values():
            s.logout()
