"""The terminal progress line: sampled from the output file's size, then a final rate line."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from xencr.cli.progress import Progress
from xencr.units import human_bytes, human_rate


def test_human_units() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(3 << 20) == "3.0 MiB"
    assert human_rate(2 << 30, 2.0) == "1.0 GiB/s"


def test_progress_samples_the_output_and_ends_with_a_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    out = tmp_path / "out.bin"
    with Progress("copy", 4 << 20, watch=str(out), enabled=True, interval=0.01) as p:
        with open(out, "wb") as f:
            f.write(bytes(4 << 20))
        # Wait (bounded) for the sampler thread to report the file's size.
        deadline = time.monotonic() + 10
        while "4.0 MiB of 4.0 MiB (100%)" not in err.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        p.done(4 << 20)
    text = err.getvalue()
    assert "copy: 4.0 MiB of 4.0 MiB (100%)" in text  # a sampled line
    last = text.rsplit("\r\033[K", 1)[-1]
    assert last.startswith("copy: 4.0 MiB in ") and last.endswith("/s\n")


def test_progress_is_silent_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with Progress("copy", 10) as p:  # StringIO is not a tty
        p.done(10)
    assert err.getvalue() == ""


def test_progress_without_a_file_prints_start_and_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    with Progress("merge", enabled=True) as p:
        p.done(1 << 20)
    assert err.getvalue().startswith("merge...")
    assert err.getvalue().endswith("/s\n")
