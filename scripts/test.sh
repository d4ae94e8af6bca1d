#!/usr/bin/env bash
# Every test, failing fast: Rust format, lints and tests, then Python lints, types and pytest.
set -euo pipefail
source "$(dirname "$0")/_setup.sh"

run() { say "$*"; "$@"; }

run cargo fmt --check
run cargo clippy --all-targets -- -D warnings
run cargo clippy --lib --features python -- -D warnings  # the PyO3 seam too
run cargo test --release
run .venv/bin/ruff check python tests
run .venv/bin/ruff format --check python tests
run .venv/bin/mypy
say "pytest"
log="$(mktemp)"
# A throwaway PostgreSQL for the state tests (tests/conftest.py reads XENCR_TEST_PG), stopped and
# removed on any exit. Directly under /tmp: as root, the server runs as the postgres user.
pgdir="$(mktemp -d /tmp/xencr-pg-XXXXXX)"
cleanup() {
  .venv/bin/python tests/pgcluster.py stop "$pgdir" || true
  rm -rf "$pgdir" "$log"
}
trap cleanup EXIT
say "starting a throwaway PostgreSQL in $pgdir"
pgenv="$(.venv/bin/python tests/pgcluster.py start "$pgdir")"
eval "$pgenv"
export XENCR_TEST_PG XENCR_TEST_PG_PASSWORD
set +e
# Two processes (the machine's two cores): a test file stays in one (`--dist loadfile`), since a
# module's tests share its simulator and build on each other. XENCR_TEST_PROCESSES=0: one process.
.venv/bin/python -m pytest -q -n "${XENCR_TEST_PROCESSES:-2}" --dist loadfile "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
closing="$(grep -E '^=*.* in [0-9.]+s' "$log" | tail -1 || true)"
if [ "$status" -ne 0 ]; then
  echo "FAILED: pytest exited $status" >&2
  exit "$status"
fi
# pytest exits 5 when it collects nothing; also refuse a run where nothing passed.
if ! grep -qE '[0-9]+ passed' <<<"$closing"; then
  echo "FAILED: no tests ran ($closing)" >&2
  exit 1
fi
echo "all tests passed: $closing"
