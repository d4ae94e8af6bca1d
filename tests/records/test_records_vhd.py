"""A VHD file cut short says where it ends and how long it must be; a missing one says so,
naming it; whichever `xencr vhd` command reads it."""

from __future__ import annotations

import random
from pathlib import Path

from recordstest import xencr

MIB = 1 << 20


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(random.Random(14).randbytes(6 * MIB))
    whole = tmp_path / "disk.vhd"
    assert xencr("vhd", "convert", str(raw), str(whole), "--to", "dynamic")[0] == 0
    size = whole.stat().st_size
    data = whole.read_bytes()
    cut = tmp_path / "cut.vhd"
    # A copy stopped in the data (the BAT says where its blocks end), in the BAT (it must at
    # least end, then the footer), in the header, and before a whole footer.
    for length, expected in ((size // 2, size), (1600, 2560), (1000, 2048), (100, 512)):
        cut.write_bytes(data[:length])
        where = "footer at offset 0" if length < 512 else f"footer at offset {expected - 512}"
        line = f"{where}: truncated: file ends at {length}, expected at least {expected}"
        for args in (("info", str(cut)), ("cat", str(cut), "-o", str(tmp_path / "out.raw"))):
            assert xencr("vhd", *args) == (1, "", f"xencr: error: {line}\n"), (length, args)
        assert xencr("vhd", "check", str(cut)) == (1, f"{cut}: {line}\n", "")

    missing = tmp_path / "nope.vhd"
    for args in (("info", str(missing)), ("cat", str(missing), "-o", str(tmp_path / "out.raw"))):
        assert xencr("vhd", *args) == (1, "", f"xencr: error: no such file: {missing}\n")
    assert xencr("vhd", "check", str(cut), str(missing)) == (
        1,
        f"{cut}: footer at offset 0: truncated: file ends at 100, expected at least 512\n"
        f"no such file: {missing}\n",
        "",
    )
