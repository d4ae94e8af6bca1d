"""Passwords: env, 0600 file, URL, prompt; refused sources; never shown anywhere."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from coretest import MINIMAL, write

from xencr import credentials
from xencr.config import PoolConfig, load_config
from xencr.credentials import (
    CredentialError,
    Secret,
    password_source,
    password_sources,
    resolve_password,
    split_url_credentials,
)

PASSWORD = "p@ss:w/rd%x"  # every character that breaks naive URL parsing


def pool(**kw: object) -> PoolConfig:
    return PoolConfig(name="site-a", url="https://a.example", **kw)  # type: ignore[arg-type]


def secret_file(tmp_path: Path, text: str, mode: int) -> Path:
    path = tmp_path / "pw"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_env_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XENCR_SITE_A_PASSWORD", "from-env")
    f = secret_file(tmp_path, "from-file\n", 0o600)
    assert resolve_password(pool(password_file=str(f)), interactive=False) == "from-env"
    assert password_source(pool(password_file=str(f))) == "env XENCR_SITE_A_PASSWORD"


def test_custom_env_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_PW", "custom")
    assert resolve_password(pool(password_env="MY_PW"), interactive=False) == "custom"


def test_file_0600_and_stricter(tmp_path: Path) -> None:
    for mode in (0o600, 0o400):
        f = secret_file(tmp_path, f"{PASSWORD} with spaces \r\nsecond line ignored\n", mode)
        assert resolve_password(pool(password_file=str(f)), interactive=False) == f"{PASSWORD} with spaces "
    assert password_source(pool(password_file=str(f))) == f"file {f}"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    f = secret_file(tmp_path, PASSWORD, mode)
    with pytest.raises(CredentialError) as info:
        resolve_password(pool(password_file=str(f)), interactive=False)
    assert str(info.value) == (
        f"password_file {f} of pool 'site-a' has mode {mode:04o}; it must be 0600 or stricter (chmod 600 {f})"
    )
    assert PASSWORD not in str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="does not exist"):
        resolve_password(pool(password_file=str(tmp_path / "nope")), interactive=False)
    f = secret_file(tmp_path, "\n", 0o600)
    with pytest.raises(CredentialError, match="is empty"):
        resolve_password(pool(password_file=str(f)), interactive=False)


def test_nothing_and_not_interactive_says_what_to_set() -> None:
    with pytest.raises(CredentialError) as info:
        resolve_password(pool(), interactive=False)
    assert str(info.value) == "no password for pool 'site-a': set XENCR_SITE_A_PASSWORD or password_file"
    assert password_source(pool()) == "none"
    assert password_sources(pool()) == ["env XENCR_SITE_A_PASSWORD (unset)", "prompt"]


def test_prompt_when_interactive(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str) -> str:
        prompts.append(prompt)
        return "typed"

    monkeypatch.setattr(credentials.getpass, "getpass", fake_getpass)
    assert resolve_password(pool(), interactive=True) == "typed"
    assert prompts == ["Password for root on pool 'site-a' (https://a.example): "]
    monkeypatch.setattr(credentials.getpass, "getpass", lambda prompt: "")
    with pytest.raises(CredentialError, match="no password entered for pool 'site-a'"):
        resolve_password(pool(), interactive=True)


@pytest.mark.parametrize(
    ("url", "user", "password"),
    [
        ("https://root:p%40ss%3Aw%2Frd%25x@host.example:443", "root", PASSWORD),
        (f"https://root:{PASSWORD}@host.example:443", "root", PASSWORD),
        ("https://r%40ot:p%40ss@host.example:443", "r@ot", "p@ss"),
        ("https://root:@host.example:443", "root", ""),
        ("https://admin@host.example:443", "admin", None),
        ("https://host.example:443", None, None),
        ("https://root:a@b@[fe80::1]:443", "root", "a@b"),
    ],
)
def test_split_url_credentials(url: str, user: str | None, password: str | None) -> None:
    clean, got_user, got_password = split_url_credentials(url)
    assert (got_user, got_password) == (user, password)
    assert clean in ("https://host.example:443", "https://[fe80::1]:443")


def test_url_password_is_used_after_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL.replace('url = "https://a.example"', f'url = "https://root:{PASSWORD}@a.example"')
    cfg = load_config(write(tmp_path, text), warn=lambda m: None)
    p = cfg.pools["site-a"]
    assert p.url == "https://a.example"
    assert resolve_password(p, interactive=False) == PASSWORD
    assert password_source(p) == "url"
    monkeypatch.setenv("XENCR_SITE_A_PASSWORD", "env wins")
    assert resolve_password(p, interactive=False) == "env wins"


def test_url_password_warning_goes_to_the_hook_or_logging(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = MINIMAL.replace('url = "https://a.example"', f'url = "https://root:{PASSWORD}@a.example"')
    path = write(tmp_path, text)
    with caplog.at_level(logging.WARNING, logger="xencr"):
        load_config(path)
    assert "carries a password" in caplog.text and PASSWORD not in caplog.text
    seen: list[str] = []
    previous = credentials.set_warning_hook(seen.append)
    try:
        load_config(path)
    finally:
        credentials.set_warning_hook(previous)
    assert len(seen) == 1 and "carries a password" in seen[0]


def test_password_never_shown(tmp_path: Path) -> None:
    s = Secret(PASSWORD)
    assert s.reveal() == PASSWORD
    for shown in (str(s), repr(s), f"{s}", f"{s!r}", f"{s:>40}", str([s]), str({"k": s})):
        assert PASSWORD not in shown
    with pytest.raises(TypeError):
        __import__("pickle").dumps(s)
    p = pool(url_password=s)
    assert "url_password=<hidden>" in repr(p) and PASSWORD not in repr(p) and PASSWORD not in str(p)
    text = MINIMAL.replace('url = "https://a.example"', f'url = "https://root:{PASSWORD}@a.example"')
    cfg = load_config(write(tmp_path, text), warn=lambda m: None)
    assert PASSWORD not in repr(cfg) and PASSWORD not in str(cfg.pools)
    # Errors about a pool whose URL held a password do not quote it either.
    bad = text.replace(
        '[pools.site-b]\nurl = "https://b.example"', f'[pools.site-b]\nurl = "ftp://u:{PASSWORD}@b"'
    )
    with pytest.raises(Exception) as info:
        load_config(write(tmp_path, bad), warn=lambda m: None)
    assert "pools.site-b.url" in str(info.value) and PASSWORD not in str(info.value)
    no_scheme = text.replace(
        '[pools.site-b]\nurl = "https://b.example"', f'[pools.site-b]\nurl = "u:{PASSWORD}@b"'
    )
    with pytest.raises(Exception) as info:
        load_config(write(tmp_path, no_scheme), warn=lambda m: None)
    assert str(info.value).endswith("pools.site-b.url: invalid URL: expected https://host[:port]")
    assert PASSWORD not in str(info.value) and "p@ss" not in str(info.value)
