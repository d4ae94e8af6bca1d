#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (default 60 s each): bash scripts/fuzz.sh [SECONDS]
# cargo-fuzz needs a nightly toolchain (libFuzzer's sanitizer flags); it is installed if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
secs="${1:-60}"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "==> installing the nightly toolchain (cargo-fuzz needs it)" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --help >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
if [ ! -d fuzz ]; then
  echo "no fuzz/ directory yet: nothing to fuzz" >&2
  exit 1
fi
# Start from small valid inputs (made by the engine) so the fuzzer gets past cookies and checksums.
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import xencr._engine' 2>/dev/null; then
  .venv/bin/python scripts/fuzz_seeds.py fuzz/corpus
fi
targets="$(cargo +nightly fuzz list)"
[ -n "$targets" ] || { echo "no fuzz targets found" >&2; exit 1; }
for t in $targets; do
  echo "==> fuzzing $t for ${secs}s" >&2
  cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048
done
echo "fuzzing done: no crash in $(wc -w <<<"$targets") targets, ${secs}s each"
