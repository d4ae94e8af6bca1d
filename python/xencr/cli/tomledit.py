"""Edits of the configuration file (`xencr pool add|remove`, `xencr job enable|disable`).

The file is a person's: every edit goes through tomlkit, which keeps the comments, blank lines,
key order and formatting of everything the edit does not touch (a changed value keeps its
trailing comment, in the same column). The edited text must load as a configuration before it
replaces the file, atomically and with the file's permissions: an edit never leaves a file that
no longer loads, nor half a file."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Item, Table

from xencr.config import Config, ConfigError, parse_config


def write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a crash never leaves half a config. A new file is
    0644 (no secrets inside; mkstemp's 0600 would surprise editors' users); an existing one
    keeps its mode. A symbolic link (dotfile managers) stays one: the file it points to is
    replaced. Anything but a regular file (a device, a pipe) is refused."""
    path = path.resolve() if path.is_symlink() else path
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        mode = stat.S_IMODE(st.st_mode)
    except FileNotFoundError:
        mode = 0o644
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


Change = Callable[[tomlkit.TOMLDocument], tomlkit.TOMLDocument | None]


def edit(path: Path, change: Change) -> Config:
    """Apply ``change`` to the document at ``path`` (an empty one if there is no file): it edits
    the document in place, or returns a new one. Check that the result loads, write it; the
    configuration it now holds."""
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        doc = tomlkit.parse(text)
    except (OSError, UnicodeDecodeError, TOMLKitError) as err:
        raise ConfigError(f"cannot edit: {err}", path=path) from None
    # A table removed last leaves the blank line before it: the file ends with one newline.
    new = tomlkit.dumps(change(doc) or doc).rstrip("\n") + "\n"
    config = parse_config(new, path, warn=lambda _: None)  # warnings were shown when it was read
    try:
        write_atomically(path, new)
    except OSError as err:
        raise ConfigError(f"cannot write: {err.strerror or err}", path=path) from None
    return config


def set_value(table: Table, key: str, value: Any) -> None:
    """``table[key] = value``, keeping the key's place and its trailing comment's column."""
    old = table.item(key) if key in table else None
    table[key] = value
    new = table.item(key)
    if isinstance(old, Item) and isinstance(new, Item) and new.trivia.comment:
        grown = len(new.as_string()) - len(old.as_string())
        new.trivia.comment_ws = " " * max(1, len(new.trivia.comment_ws) - grown)


def table_at(doc: tomlkit.TOMLDocument, section: str, name: str) -> Table:
    """The table ``[section.name]`` (``[pools.site-a]``); a :class:`KeyError` if there is none."""
    parent = doc.get(section)
    if parent is None or name not in parent:
        raise KeyError(f"{section}.{name}")
    found = parent[name]
    if not isinstance(found, Table):
        # An inline table (`site-a = { url = ... }`) is edited as a table the same way.
        table = tomlkit.table()
        table.update(found)
        parent[name] = table
        found = parent[name]
    assert isinstance(found, Table)
    return found


def new_table(section: str, name: str, values: dict[str, Any]) -> str:
    """The text of a new ``[section.name]`` table, quoted as TOML needs, to append to a file."""
    table = tomlkit.table()
    for k, v in values.items():
        table[k] = v
    sup = tomlkit.table(is_super_table=True)
    sup[name] = table
    doc = tomlkit.document()
    doc[section] = sup
    return tomlkit.dumps(doc)


def appended(
    doc: tomlkit.TOMLDocument, section: str, name: str, values: dict[str, Any]
) -> tomlkit.TOMLDocument:
    """``doc`` with ``[section.name]`` added at the end of the file, after whatever comes last,
    a blank line before it: as a person appending it would (tomlkit would put it inside the
    section, among the comments that introduce the next one)."""
    text = tomlkit.dumps(doc)
    if text and not text.endswith("\n"):
        text += "\n"
    if text.strip():
        text += "\n"
    return tomlkit.parse(text + new_table(section, name, values))
