"""VDI.* (``ocaml/xapi/xapi_vdi.ml``; sm ``FileSR.py``; xapi.md 2.3, 3.6, 3.9)."""

from __future__ import annotations

import os
import threading
from typing import Any

from xencr.sim.api.ctor import ctor_fields
from xencr.sim.db import Database
from xencr.sim.dispatch import Ctx, handler, require
from xencr.sim.errors import XapiError, handle_invalid
from xencr.sim.storage import engine, round_vhd_size
from xencr.sim.values import EPOCH, NULL_REF, now

# Fields a snapshot/clone copies from its source (xapi_vdi.ml snapshot_and_clone).
_COPIED = (
    "name_label",
    "name_description",
    "type",
    "sharable",
    "other_config",
    "xenstore_data",
    "on_boot",
    "allow_caching",
    "tags",
)


def attached_vbds(db: Database, vdi_ref: str) -> list[str]:
    return [r for r in db.reverse("VDI", "VBDs", vdi_ref) if db.get("VBD", r)["currently_attached"]]


def assert_not_in_use(db: Database, vdi_ref: str, op: str) -> None:
    if attached_vbds(db, vdi_ref):
        raise XapiError("VDI_IN_USE", vdi_ref, op)


def compute_allowed_operations(db: Database, ref: str, out: dict[str, Any]) -> None:
    if not out["managed"]:
        out["allowed_operations"] = []
        return
    ops = ["clone", "snapshot", "copy", "update", "set_on_boot", "enable_cbt", "disable_cbt"]
    if not attached_vbds(db, ref):
        ops += ["destroy", "resize", "forget", "data_destroy", "list_changed_blocks"]
    out["allowed_operations"] = ops


def _sr_with_pbd(ctx: Ctx, sr: str) -> None:
    require(ctx, "SR", sr)
    if not any(ctx.db.get("PBD", p)["currently_attached"] for p in ctx.db.reverse("SR", "PBDs", sr)):
        raise XapiError("SR_HAS_NO_PBDS", sr)


def new_vdi(ctx: Ctx, sr: str, fields: dict[str, Any], *, file_size: int | None) -> str:
    """Create a VDI row (and its file when ``file_size`` is given) the way FileVDI.create does."""
    import uuid as uuidlib

    vdi_uuid = fields.pop("uuid", None) or str(uuidlib.uuid4())
    if file_size is not None:
        ctx.pool.storage.create_file(sr, vdi_uuid, file_size)
    record = {
        "uuid": vdi_uuid,
        "SR": sr,
        "location": vdi_uuid,
        "managed": True,
        "missing": False,
        "snapshot_time": EPOCH,
        "on_boot": "persist",
        "storage_lock": False,
        **fields,
    }
    ref = ctx.db.create("VDI", record)
    ctx.pool.storage.refresh(sr)
    return ref


@handler("VDI.create")
def create(ctx: Ctx, record: dict[str, Any]) -> str:
    fields = ctor_fields("VDI", record)
    if fields["type"] == "cbt_metadata":
        raise XapiError("VDI_INCOMPATIBLE_TYPE", "", "cbt_metadata")
    sr = fields["SR"]
    _sr_with_pbd(ctx, sr)
    size = round_vhd_size(int(fields["virtual_size"]))
    fields["virtual_size"] = size
    return new_vdi(ctx, sr, fields, file_size=size)


def assert_managed(row: dict[str, Any], vdi: str) -> None:
    """``Xapi_vdi_helpers.assert_managed`` (base copies are unmanaged)."""
    if not row["managed"]:
        raise XapiError("VDI_NOT_MANAGED", vdi)


def destroy_vdi(ctx: Ctx, vdi: str) -> None:
    db = ctx.db
    row = require(ctx, "VDI", vdi)
    assert_managed(row, vdi)
    assert_not_in_use(db, vdi, "destroy")
    sr = row["SR"]
    ctx.pool.storage.delete_file(vdi)
    # sm VDI.delete: the CBT log is spliced out of its chain, its blocks merged into the child's
    ctx.pool.storage.cbt.delete(ctx.pool.storage.sr_dir(sr), row["uuid"])
    for vbd in db.reverse("VDI", "VBDs", vdi):
        db.delete("VBD", vbd)
    for vm, rec in db.items("VM"):
        if rec["suspend_VDI"] == vdi:
            db.update("VM", vm, suspend_VDI=NULL_REF)
    db.delete("VDI", vdi)
    ctx.pool.storage.refresh(sr)
    ctx.pool.gc.kick(sr)


@handler("VDI.destroy")
def destroy(ctx: Ctx, vdi: str) -> None:
    destroy_vdi(ctx, vdi)


def _snapshot_or_clone(ctx: Ctx, vdi: str, *, is_snapshot: bool) -> str:
    db = ctx.db
    row = require(ctx, "VDI", vdi)
    assert_managed(row, vdi)
    if row["type"] == "cbt_metadata":
        raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
    if is_snapshot and row["sharable"]:
        raise XapiError("VDI_IS_SHARABLE", vdi)
    if row["on_boot"] == "reset":
        raise XapiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
    sr = row["SR"]
    grandparent = row["sm_config"].get("vhd-parent")
    # a snapshot takes over the VDI's CBT log, a clone gets none (FileVDI._snapshot, clone)
    base_uuid, leaf_uuid, leaf_cbt = ctx.pool.storage.snapshot_files(vdi, cbt_log=is_snapshot)
    # FileVDI._snapshot: the base copy is introduced hidden, read-only and unmanaged.
    base_sm = {"vhd-parent": grandparent} if grandparent else {}
    db.create(
        "VDI",
        {
            "uuid": base_uuid,
            "SR": sr,
            "name_label": "base copy",
            "read_only": True,
            "managed": False,
            "location": base_uuid,
            "virtual_size": row["virtual_size"],
            "sm_config": base_sm,
            "type": row["type"],
            "snapshot_time": EPOCH,
            "on_boot": "persist",
        },
    )
    db.update("VDI", vdi, sm_config={**row["sm_config"], "vhd-parent": base_uuid})
    fields: dict[str, Any] = {k: _copy(row[k]) for k in _COPIED}
    fields.update(
        {
            "uuid": leaf_uuid,
            "virtual_size": row["virtual_size"],
            "read_only": False,
            "sm_config": {"vhd-parent": base_uuid},
            "is_a_snapshot": is_snapshot,
            "snapshot_of": vdi if is_snapshot else NULL_REF,
            "snapshot_time": now() if is_snapshot else EPOCH,
            "cbt_enabled": leaf_cbt,
        }
    )
    return new_vdi(ctx, sr, fields, file_size=None)


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def snapshot_vdi(ctx: Ctx, vdi: str) -> str:
    return _snapshot_or_clone(ctx, vdi, is_snapshot=True)


def clone_vdi(ctx: Ctx, vdi: str) -> str:
    return _snapshot_or_clone(ctx, vdi, is_snapshot=False)


@handler("VDI.snapshot")
def snapshot(ctx: Ctx, vdi: str, driver_params: dict[str, str]) -> str:
    return snapshot_vdi(ctx, vdi)


@handler("VDI.clone")
def clone(ctx: Ctx, vdi: str, driver_params: dict[str, str]) -> str:
    return clone_vdi(ctx, vdi)


def _pipe_stream(produce: Any, consume: Any) -> Any:
    """Run ``produce(write_fd)`` in a thread and ``consume(read_fd)`` here (bounded memory);
    returns what ``consume`` returned."""
    rfd, wfd = os.pipe()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            produce(wfd)
        except BaseException as err:
            errors.append(err)
        finally:
            os.close(wfd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        result = consume(rfd)
    finally:
        os.close(rfd)
        t.join()
    if errors:
        raise errors[0]
    return result


def written_ranges(report: Any) -> list[tuple[int, int]]:
    """The ``(offset, length)`` of every block a VHD stream carried into its target (what a CBT
    log records of an import: whole blocks, the engine reporting no finer extent)."""
    block = int(report["block_size"])
    return [(int(index) * block, block) for index, _ in report["digests"]]


def copy_vdi(ctx: Ctx, vdi: str, sr: str, base_vdi: str, into_vdi: str) -> str:
    """``VDI.copy``: a full independent copy, or only what differs from ``base_vdi`` into ``into_vdi``."""
    db = ctx.db
    storage = ctx.pool.storage
    with db.lock:
        row = require(ctx, "VDI", vdi)
        assert_managed(row, vdi)
        if row["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        if row["on_boot"] == "reset":
            raise XapiError("VDI_ON_BOOT_MODE_INCOMPATIBLE_WITH_OPERATION")
        if sr != NULL_REF:
            require(ctx, "SR", sr)
        if base_vdi != NULL_REF:
            require(ctx, "VDI", base_vdi)
        src_path, src_parents = str(storage.path(vdi)), storage.parents(vdi)
        if into_vdi != NULL_REF:
            into = require(ctx, "VDI", into_vdi)
            if into["read_only"]:
                raise XapiError("VDI_READONLY", into_vdi)
            if int(into["virtual_size"]) < int(row["virtual_size"]):
                raise XapiError("VDI_TOO_SMALL", into_vdi, row["virtual_size"])
            target = into_vdi
            storage.ensure_space(into["SR"], int(row["physical_utilisation"]))
        else:
            target_sr = sr if sr != NULL_REF else row["SR"]
            storage.ensure_space(target_sr, int(row["physical_utilisation"]))
            fields = {
                k: _copy(row[k])
                for k in (
                    "name_label",
                    "name_description",
                    "type",
                    "sharable",
                    "other_config",
                    "xenstore_data",
                    "tags",
                )
            }
            fields.update({"virtual_size": row["virtual_size"], "read_only": False, "sm_config": {}})
            target = new_vdi(ctx, target_sr, fields, file_size=int(row["virtual_size"]))
        target_row = db.get("VDI", target)
        target_dir = storage.sr_dir(target_row["SR"])
        target_path, target_parents = str(storage.path(target)), storage.parents(target)
        base_path = str(storage.path(base_vdi)) if base_vdi != NULL_REF else None
        base_parents = storage.parents(base_vdi) if base_vdi != NULL_REF else None
        # the chains just resolved must not be coalesced while the copy reads them
        ctx.pool.gc.transfer(row["SR"], +1)
        ctx.pool.gc.transfer(target_row["SR"], +1)
    eng = engine()
    try:
        with storage.file_lock(target_row["uuid"]):
            # blocks written into a VDI with CBT are logged (all of them until the copy is done)
            before = storage.cbt.begin_bulk(target_dir, target_row["uuid"])
            report = _copy_data(
                eng, src_path, src_parents, target_path, target_parents, base_path, base_parents
            )
            if before is not None:
                storage.cbt.end_bulk(target_dir, target_row["uuid"], before, written_ranges(report))
    finally:
        ctx.pool.gc.transfer(row["SR"], -1)
        ctx.pool.gc.transfer(target_row["SR"], -1)
    with db.lock:
        storage.refresh(target_row["SR"])
    return target


def _copy_data(
    eng: Any,
    src_path: str,
    src_parents: list[str],
    target_path: str,
    target_parents: list[str],
    base_path: str | None,
    base_parents: list[str] | None,
) -> Any:
    """The copy as a VHD stream applied to the target; returns the apply report."""
    if base_path is None:
        return _pipe_stream(
            lambda fd: eng.export_stream(src_path, fd, parents=src_parents),
            lambda fd: eng.apply_stream(fd, target_path, parents=target_parents),
        )
    return _pipe_stream(
        lambda fd: eng.diff_stream(base_path, src_path, fd, a_parents=base_parents, b_parents=src_parents),
        lambda fd: eng.apply_stream(fd, target_path, parents=target_parents),
    )


@handler("VDI.copy", locked=False)
def copy(ctx: Ctx, vdi: str, sr: str, base_vdi: str, into_vdi: str) -> str:
    return copy_vdi(ctx, vdi, sr, base_vdi, into_vdi)


def _resize(ctx: Ctx, vdi: str, size: int, *, online: bool) -> None:
    row = require(ctx, "VDI", vdi)
    assert_managed(row, vdi)
    if not online:  # resize_online is one of the "live" operations (xapi_vdi.ml)
        assert_not_in_use(ctx.db, vdi, "resize")
    if size < int(row["virtual_size"]):
        # sm FileSR.resize: XE_SR_ERRORCODES 79 VDISize
        raise XapiError("SR_BACKEND_FAILURE_79", "", "VDI Invalid size [opterr=shrinking not allowed]", "")
    new_size = round_vhd_size(size)
    if new_size != int(row["virtual_size"]):
        ctx.pool.storage.resize(vdi, new_size)
        ctx.db.update("VDI", vdi, virtual_size=new_size)
        ctx.pool.storage.refresh(row["SR"])


@handler("VDI.resize")
def resize(ctx: Ctx, vdi: str, size: int) -> None:
    _resize(ctx, vdi, size, online=False)


@handler("VDI.resize_online")
def resize_online(ctx: Ctx, vdi: str, size: int) -> None:
    _resize(ctx, vdi, size, online=True)


@handler("VDI.set_read_only")
def set_read_only(ctx: Ctx, vdi: str, value: bool) -> None:
    require(ctx, "VDI", vdi)
    ctx.db.update("VDI", vdi, read_only=value)


@handler("VDI.get_by_uuid")
def get_by_uuid(ctx: Ctx, uuid: str) -> str:
    return str(ctx.db.by_uuid("VDI", uuid))


def lookup(db: Database, value: str) -> str:
    """VDI by ref or UUID (HTTP handlers)."""
    if not value:
        raise handle_invalid("VDI", value)
    ref: str = db.ref_of("VDI", value)
    return ref
