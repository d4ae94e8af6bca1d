"""Fixtures of the status page tests: no real config, data dir or password of the caller, and
pools that do not answer fail at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.delenv("XENCR_CONFIG", raising=False)
    for name in list(os.environ):
        if name.startswith("XENCR_") and name.endswith("_PASSWORD"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def unreachable_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool nobody answers is retried with backoff for seconds: once is enough to know here."""
    from functools import partialmethod

    from xencr.xapi.session import XapiSession

    monkeypatch.setattr(XapiSession, "__init__", partialmethod(XapiSession.__init__, retries=0))
