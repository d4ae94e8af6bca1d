"""session.* (``ocaml/xapi/xapi_session.ml``; xapi.md 1.6)."""

from __future__ import annotations

from xencr.sim.dispatch import Ctx, handler


@handler("session.login_with_password", locked=False)
def login_with_password(ctx: Ctx, uname: str, pwd: str, version: str, originator: str) -> str:
    return ctx.pool.login(uname, pwd, originator, ctx.host or ctx.pool.master_ref)


@handler("session.logout", locked=False)
def logout(ctx: Ctx) -> None:
    assert ctx.session is not None
    ctx.pool.logout(ctx.session)


@handler("session.local_logout", locked=False)
def local_logout(ctx: Ctx) -> None:
    assert ctx.session is not None
    ctx.pool.logout(ctx.session)
