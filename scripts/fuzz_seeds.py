"""Seed the cargo-fuzz corpora with small valid inputs, so fuzzing starts past the cookies and
checksums: tiny dynamic, differencing and fixed VHDs (4 KiB blocks) and their export streams.

    .venv/bin/python scripts/fuzz_seeds.py fuzz/corpus
"""

from __future__ import annotations

import os
import sys
import tempfile

from xencr import _engine as eng
from xencr import pattern


def main(corpus: str) -> None:
    files, streams = os.path.join(corpus, "parse_file"), os.path.join(corpus, "parse_stream")
    os.makedirs(files, exist_ok=True)
    os.makedirs(streams, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        base, child = os.path.join(d, "base.vhd"), os.path.join(d, "child.vhd")
        eng.create(base, 64 << 10, block_size=4096)
        eng.write(base, 0, pattern.sectors(0xBA5E, 0, 3))
        eng.write(base, 40 << 10, pattern.sectors(0xBA5E, 80, 8))
        eng.create(child, 64 << 10, parent=base, block_size=4096)
        eng.write(child, 1000, b"child" * 300)
        raw = os.path.join(d, "small.raw")
        with open(raw, "wb") as f:
            f.write(pattern.sectors(0xF1ED, 0, 32))
        fixed = os.path.join(d, "fixed.vhd")
        eng.convert(raw, fixed, src_format="raw", dst_format="fixed")
        seeds = {
            os.path.join(files, "dynamic.vhd"): base,
            os.path.join(files, "differencing.vhd"): child,
            os.path.join(files, "fixed.vhd"): fixed,
        }
        for name, src in seeds.items():
            with open(src, "rb") as f, open(name, "wb") as out:
                out.write(f.read())
        eng.export_stream(child, os.path.join(streams, "full.vhd"))
        eng.export_stream(child, os.path.join(streams, "delta.vhd"), base)
        eng.export_stream(base, os.path.join(files, "stream.vhd"))
    print(f"seeded {files} and {streams}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "fuzz/corpus")
