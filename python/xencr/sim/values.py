"""Value types whose wire form differs from their Python type, and XAPI's time format."""

from __future__ import annotations

import time

EPOCH = "19700101T00:00:00Z"
NULL_REF = "OpaqueRef:NULL"


class XDateTime(str):
    """A datetime field: stored as XAPI's compact string, emitted as ``dateTime.iso8601``."""


class I4(int):
    """An int that XAPI emits typed (``<i4>``), e.g. event.from's ``valid_ref_counts``."""


def now() -> str:
    """Current time as XAPI prints it (``ocaml/libs/clock/date.ml`` ``to_rfc3339``: no hyphens, Z)."""
    return time.strftime("%Y%m%dT%H:%M:%SZ", time.gmtime())
