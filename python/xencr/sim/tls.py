"""``--tls``: self-signed certificates generated once in the state directory (``tls/``), so clients
can test certificate verification and fingerprint pinning against the simulator.

The only host of a one-host pool presents ``tls/cert.pem`` (shared by such pools, as always);
each host of a pool with several hosts has its own, ``tls/pool<i>-host<j>/cert.pem``, as each
host of a real pool has (``host.get_server_certificate``)."""

from __future__ import annotations

import hashlib
import os
import ssl
import subprocess
from pathlib import Path

CERT = "cert.pem"
KEY = "key.pem"


def ensure_certificate(root: Path, hostname: str = "127.0.0.1") -> tuple[Path, Path]:
    """(cert, key) paths; generated with the openssl CLI on first use (P-256, 10 years, SAN IP+DNS)."""
    return _ensure(root / "tls", hostname, "xencr-sim")


def host_certificate(
    root: Path, pool: int, host: int, *, own: bool, hostname: str = "127.0.0.1"
) -> tuple[Path, Path]:
    """(cert, key) of host ``host`` of pool ``pool``: its own when ``own`` (a pool of several
    hosts), else the shared one."""
    if not own:
        return ensure_certificate(root, hostname)
    (root / "tls").mkdir(mode=0o700, exist_ok=True)
    return _ensure(root / "tls" / f"pool{pool}-host{host}", hostname, f"sim-host-{pool}-{host}")


def all_certificates(root: Path) -> list[Path]:
    """Every certificate the state's hosts present (what a control client trusts)."""
    return sorted((root / "tls").glob(f"**/{CERT}"))


def _ensure(directory: Path, hostname: str, common_name: str) -> tuple[Path, Path]:
    directory.mkdir(mode=0o700, exist_ok=True)
    cert, key = directory / CERT, directory / KEY
    if not (cert.exists() and key.exists()):
        san = (
            f"subjectAltName=IP:{hostname},IP:127.0.0.1,DNS:localhost"
            if hostname != "127.0.0.1"
            else "subjectAltName=IP:127.0.0.1,DNS:localhost"
        )
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "3650",
                "-subj",
                f"/CN={common_name}",
                "-addext",
                san,
            ],
            check=True,
            capture_output=True,
        )
        os.chmod(key, 0o600)
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def fingerprint(cert: Path) -> str:
    """SHA-256 fingerprint of the certificate (DER), colon-separated upper-case hex."""
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
