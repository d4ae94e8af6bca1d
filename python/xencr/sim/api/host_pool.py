"""pool.* and host.*: read-mostly; what the SDK's ``API_version`` and clients' discovery need."""

from __future__ import annotations

from xencr.sim.dispatch import Ctx, handler, require


@handler("host.get_API_version_major")
def api_version_major(ctx: Ctx, host: str) -> int:
    return int(require(ctx, "host", host)["API_version_major"])


@handler("host.get_API_version_minor")
def api_version_minor(ctx: Ctx, host: str) -> int:
    return int(require(ctx, "host", host)["API_version_minor"])
