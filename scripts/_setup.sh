# Sourced by the other scripts: make sure the tools and the venv exist, and that the Rust
# extension is built from the current sources. Installs only what is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "==> $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    say "installing the Rust toolchain (rustup)"
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

if ! command -v qemu-img >/dev/null 2>&1; then
  say "installing qemu-utils (qemu-img is an independent VHD reader for the tests)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils
fi

# The simulator's hosts serve NBD with Debian's nbdkit and its Python plugin; the tests and
# benchmarks read those exports with libnbd's nbdinfo/nbdcopy.
if ! command -v nbdcopy >/dev/null 2>&1 || ! nbdkit python --version >/dev/null 2>&1; then
  say "installing nbdkit, nbdkit-plugin-python and libnbd-bin (the simulator's NBD servers)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nbdkit nbdkit-plugin-python libnbd-bin
fi

# The status page's browser tests drive Debian's chromium through chromium-driver (Selenium);
# WeasyPrint (`xencr report --pdf`) needs Pango, installed with them.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  say "installing chromium and chromium-driver (the status page's browser tests)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver libpango-1.0-0 libpangoft2-1.0-0
fi

# The state database's tests run against a real PostgreSQL too: scripts/test.sh starts a throwaway
# cluster of Debian's server (initdb + pg_ctl in a temp directory, tests/pgcluster.py).
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  say "installing postgresql (the state database's tests on PostgreSQL)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi

# (Re)install when the venv lacks the engine or pyproject.toml changed since the last install
# (a new dependency reaches an existing venv too).
deps_stamp=".venv/.xencr-deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -e "$deps_stamp" ] || ! .venv/bin/python -c 'import xencr._engine, maturin' >/dev/null 2>&1; then
  say "installing xencr and its test dependencies (maturin builds the Rust extension)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q maturin
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.xencr-deps-*
  touch "$deps_stamp"
fi
# Rebuild the extension when the Rust sources changed (cargo makes this a no-op otherwise).
say "building the engine (maturin develop --release)"
if ! log="$(.venv/bin/maturin develop --release 2>&1)"; then
  echo "$log" >&2
  exit 1
fi
