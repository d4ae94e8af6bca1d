"""VDI.get_nbd_info (``ocaml/xapi/xapi_vdi.ml`` ``_get_nbd_info``; ``certificates.ml``
``hostnames_of_pem_cert``; ocaml-x509 ``Certificate.hostnames``).

One record per IP of each host that has the VDI's SR plugged and an attached PIF on a network
with an NBD purpose: ``exportname`` ``/<vdi uuid>?session_id=<the caller's session>``, the IP,
the port, the host's certificate (PEM) and a host name from it. The same for ``nbd`` and
``insecure_nbd``: xapi always returns the certificate and subject.
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path
from typing import Any

from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError
from xencr.sim.nbd import NBD_PURPOSES, STANDARD_PORT


@cache
def _hostnames(cert: Path, mtime: float) -> tuple[str, ...]:
    """ocaml-x509 ``hostnames``: the DNS names of the subjectAltName extension when it has any,
    else the subject's common name (``mtime`` keys the cache)."""
    out = subprocess.run(
        [
            "openssl",
            "x509",
            "-in",
            str(cert),
            "-noout",
            "-ext",
            "subjectAltName",
            "-subject",
            "-nameopt",
            "multiline",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    dns = [
        part.strip()[4:]
        for line in out.splitlines()
        for part in line.split(",")
        if part.strip().startswith("DNS:")
    ]
    if dns:
        return tuple(dns)
    common = [
        line.split("=", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("commonName")
    ]
    return tuple(common)


def subject_of(cert: Path, hostname: str) -> str:
    """The first host name of the certificate (``Host_set.min_elt``; no wildcard names are
    issued here), else the host's ``hostname`` field (xapi's fallback)."""
    names = _hostnames(cert, cert.stat().st_mtime)
    return min(names) if names else hostname


@handler("VDI.get_nbd_info")
def get_nbd_info(ctx: Ctx, vdi: str) -> list[dict[str, Any]]:
    db = ctx.db
    row = require(ctx, "VDI", vdi)
    if row["type"] == "cbt_metadata":
        raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
    nbd_networks = {ref for ref, net in db.items("network") if any(p in NBD_PURPOSES for p in net["purpose"])}
    exportname = f"/{row['uuid']}?session_id={ctx.session}"
    pool = ctx.pool
    records: list[dict[str, Any]] = []
    hosts = [
        db.get("PBD", pbd)["host"]
        for pbd in db.reverse("SR", "PBDs", row["SR"])
        if db.get("PBD", pbd)["currently_attached"]
    ]
    for host in hosts:
        ips: list[str] = []
        for pif in db.reverse("host", "PIFs", host):
            pif_row = db.get("PIF", pif)
            if not pif_row["currently_attached"] or pif_row["network"] not in nbd_networks:
                continue
            v6 = [ip for ip in pif_row["IPv6"] if ip]
            ips += ([pif_row["IP"]] if pif_row["IP"] else []) + v6
        if not ips:
            continue
        cert = pool.certificate(host)
        port = pool.nbd.port(pool.index, host) if pool.nbd is not None else None
        if port is None:  # not served now: where it served last
            port = int(db.get("host", host).get("_nbd_port") or STANDARD_PORT)
        template = {
            "exportname": exportname,
            "port": port,
            "cert": cert.read_text(),
            "subject": subject_of(cert, db.get("host", host)["hostname"]),
        }
        records += [{**template, "address": ip} for ip in ips]
    return records
