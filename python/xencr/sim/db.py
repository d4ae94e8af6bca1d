"""The object database of one simulated pool: records, refs, change tracking for events, persistence.

Modelled on xapi's database (``ocaml/database/db_cache_types.ml``): every row carries the generation
at which it was created and last modified, deletions are remembered with their generation, and
``event.from`` reports each changed object once with its current record. Reverse set fields
(``VM.VBDs``...) are computed from the forward refs on read, so they can never disagree.
"""

from __future__ import annotations

import json
import os
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xencr.sim import schema
from xencr.sim.errors import handle_invalid, uuid_invalid
from xencr.sim.values import NULL_REF

# Sessions and tasks are not persisted: a restart invalidates sessions (xapi.md 1.6) and forgets tasks.
TRANSIENT_CLASSES = frozenset({"session", "task"})

Record = dict[str, Any]
Computer = Callable[["Database", str, Record], None]


@dataclass
class Deletion:
    generation: int
    created: int
    cls: str
    ref: str


def write_json(path: Path, doc: Any) -> None:
    """Atomically replace ``path`` with ``doc`` (tmp file, fsync, rename). The tmp name is the
    writer's own: two pools attached to one LUN may rewrite its ``sr.json`` at the same time."""
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_ref() -> str:
    return f"OpaqueRef:{uuidlib.uuid4()}"


class Database:
    """All rows of one pool. Callers hold ``lock`` around any read-modify-write sequence."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.tables: dict[str, dict[str, Record]] = {c: {} for c in schema.class_names()}
        self.stats: dict[tuple[str, str], tuple[int, int]] = {}  # (cls, ref) -> (created, modified)
        self.deletions: list[Deletion] = []
        self.generation = 0
        self.dirty = False
        self.computers: dict[str, list[Computer]] = {}
        if path is not None and path.exists():
            self._load(path)

    # ---------------------------------------------------------------- change tracking

    def _bump(self) -> int:
        self.generation += 1
        self.dirty = True
        self.changed.notify_all()
        return self.generation

    def _touch(self, cls: str, ref: str) -> None:
        if ref in self.tables[cls]:
            created, _ = self.stats.get((cls, ref), (0, 0))
            self.stats[(cls, ref)] = (created, self._bump())

    def _touch_links(self, cls: str, record: Record) -> None:
        """Objects whose reverse set fields change when ``record``'s forward refs change."""
        for (target_cls, _), (src_cls, src_field) in schema.REVERSE_LINKS.items():
            if src_cls == cls:
                target = record.get(src_field, NULL_REF)
                if isinstance(target, str) and target != NULL_REF:
                    self._touch(target_cls, target)

    # ---------------------------------------------------------------- rows

    def create(self, cls: str, fields: Record, ref: str | None = None) -> str:
        with self.lock:
            record = schema.default_record(cls)
            record.update(fields)
            if "uuid" in record and not record["uuid"]:
                record["uuid"] = str(uuidlib.uuid4())
            ref = ref or new_ref()
            self.tables[cls][ref] = record
            generation = self._bump()
            self.stats[(cls, ref)] = (generation, generation)
            self._touch_links(cls, record)
            return ref

    def exists(self, cls: str, ref: str) -> bool:
        return ref in self.tables[cls]

    def get(self, cls: str, ref: str) -> Record:
        """The stored row (mutable; use ``update`` to change it)."""
        try:
            return self.tables[cls][ref]
        except KeyError:
            raise handle_invalid(cls, ref) from None

    def update(self, cls: str, ref: str, **fields: Any) -> None:
        with self.lock:
            record = self.get(cls, ref)
            self._touch_links(cls, record)
            record.update(fields)
            self._touch(cls, ref)
            self._touch_links(cls, record)

    def touch(self, cls: str, ref: str) -> None:
        with self.lock:
            self._touch(cls, ref)

    def delete(self, cls: str, ref: str) -> None:
        with self.lock:
            record = self.get(cls, ref)
            del self.tables[cls][ref]
            created, _ = self.stats.pop((cls, ref), (0, 0))
            self.deletions.append(Deletion(self._bump(), created, cls, ref))
            self._touch_links(cls, record)

    def refs(self, cls: str) -> list[str]:
        return list(self.tables[cls])

    def items(self, cls: str) -> Iterable[tuple[str, Record]]:
        return list(self.tables[cls].items())

    def find(self, cls: str, **criteria: Any) -> list[str]:
        return [r for r, rec in self.tables[cls].items() if all(rec.get(k) == v for k, v in criteria.items())]

    def by_uuid(self, cls: str, uuid: str) -> str:
        for ref, rec in self.tables[cls].items():
            if rec.get("uuid") == uuid:
                return ref
        raise uuid_invalid(cls, uuid)

    def ref_of(self, cls: str, value: str) -> str:
        """A ref as is, else a UUID looked up (the HTTP handlers' ``vdi_of_req`` rule)."""
        if value in self.tables[cls]:
            return value
        return self.by_uuid(cls, value)

    def reverse(self, cls: str, field: str, ref: str) -> list[str]:
        src_cls, src_field = schema.REVERSE_LINKS[(cls, field)]
        return [r for r, rec in self.tables[src_cls].items() if rec.get(src_field) == ref]

    def record(self, cls: str, ref: str) -> Record:
        """The full public record (every datamodel field, reverse links and computed fields filled)."""
        with self.lock:
            row = self.get(cls, ref)
            out = {k: v for k, v in row.items() if not k.startswith("_")}
            for (target_cls, field), _ in schema.REVERSE_LINKS.items():
                if target_cls == cls and field in out:
                    out[field] = self.reverse(cls, field, ref)
            for compute in self.computers.get(cls, []):
                compute(self, ref, out)
            fields = schema.cls(cls).fields
            return {k: schema.marshal_field(fields[k].type, v) if k in fields else v for k, v in out.items()}

    # ---------------------------------------------------------------- events

    def changes_since(self, generation: int, wanted: Callable[[str, str], bool]) -> list[Record]:
        """One event per object changed after ``generation`` (``xapi_event.ml`` collect_events):
        an object created since is an ``add`` whose id is its creation generation, else a ``mod``
        with its last modification; deletions of objects that existed at ``generation`` are
        ``del`` without a snapshot. Order as xapi builds it: adds, then mods, then dels."""
        adds: list[Record] = []
        mods: list[Record] = []
        dels: list[Record] = []
        for (cls, ref), (created, modified) in list(self.stats.items()):
            if modified > generation and wanted(cls, ref):
                is_add = created > generation
                (adds if is_add else mods).append(
                    {
                        "id": str(created if is_add else modified),
                        "timestamp": "0.0",
                        "class": cls.lower(),
                        "operation": "add" if is_add else "mod",
                        "ref": ref,
                        "snapshot": self.record(cls, ref),
                    }
                )
        for d in self.deletions:
            if d.generation > generation and d.created <= generation and wanted(d.cls, d.ref):
                dels.append(
                    {
                        "id": str(d.generation),
                        "timestamp": "0.0",
                        "class": d.cls.lower(),
                        "operation": "del",
                        "ref": d.ref,
                    }
                )
        return [e for group in (adds, mods, dels) for e in sorted(group, key=lambda e: int(e["id"]))]

    # ---------------------------------------------------------------- persistence

    def snapshot_doc(self) -> dict[str, Any]:
        """The persistent tables as one JSON-able document (also what DR metadata VDIs hold)."""
        with self.lock:
            return {
                "generation": self.generation,
                "tables": {c: t for c, t in self.tables.items() if c not in TRANSIENT_CLASSES and t},
            }

    def save(self) -> bool:
        """Write the persistent tables atomically (tmp file + rename) if anything changed."""
        with self.lock:
            if self.path is None or not self.dirty:
                return False
            write_json(self.path, self.snapshot_doc())
            self.dirty = False
            return True

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Database:
        """An in-memory database holding ``doc`` (a foreign pool's, opened for DR)."""
        db = cls(None)
        db.generation = int(doc["generation"])
        for name, table in doc["tables"].items():
            db.tables[name] = table
            for ref in table:
                db.stats[(name, ref)] = (0, 0)
        return db

    def _load(self, path: Path) -> None:
        doc = json.loads(path.read_text())
        self.generation = int(doc["generation"])
        for cls, table in doc["tables"].items():
            self.tables[cls] = table
            for ref in table:
                self.stats[(cls, ref)] = (0, 0)
