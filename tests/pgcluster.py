"""A throwaway PostgreSQL cluster for the tests (Debian's postgresql package): ``initdb`` in a
temporary directory, the server on 127.0.0.1 at a free port (its unix socket in that directory,
fsync off: nothing here must survive), a user with a password and a database it owns (and it may
create more: one per test module).

As root (CI, this machine), the server runs as the ``postgres`` user the package creates:
PostgreSQL refuses to run as root.

scripts/test.sh uses it from the shell::

    eval "$(python tests/pgcluster.py start DIR)"   # exports XENCR_TEST_PG, XENCR_TEST_PG_PASSWORD
    python tests/pgcluster.py stop DIR

and tests/conftest.py starts one itself when XENCR_TEST_PG is unset (pytest run by hand).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

USER = "xencr_test"
DATABASE = "xencr_test"


@dataclass(frozen=True)
class Cluster:
    url: str  # postgresql://USER@127.0.0.1:PORT/DATABASE (no password)
    password: str


def bindir() -> Path | None:
    """Where initdb and pg_ctl are: $XENCR_PG_BINDIR, the newest /usr/lib/postgresql/N/bin, or PATH."""
    given = os.environ.get("XENCR_PG_BINDIR")
    if given:
        return Path(given)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(argv: list[str], *, owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *argv] if owner else argv


def start(root: Path) -> Cluster:
    """Start a cluster in ``root`` (an empty directory); raises RuntimeError with the server's
    log when it does not come up."""
    bins = bindir()
    if bins is None:
        raise RuntimeError("PostgreSQL not found: apt-get install postgresql (or set XENCR_PG_BINDIR)")
    owner = None
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and no 'postgres' user to run the server as") from None
        owner = "postgres"
        os.chown(root, entry.pw_uid, entry.pw_gid)
        root.chmod(0o700)
    data, log = root / "data", root / "server.log"
    password = secrets.token_urlsafe(18)
    run = {"check": True, "capture_output": True, "text": True, "stdin": subprocess.DEVNULL}
    subprocess.run(
        _as_server_user(
            [
                str(bins / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            owner=owner,
        ),
        **run,  # type: ignore[call-overload]
    )
    # Loopback TCP wants the password (scram); the socket in ``root`` stays trusted for setup.
    (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    port = _free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    try:
        subprocess.run(
            _as_server_user(
                [
                    str(bins / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                owner=owner,
            ),
            **run,  # type: ignore[call-overload]
        )
    except subprocess.CalledProcessError:
        text = log.read_text() if log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start:\n{text[-3000:]}") from None
    psql = bins / "psql" if (bins / "psql").exists() else Path(shutil.which("psql") or "psql")
    setup = [
        f"CREATE ROLE {USER} LOGIN CREATEDB PASSWORD '{password}'",
        f"CREATE DATABASE {DATABASE} OWNER {USER}",
    ]
    try:
        subprocess.run(
            [
                *(str(psql), "-h", str(root), "-p", str(port), "-U", "postgres", "-d", "postgres", "-q"),
                *("-v", "ON_ERROR_STOP=1", *(a for statement in setup for a in ("-c", statement))),
            ],
            **run,  # type: ignore[call-overload]
        )
    except BaseException:
        stop(root)
        raise
    (root / "port").write_text(str(port))
    return Cluster(f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}", password)


def stop(root: Path) -> None:
    """Stop the cluster in ``root`` (fast shutdown), if one runs there."""
    bins = bindir()
    data = root / "data"
    if bins is None or not (data / "postmaster.pid").exists():
        return
    owner = "postgres" if os.geteuid() == 0 else None
    subprocess.run(
        _as_server_user([str(bins / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], owner=owner),
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: pgcluster.py start|stop DIR", file=sys.stderr)
        return 2
    root = Path(argv[1])
    if argv[0] == "stop":
        stop(root)
        return 0
    try:
        cluster = start(root)
    except (RuntimeError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or ""
        print(f"pgcluster: {err}\n{detail}", file=sys.stderr)
        return 1
    print(f"export XENCR_TEST_PG={shlex.quote(cluster.url)}")
    print(f"export XENCR_TEST_PG_PASSWORD={shlex.quote(cluster.password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
