"""pool.* and host.*: what the SDK's ``API_version`` and clients' discovery need, and the calls of
a pool with several hosts: each host's certificate, enabling/disabling a host, moving the master.

A call about a host that the master forwards to it (``message_forwarding.ml`` ``do_op_on``) fails
``HOST_OFFLINE [host]`` when that host is not live; the master itself always is.
"""

from __future__ import annotations

from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError


@handler("host.get_API_version_major")
def api_version_major(ctx: Ctx, host: str) -> int:
    return int(require(ctx, "host", host)["API_version_major"])


@handler("host.get_API_version_minor")
def api_version_minor(ctx: Ctx, host: str) -> int:
    return int(require(ctx, "host", host)["API_version_minor"])


def _check_live(ctx: Ctx, host: str) -> None:
    """``message_forwarding.ml`` ``check_live``: the call is forwarded to ``host``."""
    require(ctx, "host", host)
    if host != ctx.pool.master_ref and not ctx.pool.host_is_live(host):
        raise XapiError("HOST_OFFLINE", host)


@handler("host.get_server_certificate")
def get_server_certificate(ctx: Ctx, host: str) -> str:
    """The PEM of the certificate ``host`` presents on its TLS port (``xapi_host.ml``,
    ``certificates.ml`` ``get_server_certificate``)."""
    _check_live(ctx, host)
    return ctx.pool.certificate(host).read_text()


@handler("host.disable")
def disable(ctx: Ctx, host: str) -> None:
    """New VMs are not started there any more (``xapi_host.ml`` disable)."""
    _check_live(ctx, host)
    ctx.db.update("host", host, enabled=False)


@handler("host.enable")
def enable(ctx: Ctx, host: str) -> None:
    _check_live(ctx, host)
    ctx.db.update("host", host, enabled=True)


@handler("pool.designate_new_master")
def designate_new_master(ctx: Ctx, host: str) -> None:
    """Make ``host`` the master (``xapi_pool.ml`` designate_new_master, ``xapi_pool_transition.ml``).

    Designating the master does nothing; a host that is not live fails ``HOST_OFFLINE``; with HA
    on, ``HA_IS_ENABLED``. Both hosts restart xapi, so every session is lost (sessions are
    ``PersistNothing``): the next login on the old master answers ``HOST_IS_SLAVE [new address]``.
    """
    pool = ctx.pool
    require(ctx, "host", host)
    if host == pool.master_ref:
        return
    _check_live(ctx, host)
    if ctx.db.get("pool", pool.pool_ref)["ha_enabled"]:
        raise XapiError("HA_IS_ENABLED")
    old = ctx.db.get("host", pool.master_ref)["name_label"]
    ctx.db.update("pool", pool.pool_ref, master=host)
    pool.log.warning("master moved from %s to %s", old, ctx.db.get("host", host)["name_label"])
    pool.drop_sessions()
