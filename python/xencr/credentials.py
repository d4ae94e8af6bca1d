"""Pool passwords: where they come from, and keeping them out of every message.

A password is looked up, in order, in the pool's environment variable (``XENCR_<POOL>_PASSWORD``
unless the config names another), in its ``password_file`` (mode 0600 or stricter), in a password
embedded in the pool URL (accepted for compatibility, with a warning), and finally by a prompt when
a person is at a terminal. No exception text, log line or ``repr`` ever carries the password.
"""

from __future__ import annotations

import getpass
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from xencr.config import PoolConfig

log = logging.getLogger("xencr")


class CredentialError(Exception):
    """No usable password for a pool; the message says where one should come from."""


class Secret:
    """A string that never shows itself in ``str``, ``repr`` or f-strings: ``reveal()`` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling a secret (multiprocessing, caches) must be a decision, not an accident.
        raise TypeError("a Secret cannot be pickled")


def _default_warn(message: str) -> None:
    log.warning(message)


# Where "a password was found somewhere it should not be" goes. The CLI points it at stderr;
# library users get a `logging` warning. Replace it with `set_warning_hook`.
_warning_hook: Callable[[str], None] = _default_warn


def set_warning_hook(hook: Callable[[str], None] | None) -> Callable[[str], None]:
    """Route credential warnings to ``hook`` (``None``: back to logging); returns the previous hook."""
    global _warning_hook
    previous = _warning_hook
    _warning_hook = hook or _default_warn
    return previous


def warn(message: str) -> None:
    """Report a credential hazard (never pass the secret itself)."""
    _warning_hook(message)


def split_url_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``https://user:pass@host:443`` -> ``("https://host:443", "user", "pass")``.

    Both parts are percent-decoded. A password may also be written unencoded, with ``@ : % /`` in
    it: the user-info ends at the LAST ``@`` (XAPI URLs have no path that could hold one), and the
    user name at the FIRST ``:`` (user names have none). A ``%`` not followed by two hex digits is
    kept as is; an unencoded ``%XX`` is ambiguous and read as an escape, as RFC 3986 says.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url, None, None
    userinfo, _, hostpart = rest.rpartition("@")
    user_raw, colon, password_raw = userinfo.partition(":")
    user = unquote(user_raw) or None
    password = unquote(password_raw) if colon else None
    return f"{scheme}://{hostpart}", user, password


def password_sources(pool: PoolConfig) -> list[str]:
    """Where a password for ``pool`` would be looked for, in order, as short phrases (no secrets)."""
    sources = [f"env {pool.password_env}" + ("" if os.environ.get(pool.password_env) else " (unset)")]
    if pool.password_file is not None:
        sources.append(f"file {pool.password_file}")
    if pool.url_password is not None:
        sources.append("url (insecure)")
    sources.append("prompt")
    return sources


def password_source(pool: PoolConfig) -> str:
    """The source that would be used now without a terminal: ``env X``, ``file P``, ``url`` or ``none``."""
    if os.environ.get(pool.password_env):
        return f"env {pool.password_env}"
    if pool.password_file is not None:
        return f"file {pool.password_file}"
    if pool.url_password is not None:
        return "url"
    return "none"


def read_password_file(path: Path, pool_name: str) -> str:
    """The first line of a 0600 (or stricter) file; anything readable by others is refused."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CredentialError(f"password_file {path} of pool '{pool_name}' does not exist") from None
    except OSError as err:
        raise CredentialError(f"password_file {path} of pool '{pool_name}': {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CredentialError(f"password_file {path} of pool '{pool_name}' is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise CredentialError(
            f"password_file {path} of pool '{pool_name}' has mode {mode:04o}; "
            f"it must be 0600 or stricter (chmod 600 {path})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        # Only the reason: a decode error's text could quote bytes of the password.
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise CredentialError(f"password_file {path} of pool '{pool_name}': {reason}") from None
    # Only line terminators are stripped: spaces may be part of a password.
    password = text.split("\n", 1)[0].rstrip("\r")
    if not password:
        raise CredentialError(f"password_file {path} of pool '{pool_name}' is empty")
    return password


def resolve_password(pool: PoolConfig, *, interactive: bool) -> str:
    """The password of ``pool``: env var, then file, then URL, then a prompt if ``interactive``."""
    from_env = os.environ.get(pool.password_env)
    if from_env:
        return from_env
    if pool.password_file is not None:
        return read_password_file(Path(pool.password_file).expanduser(), pool.name)
    if pool.url_password is not None:
        return pool.url_password.reveal()
    if interactive:
        try:
            entered = getpass.getpass(f"Password for {pool.username} on pool '{pool.name}' ({pool.url}): ")
        except EOFError:
            entered = ""
        if entered:
            return entered
        raise CredentialError(f"no password entered for pool '{pool.name}'")
    raise CredentialError(f"no password for pool '{pool.name}': set {pool.password_env} or password_file")
