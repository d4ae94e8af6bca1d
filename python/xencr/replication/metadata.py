"""The `other_config` keys xencr writes on source snapshots, replicas and their disks, and the
exact strings users and Xen Orchestra see."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

PREFIX = "xencr:"
JOB = "xencr:job"
SCHEDULE = "xencr:schedule"
VM = "xencr:vm"  # UUID of the *source VM* (not of its snapshot)
SR = "xencr:sr"  # target SR UUID
COPY_OF = "xencr:copy_of"  # source snapshot VM UUID (on replicas) / snapshot VDI UUID (on disks)
SNAPSHOT_TIME = "xencr:snapshot_time"  # `precise()` form
COMPLETE = "xencr:complete"  # "false" from creation, "true" at the commit point
ROLE = "xencr:role"  # "source-snapshot", "replica", "replica-disk", "commit-snapshot"
BYTES = "xencr:bytes"
DIGEST = "xencr:digest"  # digest of the per-block digest list recorded at transfer
BLOCKS = "xencr:blocks"  # the block indices that transfer carried, as ranges ("0-3,7")


def digest_of_list(algorithm: str, digests: list[tuple[int, str]]) -> str:
    """One value for a transfer's per-block digests, in the form kept in `DIGEST`."""
    text = "".join(f"{b}:{h};" for b, h in sorted(digests))
    return f"{algorithm}-list:{hashlib.sha256(text.encode()).hexdigest()}"


def ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 3, 7]`` -> ``"0-3,7"``."""
    out: list[str] = []
    for i in sorted(indices):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        elif out and "-" not in out[-1] and int(out[-1]) == i - 1:
            out[-1] = f"{out[-1]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def parse_ranges(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


# Ownership (see `ownership`): which attempt made an object, whether it is still the object xencr
# made (a copy carries another's `self`), its seal at the commit, and the verdicts written on it.
ATTEMPT = "xencr:attempt"
SELF = "xencr:self"  # the object's own UUID, written right after creation
SEAL = "xencr:seal"  # on a restore point: `ownership.seal_of` at the commit
CLONING = "xencr:cloning"  # on a base while an attempt clones it: the clone inherits the attempt
DETACHED = "xencr:detached"  # "<time> <why>": left alone from now on
EXPIRING = "xencr:expiring"  # retention began destroying this restore point

FULL_COUNT = "xencr:chain"  # runs since the last full, per disk (full_interval)
# On a source snapshot that `xencr seed export` wrote to files: its time (`precise()`). Until a
# replica of it exists the job refuses to send a full over the network, and the snapshot is kept.
SEED = "xencr:seed"
# On a source snapshot whose disks' data was destroyed (purge_snapshot_data): its disks, which
# then have no VBD ("<userdevice>=<VDI uuid>;..."), written before the first VBD goes.
PURGED = "xencr:purged"


def purged_disks(other_config: dict[str, str]) -> dict[str, str]:
    """userdevice -> VDI UUID of a purged snapshot's disks (``PURGED``; empty when none)."""
    out = {}
    for item in other_config.get(PURGED, "").split(";"):
        device, eq, uuid = item.partition("=")
        if eq and device and uuid:
            out[device] = uuid
    return out


# Xen Orchestra's keys (read to continue an XO chain; see xo-compat.md 1.1).
XO_JOB = "xo:backup:job"
XO_SCHEDULE = "xo:backup:schedule"
XO_VM = "xo:backup:vm"
XO_SR = "xo:backup:sr"
XO_DATETIME = "xo:backup:datetime"
XO_EXPORTED = "xo:backup:exported"
XO_COPY_OF = "xo:copy_of"
XO_CHAIN_LENGTH = "xo:backup:deltaChainLength"
XO_CONTENT_KEY = "xo:backup:contentKey"
XO_QCOW2_FIX = "xo:backup:includeNonNbdQcow2Fix"
XO_BASE_DELTA = "xo:base_delta:"  # + target SR UUID, on the source VM (legacy CR, before 2021)


START_BLOCKED = "Start operation for this vm is blocked, clone it if you want to use it."
PROTECTED_OPS = ("start", "start_on")
TAGS = ("xencr", "Continuous Replication")
NOBAK = "[NOBAK]"


def stamp(when: datetime) -> str:
    """UTC `%Y%m%dT%H:%M:%SZ`, the form XO writes too."""
    return when.astimezone(UTC).strftime("%Y%m%dT%H:%M:%SZ")


def precise(when: datetime) -> str:
    """ISO 8601 UTC to the microsecond: sorts restore points made within the same second."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_stamp(text: str) -> datetime | None:
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y%m%dT%H:%M:%SZ", "%Y%m%dT%H%M%SZ"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


def strip_ours(other_config: dict[str, str]) -> dict[str, str]:
    """A source record's other_config without replication bookkeeping (ours and XO's)."""
    return {
        k: v
        for k, v in other_config.items()
        if not k.startswith(PREFIX)
        and not k.startswith("xo:backup")
        and k != XO_COPY_OF
        and not k.startswith("xo:base_delta")
    }
